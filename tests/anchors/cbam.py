"""CBAM anchors as PyTorch modules, in the structure of each anchor.

Their ``state_dict`` keys are the anchors' own (``refattn.blocks.cbam.
anchor_names`` maps the canonical keys onto them):

* Jongchan/attention-module ``MODELS/cbam.py``: ``CBAM`` holding
  ``ChannelGate`` (``mlp = Sequential(Flatten, Linear, ReLU, Linear)``, pool
  types avg/max/lp/lse over the whole map) and ``SpatialGate`` (``ChannelPool``
  max-then-mean, ``spatial = BasicConv(conv, bn, relu)``), sigmoid gates.
  Keys ``ChannelGate.mlp.{1,3}.*``, ``SpatialGate.spatial.conv.*``,
  ``SpatialGate.spatial.bn.*``.
* luuuyi/CBAM.PyTorch ``model/resnet_cbam.py``: ``ChannelAttention`` (``fc``
  = two bias-free 1x1 convs; the reduced width is C // 16 whatever ``ratio``
  says) and ``SpatialAttention`` (cat mean-then-max, ``conv1``), each
  returning its map; composed as ``out = ca(x) * x; out = sa(out) * out``.
  Keys ``ca.fc.0.weight``, ``ca.fc.2.weight`` (1x1-conv shape
  ``(out, in, 1, 1)``), ``sa.conv1.weight``.
* the seed notes' two modules, as given there, composed as
  ``x1 = x * ca(x); out = x1 * sa(x1)`` under the attribute names
  ``channel_attention`` and ``spatial_attention``.

Factories take the config dict (``refattn.blocks.spec.config_to_dict`` of a
``CBAMConfig``) plus the input's channel count C, which the layer widths
depend on: ``channels`` = C, or ``input_shapes`` = ``{"x": (N, C, H, W)}`` as
``refattn.adapters.torch`` passes it.  A factory builds the anchor's
structure with the switches the anchor's classes have (Jongchan's BasicConv
has bias/bn/relu switches, its ChannelGate any pool types) and raises
ValueError for a config the anchor cannot express.  ``spatial_bn='eval'`` returns the module in eval mode.
``make_<anchor>_channel`` / ``make_<anchor>_spatial`` hold one gate under the
attribute name it has in the anchor's CBAM (for ``cbam_channel`` and
``cbam_spatial``).

Every gate module also records its last gate, detached, as ``last_gate``
((N, C) channel gate, (N, 1, H, W) spatial gate) so tests can compare
``aux.channel_gate`` / ``aux.spatial_gate``; this is not in the anchors and
does not touch the state_dict.

Known-buggy variants (Jongchan structure and names, for the validation
tests; each disagrees with the ``jongchan`` preset):

* ``make_jongchan_swapped_pool_order``: ChannelPool mean-then-max with
  Jongchan's weights.  The channel gate agrees; the spatial descriptor, the
  spatial gate, the output and every gradient differ.  (With the conv
  weight's two input channels swapped, ``weight[:, [1, 0]]``, it agrees.)
* ``make_jongchan_summed_descriptors``: the MLP applied once to the SUM of the
  pooled descriptors.  The channel gate and everything after it differ.
* ``make_jongchan_separate_mlps``: one MLP per pool type instead of one shared
  MLP; the extra MLPs (one per pool type after the first) are copies of the
  shared MLP made at the first forward, i.e. from the loaded weights, and
  are not in the state_dict.  The forward, the gates, the running statistics
  and the input gradient therefore AGREE; only the gradients of ``mlp.*``
  differ (``ChannelGate.mlp`` sees only the first descriptor's share).  A
  fixture catches it only through ``grad.param.mlp.*``: a check of outputs
  and input gradients alone passes it.  After one optimiser step the copies
  drift apart and the outputs would differ too.
* ``make_jongchan_no_spatial_sigmoid``: the spatial gate multiplies by the raw
  BN output.  The channel gate agrees; the spatial gate, the output and
  every gradient differ.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "make_jongchan",
    "make_jongchan_channel",
    "make_jongchan_no_spatial_sigmoid",
    "make_jongchan_separate_mlps",
    "make_jongchan_spatial",
    "make_jongchan_summed_descriptors",
    "make_jongchan_swapped_pool_order",
    "make_luuuyi",
    "make_luuuyi_channel",
    "make_luuuyi_spatial",
    "make_seed",
    "make_seed_channel",
    "make_seed_spatial",
]


# ---------------------------------------------------------------------------
# Jongchan/attention-module structure


class BasicConv(nn.Module):
    """conv -> optional BN (eps, momentum as the anchor) -> optional ReLU."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, *,
                 padding: int, relu: bool, bn: bool, bias: bool,
                 eps: float = 1e-5, momentum: float = 0.01) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=1,
                              padding=padding, bias=bias)
        self.bn = (nn.BatchNorm2d(out_planes, eps=eps, momentum=momentum, affine=True)
                   if bn else None)
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def logsumexp_2d(x: torch.Tensor) -> torch.Tensor:
    """s + log Σ exp(x − s) over the positions, s the max: (N, C, 1)."""
    flat = x.view(x.size(0), x.size(1), -1)
    s, _ = torch.max(flat, dim=2, keepdim=True)
    return s + (flat - s).exp().sum(dim=2, keepdim=True).log()


