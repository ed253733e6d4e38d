"""PyTorch modules written in the structure of each anchor implementation.

Their ``state_dict`` names are the anchors' own names, so a fixture's
``anchor_names`` map loads into them directly.  Each module file exposes
factories ``f(config: dict) -> torch.nn.Module`` (the signature
``refattn validate --torch module:factory`` expects), the faithful ones and,
for the validation tests, versions with the known bugs planted.
"""

from __future__ import annotations

from typing import Any

# The float unary ops ATen hands to MKL's VML on contiguous float32/float64
# tensors (aten/src/ATen/cpu/vml.h), one chunk of 2048 elements per intra-op
# thread.
VML_OPS = ("abs", "acos", "asin", "atan", "cos", "erf", "erfc", "exp", "expm1",
           "log", "log10", "log1p", "log2", "sin", "sqrt", "tan", "tanh", "trunc")

_settled: set[int] = set()


def settle_vml_dispatch(torch: Any) -> None:
    """Call every VML-backed op once per float dtype on one thread, before any
    multi-threaded call can.

    oneMKL 2024.2 (the build torch 2.13's wheels link) picks each VML
    function's kernel on that function's first call; when that first call runs
    on several threads at once (a tensor of more than 2048 elements), one
    thread can run a low-accuracy kernel over its whole chunk although high
    accuracy is requested (pytorch/pytorch#188792).  Measured here: the first
    ``torch.exp`` of a (3, 32, 42) float64 tensor in a fresh process came back
    with relative errors up to 3.3e-9 in one thread's 2016 elements in 3 of 42
    processes, later calls exact.  In CBAM's ``lse`` pool that moves the
    channel gate by ~5e-11 and the spatial BN gradients by ~1e-10, a hundred
    times PARITY_RTOL.  A call on fewer than 2048 elements stays on the
    calling thread, so after this one the choice is made and every later call
    is accurate.  Idempotent per torch module.
    """
    if id(torch) in _settled:
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(0.125, 0.875, 1024, dtype=dtype)  # in every op's domain
        for op in VML_OPS:
            getattr(torch, op)(x)
    _settled.add(id(torch))


try:
    import torch as _torch
except ImportError:  # pragma: no cover - the anchors need torch; tests skip
    pass
else:
    settle_vml_dispatch(_torch)
