"""refattn: reference forward and hand-written backward passes for CNN
attention blocks, proved by finite differences and used to emit golden
tensors that other frameworks are validated against.

Notation used in every docstring and shape comment:

    N        batch size
    C        channels (Cq, Ck for the query / key-value side of cross-layer)
    H, W     height and width; S the spatial shape in general ((L,), (H, W), (T, H, W))
    L        number of positions, L = H*W (Lq, Lk: query / key positions)
    Cr       reduced channels of the CBAM MLP, Cr = C // r
    Ci       inner (embedding) channels of theta / phi / g in the non-local block
    P        planes of CGNL and cross-layer attention; G groups
    K        kernel size; O output channels

Gradients are named ``d<name>`` = dL/d<name> and always have ``<name>``'s shape.
The upstream gradient into a backward is ``dout``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("refattn")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
