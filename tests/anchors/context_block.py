"""The GC block anchor as a PyTorch module, in the structure of mmcv's
``ContextBlock`` (``mmcv/cnn/bricks/context_block.py``; the official
xvjiarui/GCNet ``ContextBlock2d`` has the same layout).

``ContextBlock(in_channels, ratio, pooling_type, fusion_types)``:

* ``conv_mask``: ``Conv2d(C, 1, 1)`` with bias ('att' pooling), softmax over
  the H·W positions, the context a batched matmul of x (N, 1, C, L) with the
  map (N, 1, L, 1); 'avg' pooling: ``AdaptiveAvgPool2d(1)``.
* ``channel_add_conv`` / ``channel_mul_conv``: ``Sequential(Conv2d(C, P, 1),
  LayerNorm([P, 1, 1]), ReLU, Conv2d(P, C, 1))`` with P = int(C · ratio),
  state_dict keys ``.0.*``, ``.1.*``, ``.3.*``.
* forward: ``out = x``; times ``sigmoid(channel_mul_conv(context))`` when
  present, then plus ``channel_add_conv(context)``.

``refattn.blocks.specs.gc.anchor_names`` maps refattn's canonical keys onto
these.  ``reset_parameters`` is mmcv's (Kaiming-normal fan-in conv_mask, the
last conv of each transform zero); refattn's tests load random parameters.
Factories take the config dict (``config_to_dict`` of a resolved
``GCConfig``) plus ``channels`` (or what ``refattn validate`` passes:
``in_channels``, ``input_shapes``).  The module is float64 and records its
last attention map as ``last_attention`` (N, 1, H, W) and its last gate as
``last_gate`` (N, C, 1, 1), detached; neither touches the state_dict.

Known-buggy variants (mmcv structure and names; each disagrees with refattn):

* ``make_mmcv_softmax_over_channels``: the softmax of the mask taken over
  the wrong axis of (N, 1, L) -- dim 1, the single mask channel -- so every
  weight is 1 and the "context" is the plain SUM over positions.
* ``make_mmcv_add_before_mul``: both fusions, but the add term added before
  the gate multiplies (``(x + add) * sigmoid(mul)``).
* ``make_mmcv_norm_without_mean``: the LayerNorm replaced by a
  normalisation without the channel mean (``x / sqrt(mean x² + eps)``, an
  RMS norm): the affine parameters and shapes are the same.
* ``make_mmcv_layernorm_backward_without_means``: a right forward and a
  WRONG backward: the LayerNorm's input gradient is ``γ ⊙ dy / sqrt(var +
  eps)``, the two mean terms of the true VJP dropped (a custom autograd
  Function).  The output agrees; every gradient behind the LayerNorm
  (conv1, conv_mask, x) does not, while conv2's and the LayerNorm's own
  parameter gradients still agree.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "ContextBlock",
    "make_gcnet_r16",
    "make_mmcv",
    "make_mmcv_add_before_mul",
    "make_mmcv_layernorm_backward_without_means",
    "make_mmcv_norm_without_mean",
    "make_mmcv_softmax_over_channels",
]


class _RMSNorm(nn.Module):
    """The buggy LayerNorm: no mean subtracted (same parameters as LayerNorm)."""

    def __init__(self, shape: list[int], eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = x.pow(2).mean(dim=(1, 2, 3), keepdim=True)
        return x / torch.sqrt(ms + self.eps) * self.weight + self.bias


class _LayerNormNoMeanGrad(torch.autograd.Function):
    """LayerNorm over dims (1, 2, 3) whose backward drops the mean terms."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, eps: float) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(1, 2, 3), keepdim=True)
        inv = 1.0 / torch.sqrt(var + eps)
        xhat = (x - mean) * inv
        ctx.save_for_backward(xhat, inv, weight)
        return xhat * weight + bias

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        xhat, inv, weight = ctx.saved_tensors
        dx = dy * weight * inv  # the bug: no − mean(dx̂) − x̂ ⊙ mean(dx̂ ⊙ x̂)
        return dx, (dy * xhat).sum(dim=0), dy.sum(dim=0), None


