"""PyTorch anchors of the simple blocks: conv1x1, gap, mlpconv and nin_head.

Factories take the block's resolved config dict (``config_to_dict``) plus the
input-derived value ``in_channels`` (= ``x.shape[1]``) where the module needs
it (conv1x1, mlpconv, nin_head); gap needs nothing.  Each returns a float32
module in training mode; call ``.double()`` for float64 parity.

* ``make_conv1x1``: ``nn.Conv2d(C, O, kernel_size=1, ...)``; names ``weight``,
  ``bias`` (the same as refattn's).
* ``make_gap``: the mean over every spatial axis (as ``x.mean((2, 3))`` or
  ``F.adaptive_avg_pool2d(x, 1)``); no parameters.
* ``make_mlpconv``: the PyTorch port of the NIN model definition, one
  ``nn.Sequential(conv, ReLU, conv, ReLU, ...)``; conv i is entry 2i, so its
  names are ``{2i}.weight``, ``{2i}.bias``.
* ``make_nin_head``: the same Sequential followed by
  ``nn.AdaptiveAvgPool2d(1)`` and ``nn.Flatten()`` (logits ``(N, classes)``).

Known-buggy variants, for the validation tests:

* ``make_nin_head_no_last_relu``: the head most re-implementations write,
  without the ReLU after the class conv (differs whenever a class map has
  negative pre-activations and the config says ``relu_last``);
* ``make_gap_avgpool7``: the older ResNet head ``nn.AvgPool2d(7)``, equal to
  global pooling only on 7x7 maps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "GlobalAvgPool",
    "make_conv1x1",
    "make_gap",
    "make_gap_avgpool7",
    "make_mlpconv",
    "make_nin_head",
    "make_nin_head_no_last_relu",
    "run_torch",
]


def _pair(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def make_conv1x1(config: Mapping[str, Any]) -> nn.Module:
    """nn.Conv2d with a 1x1 kernel; needs ``in_channels``."""
    return nn.Conv2d(
        config["in_channels"],
        config["out_channels"],
        kernel_size=1,
        stride=_pair(config["stride"]),
        padding=_pair(config["padding"]),
        groups=config["groups"],
        bias=config["bias"],
    )


class GlobalAvgPool(nn.Module):
    """Mean over every spatial axis: (N, C, *S) -> (N, C) or (N, C, 1, ..., 1)."""

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=self.keepdim)


def make_gap(config: Mapping[str, Any]) -> nn.Module:
    return GlobalAvgPool(bool(config["keepdim"]))


def make_gap_avgpool7(config: Mapping[str, Any]) -> nn.Module:
    """BUGGY: ``nn.AvgPool2d(7)`` (7x7 windows, stride 7), flattened unless
    keepdim; global only for 7x7 inputs."""
    layers: list[nn.Module] = [nn.AvgPool2d(7)]
    if not config["keepdim"]:
        layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def _nin_layers(
    config: Mapping[str, Any], *, drop_last_relu: bool = False
) -> list[nn.Module]:
    """conv, ReLU, conv, ReLU, ... as in the NIN model definitions."""
    channels = list(config["channels"])
    layers: list[nn.Module] = []
    c_in = config["in_channels"]
    for i, c_out in enumerate(channels):
        if i == 0:
            conv = nn.Conv2d(
                c_in,
                c_out,
                _pair(config["kernel_size"]),
                stride=_pair(config["stride"]),
                padding=_pair(config["padding"]),
                dilation=_pair(config["dilation"]),
                groups=config["groups"],
                bias=config["bias"],
            )
        else:
            conv = nn.Conv2d(c_in, c_out, 1, bias=config["bias"])
        layers.append(conv)
        last = i == len(channels) - 1
        if not last or (config["relu_last"] and not drop_last_relu):
            layers.append(nn.ReLU())
        c_in = c_out
    return layers


def make_mlpconv(config: Mapping[str, Any]) -> nn.Module:
    """The NIN mlpconv as one nn.Sequential; needs ``in_channels``."""
    return nn.Sequential(*_nin_layers(config))


def make_nin_head(config: Mapping[str, Any]) -> nn.Module:
    """mlpconv + global average pooling + flatten: logits (N, classes)."""
    return nn.Sequential(*_nin_layers(config), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make_nin_head_no_last_relu(config: Mapping[str, Any]) -> nn.Module:
    """BUGGY: the NIN head without the ReLU after the class conv, whatever
    ``relu_last`` says."""
    return nn.Sequential(
        *_nin_layers(config, drop_last_relu=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def run_torch(
    module: nn.Module,
    names: Mapping[str, str],
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    dout: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Load refattn's params (canonical -> anchor names), run forward and
    autograd backward with cotangent `dout` in float64.

    Returns (out, dx, dparams keyed by the canonical names).
    """
    module = module.double()
    state = module.state_dict()
    if set(state) != set(names.values()):
        raise ValueError(
            f"anchor state_dict keys {sorted(state)} != mapped {sorted(names.values())}"
        )
    module.load_state_dict(
        {
            names[k]: torch.from_numpy(np.asarray(v, dtype=np.float64))
            for k, v in params.items()
        }
    )
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).requires_grad_(True)
    out = module(xt)
    out.backward(torch.from_numpy(np.asarray(dout, dtype=np.float64)))
    named = dict(module.named_parameters())
    dparams = {k: named[a].grad.detach().numpy() for k, a in names.items()}
    return out.detach().numpy(), xt.grad.detach().numpy(), dparams
