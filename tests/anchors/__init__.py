"""PyTorch modules written in the structure of each anchor implementation.

Their ``state_dict`` names are the anchors' own names, so a fixture's
``anchor_names`` map loads into them directly.  Each module file exposes
factories ``f(config: dict) -> torch.nn.Module`` (the signature
``refattn validate --torch module:factory`` expects), the faithful ones and,
for the validation tests, versions with the known bugs planted.
"""

from __future__ import annotations

# The anchors run their ops in PyTorch first thing; MKL's kernel choice for
# exp, log, sqrt, ... is made on one thread before that (see the function).
from refattn.adapters.torch import settle_vml_dispatch

try:
    import torch as _torch
except ImportError:  # pragma: no cover - the anchors need torch; tests skip
    pass
else:
    settle_vml_dispatch(_torch)