class _LayerNormWrongBackward(nn.Module):
    def __init__(self, shape: list[int], eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LayerNormNoMeanGrad.apply(x, self.weight, self.bias, self.eps)


def _transform(channels: int, planes: int, eps: float, bug: str | None) -> nn.Module:
    norm: nn.Module
    if bug == "rms_norm":
        norm = _RMSNorm([planes, 1, 1], eps)
    elif bug == "ln_backward":
        norm = _LayerNormWrongBackward([planes, 1, 1], eps)
    else:
        norm = nn.LayerNorm([planes, 1, 1], eps=eps)
    return nn.Sequential(
        nn.Conv2d(channels, planes, kernel_size=1),
        norm,
        nn.ReLU(inplace=True),
        nn.Conv2d(planes, channels, kernel_size=1),
    )


class ContextBlock(nn.Module):
    """mmcv's ContextBlock (with an explicit ``planes`` and LayerNorm eps)."""

    def __init__(self, in_channels: int, ratio: float, pooling_type: str = "att",
                 fusion_types: tuple[str, ...] = ("channel_add",), *,
                 planes: int | None = None, ln_eps: float = 1e-5,
                 bug: str | None = None) -> None:
        super().__init__()
        if pooling_type not in ("att", "avg"):
            raise ValueError(f"pooling_type: expected 'att' or 'avg', got {pooling_type!r}")
        if not fusion_types or any(
                f not in ("channel_add", "channel_mul") for f in fusion_types):
            raise ValueError(f"fusion_types: got {fusion_types!r}")
        self.in_channels = in_channels
        self.planes = int(in_channels * ratio) if planes is None else planes
        self.pooling_type = pooling_type
        self.bug = bug
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1)
            self.softmax = nn.Softmax(dim=1 if bug == "softmax_dim1" else 2)
        else:
            self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.channel_add_conv = (
            _transform(in_channels, self.planes, ln_eps, bug)
            if "channel_add" in fusion_types else None)
        self.channel_mul_conv = (
            _transform(in_channels, self.planes, ln_eps, bug)
            if "channel_mul" in fusion_types else None)
        self.last_attention: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.pooling_type == "att":
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in",
                                    nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for branch in (self.channel_add_conv, self.channel_mul_conv):
            if branch is not None:
                nn.init.zeros_(branch[-1].weight)
                nn.init.zeros_(branch[-1].bias)

    def spatial_pool(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.pooling_type == "avg":
            return self.avg_pool(x)  # (N, C, 1, 1)
        feats = x.view(n, c, h * w).unsqueeze(1)  # (N, 1, C, L)
        mask = self.conv_mask(x).view(n, 1, h * w)  # (N, 1, L)
        mask = self.softmax(mask)  # (N, 1, L)
        self.last_attention = mask.detach().view(n, 1, h, w)
        context = torch.matmul(feats, mask.unsqueeze(-1))  # (N, 1, C, 1)
        return context.view(n, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.spatial_pool(x)
        out = x
        if self.bug == "add_before_mul" and self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        if self.channel_mul_conv is not None:
            gate = torch.sigmoid(self.channel_mul_conv(context))  # (N, C, 1, 1)
            self.last_gate = gate.detach()
            out = out * gate
        if self.bug != "add_before_mul" and self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out


def _channels(config: dict[str, Any]) -> int:
    shape = (config.get("input_shapes") or {}).get("x")
    channels = config.get("channels", config.get("in_channels"))
    if channels is None and shape is not None:
        channels = shape[1]
    if channels is None:
        raise ValueError("config: the gc anchor factories need 'channels' "
                         "(x.shape[1]) next to the config keys")
    return int(channels)


def _make(config: dict[str, Any], bug: str | None = None) -> nn.Module:
    module = ContextBlock(
        _channels(config), config["ratio"], config["pooling_type"],
        tuple(config["fusion_types"]), planes=config.get("planes"),
        ln_eps=config["ln_eps"], bug=bug,
    )
    return module.double()


def make_mmcv(config: dict[str, Any]) -> nn.Module:
    """``ContextBlock(C, ratio, pooling_type, fusion_types)`` for any config."""
    return _make(config)


def make_gcnet_r16(config: dict[str, Any]) -> nn.Module:
    """The same module (the preset differs only in its ratio)."""
    return _make(config)


def make_mmcv_softmax_over_channels(config: dict[str, Any]) -> nn.Module:
    if config["pooling_type"] != "att":
        raise ValueError("config: the softmax bug needs pooling_type='att'")
    return _make(config, "softmax_dim1")


def make_mmcv_add_before_mul(config: dict[str, Any]) -> nn.Module:
    if set(config["fusion_types"]) != {"channel_add", "channel_mul"}:
        raise ValueError("config: the fusion-order bug needs both fusion types")
    return _make(config, "add_before_mul")


def make_mmcv_norm_without_mean(config: dict[str, Any]) -> nn.Module:
    return _make(config, "rms_norm")


def make_mmcv_layernorm_backward_without_means(config: dict[str, Any]) -> nn.Module:
    return _make(config, "ln_backward")