def pool_descriptor(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """One pooled descriptor over the whole map, as the anchor computes it."""
    hw = (x.size(2), x.size(3))
    if pool_type == "avg":
        return F.avg_pool2d(x, hw, stride=hw)
    if pool_type == "max":
        return F.max_pool2d(x, hw, stride=hw)
    if pool_type == "lp":
        return F.lp_pool2d(x, 2, hw, stride=hw)
    if pool_type == "lse":
        return logsumexp_2d(x)
    raise ValueError(f"pool_type: unknown {pool_type!r}")


class ChannelGate(nn.Module):
    def __init__(self, gate_channels: int, reduction_ratio: int = 16,
                 pool_types: tuple[str, ...] = ("avg", "max")) -> None:
        super().__init__()
        hidden = gate_channels // reduction_ratio
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, gate_channels),
        )
        self.pool_types = tuple(pool_types)
        self.last_gate: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for pool_type in self.pool_types:
            raw = self.mlp(pool_descriptor(x, pool_type))
            total = raw if total is None else total + raw
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.logits(x))
        self.last_gate = gate.detach()
        return x * gate.unsqueeze(2).unsqueeze(3).expand_as(x)


class ChannelPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx = torch.max(x, 1)[0].unsqueeze(1)
        return torch.cat((mx, torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    def __init__(self, kernel_size: int = 7, *, bias: bool = False, bn: bool = True,
                 relu: bool = False, eps: float = 1e-5, momentum: float = 0.01) -> None:
        super().__init__()
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, padding=(kernel_size - 1) // 2,
                                 relu=relu, bn=bn, bias=bias, eps=eps,
                                 momentum=momentum)
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.spatial(self.compress(x)))
        self.last_gate = scale.detach()
        return x * scale


class CBAM(nn.Module):
    """Jongchan's CBAM; ``no_channel`` (not in the anchor) keeps only the
    spatial gate, for ``cbam_spatial``."""

    def __init__(self, gate_channels: int, reduction_ratio: int = 16,
                 pool_types: tuple[str, ...] = ("avg", "max"), no_spatial: bool = False,
                 *, no_channel: bool = False, spatial_gate: nn.Module | None = None,
                 channel_gate: nn.Module | None = None) -> None:
        super().__init__()
        self.no_channel = no_channel
        if not no_channel:
            self.ChannelGate = (ChannelGate(gate_channels, reduction_ratio, pool_types)
                                if channel_gate is None else channel_gate)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate() if spatial_gate is None else spatial_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.no_channel else self.ChannelGate(x)
        if not self.no_spatial:
            out = self.SpatialGate(out)
        return out


def _require(anchor: str, config: dict[str, Any], **wanted: Any) -> None:
    """The config keys the anchor hard-codes must have the anchor's values."""
    for key, fixed in wanted.items():
        value = config[key]
        if isinstance(value, list):
            value = tuple(value)
        if value != fixed:
            raise ValueError(
                f"config: the {anchor} anchor has no switch for {key}; it needs "
                f"{key}={fixed!r}, got {config[key]!r}"
            )


def _channels(config: dict[str, Any]) -> int:
    """C of the input: ``config["channels"]``, or ``config["input_shapes"]["x"][1]``
    (what ``refattn.adapters.torch`` passes)."""
    if "channels" in config:
        return int(config["channels"])
    shapes = config.get("input_shapes") or {}
    if "x" in shapes:
        return int(shapes["x"][1])
    raise ValueError(
        "config: the CBAM anchor factories need 'channels' (x.shape[1]) or "
        "'input_shapes' with 'x' next to the config keys"
    )


def _finish(module: nn.Module, config: dict[str, Any]) -> nn.Module:
    module = module.double()
    module.train(config.get("spatial_bn") != "eval")
    return module


def _jongchan_spatial_gate(config: dict[str, Any],
                           cls: type = SpatialGate) -> nn.Module:
    return cls(config["spatial_kernel"], bias=config["spatial_bias"],
               bn=config["spatial_bn"] is not None, relu=config["spatial_relu"],
               eps=config["bn_eps"], momentum=config["bn_momentum"])


