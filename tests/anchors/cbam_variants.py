"""CBAM variants from two libraries, as PyTorch modules in each library's
structure (written for the tests from the libraries' documented structure;
neither library is imported or needed).

* ultralytics ``ultralytics/nn/modules/conv.py``: ``CBAM(c1, kernel_size)``
  holding ``channel_attention`` (``ChannelAttention``: adaptive average pool,
  ``fc`` = ONE ``Conv2d(c1, c1, 1)`` with bias, sigmoid, no hidden layer)
  and ``spatial_attention`` (``SpatialAttention``: ``cat([mean, max])`` over
  the channels, ``cv1`` = ``Conv2d(2, 1, k, padding=k // 2, bias=False)``,
  sigmoid, no BN; k must be 3 or 7).  Keys ``channel_attention.fc.weight``
  ``(C, C, 1, 1)``, ``channel_attention.fc.bias``,
  ``spatial_attention.cv1.weight``.
* timm ``timm/layers/cbam.py``: ``CbamModule`` = ``channel`` (``ChannelAttn``:
  ``fc1``, ReLU, ``fc2`` as 1x1 convs, bias ``mlp_bias`` (default False),
  applied to the mean and the amax over H, W separately, logits summed,
  sigmoid) and ``spatial`` (``SpatialAttn``: ``cat([mean, amax])`` over the
  channels, ``conv`` = ``ConvNormAct(2, 1, k, apply_act=False)``: a conv
  without bias, padding (k - 1) // 2, then ``BatchNorm2d`` with eps 1e-5 and
  momentum 0.1, no activation; sigmoid).  ``LightCbamModule``:
  ``LightChannelAttn`` runs the MLP once on ``0.5 * mean + 0.5 * amax`` and
  ``LightSpatialAttn`` convolves the one map ``0.5 * mean + 0.5 * amax`` over
  the channels (``ConvNormAct(1, 1, k, apply_act=False)``).  The reduced width
  is ``rd_channels`` when given, else ``make_divisible(channels * rd_ratio,
  rd_divisor, round_limit=0.)`` with ``rd_divisor`` 1 (CBAM).  Keys
  ``channel.fc1.weight``, ``channel.fc2.weight`` (+ ``.bias`` with
  ``mlp_bias``), ``spatial.conv.conv.weight``, ``spatial.conv.bn.*``.
* timm ``timm/layers/squeeze_excite.py``: ``SEModule`` (mean over H, W, or
  with ``add_maxpool`` ``0.5 * mean + 0.5 * amax``; ``fc1``, ``bn``
  (Identity without ``norm_layer``), ReLU, ``fc2`` as 1x1 convs with bias
  ``bias`` (default True); sigmoid; ``rd_divisor`` 8).  Keys ``fc1.*``,
  ``fc2.*``: ``cbam_channel`` with ``pool_types=['avg']`` (or
  ``['avgmax']``), ``mlp_bias=True``, ``hidden_divisor=8``.

``make_divisible`` below follows timm's helper: ``max(min_value or divisor,
int(v + divisor / 2) // divisor * divisor)``, plus ``divisor`` when that is
below ``round_limit * v`` (never, with the ``round_limit=0.`` CBAM and SE
pass).

Factories take the config dict and the channel count like the factories of
``anchors.cbam`` (``channels`` or ``input_shapes``), map the config onto the
library's constructor arguments and raise ValueError for a config the
library's classes cannot express.  Gate modules record ``last_gate`` (not in
the libraries) for the aux comparisons.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

try:  # as ``anchors.cbam_variants`` (the tests) or ``cbam_variants`` (the
    # registry's factory names, with tests/anchors on sys.path)
    from anchors.cbam import _channels, _finish, _require
except ImportError:  # pragma: no cover - depends on sys.path
    from cbam import _channels, _finish, _require  # type: ignore[no-redef]

__all__ = [
    "make_divisible",
    "make_timm",
    "make_timm_channel",
    "make_timm_light",
    "make_timm_light_channel",
    "make_timm_light_spatial",
    "make_timm_se",
    "make_timm_spatial",
    "make_ultralytics",
    "make_ultralytics_channel",
    "make_ultralytics_spatial",
]


# ---------------------------------------------------------------------------
# ultralytics structure


class ChannelAttention(nn.Module):
    """Average pool -> one C -> C 1x1 conv with bias -> sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, 1, 0, bias=True)
        self.act = nn.Sigmoid()
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.act(self.fc(self.pool(x)))
        self.last_gate = gate.detach().flatten(1)
        return x * gate


