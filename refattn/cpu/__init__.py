"""The CPU kernel tier: fused, multi-threaded passes for the NumPy path.

The counterpart of ``refattn.cuda`` for NumPy arrays: the memory-bound steps
of the blocks (softmax, the batch and group norms' statistics and backward
sums, the sigmoid gate's backward, the channel and global max pools with
their arg-max, 2-D max-pool) as numba kernels (``refattn.cpu.kernels``),
registered through the ops' override points (``refattn.ops.overrides``) by
``refattn.cpu.kernel_ops.register`` the first time a NumPy array reaches
one.  The NumPy formulas of ``refattn.ops`` stay the specification and the
default: without numba (``pip install 'refattn[cpu]'`` installs it) nothing
is registered, and ``REFATTN_KERNELS=generic`` (or
``refattn.cuda.use_kernels(False)``) switches the tier off as it does the
CUDA kernels.  See docs/cpu-kernels.md.
"""