def _jongchan(config: dict[str, Any], channels: int, *, part: str = "cbam",
              channel_cls: type = ChannelGate, spatial_cls: type = SpatialGate,
              ) -> nn.Module:
    _require("Jongchan", config, mlp_bias=True, channel_pool_order="max_mean")
    spatial = part == "spatial" or (part == "cbam" and config["spatial"])
    channel_gate = None
    if part != "spatial":
        channel_gate = channel_cls(channels, config["reduction"],
                                   tuple(config["pool_types"]))
    spatial_gate = _jongchan_spatial_gate(config, spatial_cls) if spatial else None
    module = CBAM(channels, config["reduction"], tuple(config["pool_types"]),
                  no_spatial=not spatial, no_channel=part == "spatial",
                  spatial_gate=spatial_gate, channel_gate=channel_gate)
    return _finish(module, config)


def make_jongchan(config: dict[str, Any]) -> nn.Module:
    """Jongchan's CBAM; ``config`` plus ``channels`` (C of the input)."""
    return _jongchan(config, _channels(config))


def make_jongchan_channel(config: dict[str, Any]) -> nn.Module:
    """Jongchan's CBAM with no_spatial=True: the channel gate alone."""
    return _jongchan(config, _channels(config), part="channel")


def make_jongchan_spatial(config: dict[str, Any]) -> nn.Module:
    """Jongchan's SpatialGate alone (as ``SpatialGate`` of a CBAM)."""
    return _jongchan(config, _channels(config), part="spatial")


# ---------------------------------------------------------------------------
# luuuyi/CBAM.PyTorch structure


class ChannelAttention(nn.Module):
    def __init__(self, in_planes: int, ratio: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        # as in the anchor, `ratio` is not used: the width is in_planes // 16
        self.fc = nn.Sequential(
            nn.Conv2d(in_planes, in_planes // 16, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(in_planes // 16, in_planes, 1, bias=False),
        )
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(self.fc(self.avg_pool(x)) + self.fc(self.max_pool(x)))
        self.last_gate = out.detach().flatten(1)
        return out


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        out = torch.sigmoid(self.conv1(torch.cat([avg_out, max_out], dim=1)))
        self.last_gate = out.detach()
        return out


class LuuuyiCBAM(nn.Module):
    """The two luuuyi modules as the anchor's BasicBlock applies them."""

    def __init__(self, planes: int, kernel_size: int = 7, *, channel: bool = True,
                 spatial: bool = True) -> None:
        super().__init__()
        if channel:
            self.ca = ChannelAttention(planes)
        if spatial:
            self.sa = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "ca"):
            out = self.ca(out) * out
        if hasattr(self, "sa"):
            out = self.sa(out) * out
        return out


def _luuuyi(config: dict[str, Any], part: str) -> nn.Module:
    if part != "spatial":
        _require("luuuyi", config, mlp_bias=False, pool_types=("avg", "max"))
    if part != "channel":
        _require("luuuyi", config, channel_pool_order="mean_max", spatial_bias=False,
                 spatial_bn=None, spatial_relu=False)
    if part == "cbam":
        _require("luuuyi", config, spatial=True)
    module = LuuuyiCBAM(_channels(config), config["spatial_kernel"],
                        channel=part != "spatial", spatial=part != "channel")
    return _finish(module, config)


def make_luuuyi(config: dict[str, Any]) -> nn.Module:
    """luuuyi's ca + sa; the reduced width is C // 16 whatever ``reduction`` is."""
    return _luuuyi(config, "cbam")


def make_luuuyi_channel(config: dict[str, Any]) -> nn.Module:
    return _luuuyi(config, "channel")


def make_luuuyi_spatial(config: dict[str, Any]) -> nn.Module:
    return _luuuyi(config, "spatial")


# ---------------------------------------------------------------------------
# the seed notes' CBAM, the two modules as given there (verbatim, long lines
# included)


class ChannelAttentionModule(nn.Module):
    def __init__(self, channel, reduction=16):
        super(ChannelAttentionModule, self).__init__()
        mid_channel = channel // reduction
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)

        # 共享MLP权重
        self.shared_MLP = nn.Sequential(
            nn.Linear(in_features=channel, out_features=mid_channel),
            nn.ReLU(inplace=True),
            nn.Linear(in_features=mid_channel, out_features=channel)
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avgout = self.shared_MLP(self.avg_pool(x).view(x.size(0),-1)).unsqueeze(2).unsqueeze(3)
        maxout = self.shared_MLP(self.max_pool(x).view(x.size(0),-1)).unsqueeze(2).unsqueeze(3)
        return self.sigmoid(avgout + maxout)


class SpatialAttentionModule(nn.Module):
    def __init__(self):
        super(SpatialAttentionModule, self).__init__()
        self.conv2d = nn.Conv2d(in_channels=2, out_channels=1, kernel_size=7, stride=1, padding=3)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avgout = torch.mean(x, dim=1, keepdim=True)
        maxout, _ = torch.max(x, dim=1, keepdim=True)
        out = torch.cat([avgout, maxout], dim=1)
        out = self.sigmoid(self.conv2d(out))
        return out


class SeedCBAM(nn.Module):
    """x1 = x * ca(x); out = x1 * sa(x1), with the seed's modules."""

    def __init__(self, channel: int, reduction: int = 16, *, channel_gate: bool = True,
                 spatial_gate: bool = True) -> None:
        super().__init__()
        if channel_gate:
            self.channel_attention = ChannelAttentionModule(channel, reduction)
        if spatial_gate:
            self.spatial_attention = SpatialAttentionModule()
        self.last_channel_gate: torch.Tensor | None = None
        self.last_spatial_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "channel_attention"):
            gate = self.channel_attention(out)
            self.last_channel_gate = gate.detach().flatten(1)
            out = out * gate
        if hasattr(self, "spatial_attention"):
            gate = self.spatial_attention(out)
            self.last_spatial_gate = gate.detach()
            out = out * gate
        return out