class SpatialAttention(nn.Module):
    """cat([mean, max]) over the channels -> k x k conv, no bias -> sigmoid."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size not in (3, 7):
            raise ValueError("kernel size must be 3 or 7")
        padding = 3 if kernel_size == 7 else 1
        self.cv1 = nn.Conv2d(2, 1, kernel_size, padding=padding, bias=False)
        self.act = nn.Sigmoid()
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([torch.mean(x, 1, keepdim=True),
                            torch.max(x, 1, keepdim=True)[0]], 1)
        gate = self.act(self.cv1(pooled))
        self.last_gate = gate.detach()
        return x * gate


class UltralyticsCBAM(nn.Module):
    """spatial_attention(channel_attention(x)); either gate may be left out
    (for cbam_channel / cbam_spatial; not in the library)."""

    def __init__(self, c1: int, kernel_size: int = 7, *, channel: bool = True,
                 spatial: bool = True) -> None:
        super().__init__()
        if channel:
            self.channel_attention = ChannelAttention(c1)
        if spatial:
            self.spatial_attention = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "channel_attention"):
            x = self.channel_attention(x)
        if hasattr(self, "spatial_attention"):
            x = self.spatial_attention(x)
        return x


def _ultralytics(config: dict[str, Any], part: str) -> nn.Module:
    if part != "spatial":
        _require("ultralytics", config, mlp_layers=1, pool_types=("avg",),
                 mlp_bias=True)
    if part != "channel":
        _require("ultralytics", config, channel_pool_order="mean_max",
                 spatial_bias=False, spatial_bn=None, spatial_relu=False)
        if config["spatial_kernel"] not in (3, 7):
            raise ValueError("config: the ultralytics anchor's SpatialAttention "
                             "takes spatial_kernel 3 or 7, got "
                             f"{config['spatial_kernel']!r}")
    if part == "cbam":
        _require("ultralytics", config, spatial=True)
    module = UltralyticsCBAM(_channels(config), config["spatial_kernel"],
                             channel=part != "spatial", spatial=part != "channel")
    return _finish(module, config)


def make_ultralytics(config: dict[str, Any]) -> nn.Module:
    return _ultralytics(config, "cbam")


def make_ultralytics_channel(config: dict[str, Any]) -> nn.Module:
    return _ultralytics(config, "channel")


def make_ultralytics_spatial(config: dict[str, Any]) -> nn.Module:
    return _ultralytics(config, "spatial")


# ---------------------------------------------------------------------------
# timm structure


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """Round v to the nearest multiple of divisor (half up), at least
    min_value (default divisor); add a divisor if that lost more than
    1 - round_limit of v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ChannelAttn(nn.Module):
    """fc2(relu(fc1(pool))) for the mean and the amax, summed, sigmoid."""

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16,
                 rd_channels: int | None = None, rd_divisor: int = 1,
                 mlp_bias: bool = False) -> None:
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor,
                                         round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias)
        self.gate = nn.Sigmoid()
        self.last_gate: torch.Tensor | None = None

    def mlp(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(pooled)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self.mlp(x.mean((2, 3), keepdim=True))
                + self.mlp(x.amax((2, 3), keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(self.logits(x))
        self.last_gate = gate.detach().flatten(1)
        return x * gate


class LightChannelAttn(ChannelAttn):
    """The MLP once, on 0.5 * mean + 0.5 * amax."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        return self.mlp(pooled)


class ConvNormAct(nn.Module):
    """conv (no bias, padding (k - 1) // 2) -> BatchNorm2d (eps 1e-5,
    momentum 0.1); the activation is off (apply_act=False) in both users."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SpatialAttn(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = ConvNormAct(2, 1, kernel_size)
        self.gate = nn.Sigmoid()
        self.last_gate: torch.Tensor | None = None

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)],
                         dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(self.conv(self.descriptor(x)))
        self.last_gate = gate.detach()
        return x * gate


class LightSpatialAttn(SpatialAttn):
    """One map, 0.5 * mean + 0.5 * amax over the channels, 1 -> 1 conv."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__(kernel_size)
        self.conv = ConvNormAct(1, 1, kernel_size)

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.mean(dim=1, keepdim=True) + 0.5 * x.amax(dim=1, keepdim=True)


class TimmCbam(nn.Module):
    """CbamModule / LightCbamModule: x = channel(x); x = spatial(x); either
    gate may be left out (for the gate blocks; not in the library)."""

    def __init__(self, channel: nn.Module | None, spatial: nn.Module | None) -> None:
        super().__init__()
        if channel is not None:
            self.channel = channel
        if spatial is not None:
            self.spatial = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "channel"):
            x = self.channel(x)
        if hasattr(self, "spatial"):
            x = self.spatial(x)
        return x


def _rd_args(config: dict[str, Any]) -> dict[str, Any]:
    """refattn's width keys as timm's constructor arguments: rd_channels when
    given (or, without a divisor, the floor C // r that timm's arguments can
    only state outright), else rd_ratio = 1 / r and rd_divisor = d."""
    if config["hidden_channels"] is not None:
        return {"rd_channels": config["hidden_channels"]}
    if config["hidden_divisor"] is None:
        return {"rd_channels": _channels(config) // config["reduction"]}
    return {"rd_ratio": 1.0 / config["reduction"],
            "rd_divisor": config["hidden_divisor"]}


def _timm(config: dict[str, Any], part: str, light: bool) -> nn.Module:
    name = "timm LightCbam" if light else "timm CbamModule"
    if part != "spatial":
        _require(name, config, mlp_layers=2,
                 pool_types=("avgmax",) if light else ("avg", "max"))
    if part != "channel":
        _require(name, config, channel_pool_order="avgmax" if light else "mean_max",
                 spatial_bias=False, spatial_relu=False, bn_eps=1e-5, bn_momentum=0.1)
        if config["spatial_bn"] is None:
            raise ValueError(f"config: the {name} anchor's ConvNormAct always has "
                             "a BatchNorm2d; it needs spatial_bn 'train' or 'eval'")
    if part == "cbam":
        _require(name, config, spatial=True)
    channel = spatial = None
    if part != "spatial":
        cls = LightChannelAttn if light else ChannelAttn
        channel = cls(_channels(config), mlp_bias=config["mlp_bias"],
                      **_rd_args(config))
    if part != "channel":
        spatial = (LightSpatialAttn if light else SpatialAttn)(config["spatial_kernel"])
    return _finish(TimmCbam(channel, spatial), config)


def make_timm(config: dict[str, Any]) -> nn.Module:
    return _timm(config, "cbam", light=False)


def make_timm_channel(config: dict[str, Any]) -> nn.Module:
    return _timm(config, "channel", light=False)


def make_timm_spatial(config: dict[str, Any]) -> nn.Module:
    return _timm(config, "spatial", light=False)


def make_timm_light(config: dict[str, Any]) -> nn.Module:
    return _timm(config, "cbam", light=True)


def make_timm_light_channel(config: dict[str, Any]) -> nn.Module:
    return _timm(config, "channel", light=True)


def make_timm_light_spatial(config: dict[str, Any]) -> nn.Module:
    return _timm(config, "spatial", light=True)


class SEModule(nn.Module):
    """Squeeze (mean, or 0.5 * mean + 0.5 * amax with add_maxpool), fc1, bn
    (Identity), ReLU, fc2, sigmoid gate."""

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16,
                 rd_channels: int | None = None, rd_divisor: int = 8,
                 add_maxpool: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.add_maxpool = add_maxpool
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor,
                                         round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = nn.Sigmoid()
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        gate = self.gate(x_se)
        self.last_gate = gate.detach().flatten(1)
        return x * gate


def make_timm_se(config: dict[str, Any]) -> nn.Module:
    """timm's SEModule for a ``cbam_channel`` config (names ``fc1.*``,
    ``fc2.*``: the gate's own)."""
    _require("timm SEModule", config, mlp_layers=2)
    pools = tuple(config["pool_types"])
    if pools not in (("avg",), ("avgmax",)):
        raise ValueError("config: the timm SEModule anchor squeezes with the mean "
                         "(pool_types ['avg']) or, with add_maxpool, with "
                         f"0.5 * mean + 0.5 * amax (['avgmax']), got {list(pools)}")
    args = _rd_args(config)
    module = SEModule(_channels(config), add_maxpool=pools == ("avgmax",),
                      bias=config["mlp_bias"], **args)
    return _finish(module, config)
