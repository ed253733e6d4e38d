"""Speed and memory comparisons of refattn against PyTorch eager autograd.

Run ``python -m benchmarks.run --help`` from the repository root; results and
the method are described in ``docs/benchmarks.md``.
"""