def _seed(config: dict[str, Any], part: str) -> nn.Module:
    if part != "spatial":
        _require("seed", config, mlp_bias=True, pool_types=("avg", "max"))
    if part != "channel":
        _require("seed", config, channel_pool_order="mean_max", spatial_bias=True,
                 spatial_bn=None, spatial_relu=False, spatial_kernel=7)
    if part == "cbam":
        _require("seed", config, spatial=True)
    module = SeedCBAM(_channels(config), config["reduction"],
                      channel_gate=part != "spatial", spatial_gate=part != "channel")
    return _finish(module, config)


def make_seed(config: dict[str, Any]) -> nn.Module:
    return _seed(config, "cbam")


def make_seed_channel(config: dict[str, Any]) -> nn.Module:
    return _seed(config, "channel")


def make_seed_spatial(config: dict[str, Any]) -> nn.Module:
    return _seed(config, "spatial")


# ---------------------------------------------------------------------------
# known-buggy variants (Jongchan structure and names)


class MeanFirstChannelPool(nn.Module):
    """BUG: cat([mean, max]) where Jongchan's weights expect cat([max, mean])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx = torch.max(x, 1)[0].unsqueeze(1)
        return torch.cat((torch.mean(x, 1).unsqueeze(1), mx), dim=1)


class SwappedOrderSpatialGate(SpatialGate):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compress = MeanFirstChannelPool()


class NoSigmoidSpatialGate(SpatialGate):
    """BUG: the spatial map multiplies x without a sigmoid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.spatial(self.compress(x))
        self.last_gate = scale.detach()
        return x * scale


class SummedDescriptorsChannelGate(ChannelGate):
    """BUG: MLP(Σ_t d_t) instead of Σ_t MLP(d_t) (b2 enters once, the ReLU
    sees the sum)."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for pool_type in self.pool_types:
            d = pool_descriptor(x, pool_type)
            total = d if total is None else total + d
        return self.mlp(total)


class SeparateMLPsChannelGate(ChannelGate):
    """BUG: one MLP per pool type.  ``mlp`` serves the first pool type; every
    other pool type gets its own copy of ``mlp``, made at the first forward
    (so it starts from whatever weights were loaded) and kept out of the
    state_dict (a plain dict, not a registered submodule), so that the
    module's names are exactly Jongchan's and a fixture loads into it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_mlps: dict[str, nn.Module] = {}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.extra_mlps:
            self.extra_mlps = {t: copy.deepcopy(self.mlp) for t in self.pool_types[1:]}
        total = None
        for i, pool_type in enumerate(self.pool_types):
            mlp = self.mlp if i == 0 else self.extra_mlps[pool_type]
            raw = mlp(pool_descriptor(x, pool_type))
            total = raw if total is None else total + raw
        return total


def make_jongchan_swapped_pool_order(config: dict[str, Any]) -> nn.Module:
    """BUG: ChannelPool mean-then-max with Jongchan's weights."""
    return _jongchan(config, _channels(config), spatial_cls=SwappedOrderSpatialGate)


def make_jongchan_summed_descriptors(config: dict[str, Any]) -> nn.Module:
    """BUG: the shared MLP applied to the sum of the descriptors."""
    return _jongchan(config, _channels(config),
                     channel_cls=SummedDescriptorsChannelGate)


def make_jongchan_separate_mlps(config: dict[str, Any]) -> nn.Module:
    """BUG: separate MLPs per pool type (initialised from the same weights)."""
    return _jongchan(config, _channels(config), channel_cls=SeparateMLPsChannelGate)


def make_jongchan_no_spatial_sigmoid(config: dict[str, Any]) -> nn.Module:
    """BUG: no sigmoid in the spatial gate."""
    return _jongchan(config, _channels(config), spatial_cls=NoSigmoidSpatialGate)
