"""Idiomatic PyTorch modules for the benchmark: the structure a user would write.

Each class is an ordinary ``nn.Module`` built from ``nn.Conv2d``, ``nn.Linear``,
``nn.BatchNorm2d`` / ``nn.GroupNorm`` and tensor ops, run under eager autograd.
The layout follows the anchor each refattn preset names (reference/blocks.md):

| block | structure |
|---|---|
| conv1x1 | ``nn.Conv2d(C, O, 1)`` |
| mlpconv | k x k ``nn.Conv2d``, then 1x1 ``nn.Conv2d``; in-place ReLU after each |
| gap | ``x.mean((2, 3))`` |
| cbam | Jongchan: shared ``Linear -> ReLU -> Linear`` MLP on the avg and max |
| | descriptors, sigmoid gate; channel pool ``cat(max_c, mean_c)``, 7x7 conv |
| | (no bias) + ``BatchNorm2d(1)``, sigmoid gate |
| non_local | AlexHex7 embedded Gaussian: theta conv, |
| | ``Sequential(conv, MaxPool2d(2))`` for phi and g, ``matmul`` + |
| | ``softmax(dim=-1)``, ``Sequential(conv, BatchNorm2d)`` for W, residual |
| cgnl | Yue dot kernel: t/p/g convs without bias, per-(sample, group) scalar |
| | ``s = sum(p * g)`` over the group's channels and positions (one batched |
| | reduction over a ``(N, G, cg*H*W)`` view), grouped z conv, ``GroupNorm``, |
| | residual |
| cross_layer | CNL: theta conv on the query, phi/g convs per key/value layer, |
| | ``bmm`` + ``softmax(dim=-1)`` with 1/sqrt(P), transpose back, shared W |
| | conv, ``BatchNorm2d`` per key/value layer, residual |
| gc | mmcv ContextBlock: 1x1 mask conv, ``softmax`` over H*W, ``matmul`` |
| | context (or ``x.mean``), per fusion ``conv -> LayerNorm([P,1,1]) -> ReLU |
| | -> conv``; ``x * sigmoid(mul) + add`` |

``make_module(block, cfg, shapes)`` builds a module from a resolved refattn config
(the dataclass or its dict) and the input shapes; ``load_refattn_params``
copies a refattn parameter/state dict into it through ``torch_name`` (refattn
canonical name -> this module's ``state_dict`` name).  Config values a module
does not implement raise ``ValueError`` rather than silently computing
something else.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Shape = tuple[int, ...]

__all__ = [
    "CBAM",
    "CGNL",
    "GAP",
    "CrossLayerNL",
    "GlobalContext",
    "MLPConv",
    "NonLocal2d",
    "input_order",
    "load_refattn_params",
    "make_module",
    "torch_name",
]


def _as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _unsupported(block: str, key: str, value: Any, supported: Sequence[Any]) -> None:
    if value not in supported:
        raise ValueError(
            f"{key}: the PyTorch {block} benchmark module implements "
            f"{', '.join(map(repr, supported))}, got {value!r}"
        )


def _bn_mode(module: nn.Module, mode: str | None) -> None:
    """'train' (batch statistics) is the default state of a new module."""
    if mode == "eval":
        module.eval()


# ---------------------------------------------------------------------------
# modules


class MLPConv(nn.Module):
    """NIN mlpconv: k x k conv -> ReLU, then 1x1 convs each -> ReLU."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        relu_last: bool = True,
    ) -> None:
        super().__init__()
        layers = [
            nn.Conv2d(
                in_channels,
                channels[0],
                kernel_size,
                stride,
                padding,
                dilation,
                groups,
                bias=bias,
            )
        ]
        layers += [
            nn.Conv2d(a, b, 1, bias=bias) for a, b in itertools.pairwise(channels)
        ]
        self.convs = nn.ModuleList(layers)
        self.relu_last = relu_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1 or self.relu_last:
                x = F.relu(x, inplace=True)
        return x


class GAP(nn.Module):
    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=self.keepdim)


class ChannelGate(nn.Module):
    def __init__(
        self, channels: int, reduction: int, pool_types: Sequence[str], bias: bool
    ) -> None:
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, hidden, bias=bias),
            nn.ReLU(),
            nn.Linear(hidden, channels, bias=bias),
        )
        self.pool_types = tuple(pool_types)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        logits = None
        for kind in self.pool_types:
            if kind == "avg":
                d = F.avg_pool2d(x, (h, w), stride=(h, w))
            elif kind == "max":
                d = F.max_pool2d(x, (h, w), stride=(h, w))
            elif kind == "lp":
                d = F.lp_pool2d(x, 2, (h, w), stride=(h, w))
            else:  # lse
                d = torch.logsumexp(x.flatten(2), dim=2)
            o = self.mlp(d)
            logits = o if logits is None else logits + o
        gate = torch.sigmoid(logits)[:, :, None, None].expand_as(x)
        return x * gate


class SpatialGate(nn.Module):
    def __init__(
        self,
        kernel: int,
        order: str,
        bias: bool,
        bn: str | None,
        eps: float,
        momentum: float,
        relu: bool,
    ) -> None:
        super().__init__()
        self.order = order
        self.conv = nn.Conv2d(2, 1, kernel, padding=(kernel - 1) // 2, bias=bias)
        self.bn = nn.BatchNorm2d(1, eps=eps, momentum=momentum) if bn else None
        if self.bn is not None:
            _bn_mode(self.bn, bn)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cmax = torch.max(x, dim=1, keepdim=True)[0]
        cmean = torch.mean(x, dim=1, keepdim=True)
        m = torch.cat(
            (cmax, cmean) if self.order == "max_mean" else (cmean, cmax), dim=1
        )
        s = self.conv(m)
        if self.bn is not None:
            s = self.bn(s)
        if self.relu:
            s = F.relu(s)
        return x * torch.sigmoid(s)


class CBAM(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        pool_types: Sequence[str] = ("avg", "max"),
        mlp_bias: bool = True,
        spatial: bool = True,
        spatial_kernel: int = 7,
        channel_pool_order: str = "max_mean",
        spatial_bias: bool = False,
        spatial_bn: str | None = "train",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.01,
        spatial_relu: bool = False,
    ) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction, pool_types, mlp_bias)
        self.spatial = (
            SpatialGate(
                spatial_kernel,
                channel_pool_order,
                spatial_bias,
                spatial_bn,
                bn_eps,
                bn_momentum,
                spatial_relu,
            )
            if spatial
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel(x)
        return self.spatial(x) if self.spatial is not None else x


class NonLocal2d(nn.Module):
    """Embedded-Gaussian (or dot-product) non-local block, AlexHex7 layout."""

    def __init__(
        self,
        channels: int,
        inter_channels: int,
        mode: str = "embedded_gaussian",
        sub_sample: bool = True,
        pool_position: str = "after_proj",
        use_scale: bool = False,
        bias: bool = True,
        bn: str | None = "train",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        residual: bool = True,
    ) -> None:
        super().__init__()
        ci = inter_channels
        self.mode, self.ci, self.residual = mode, ci, residual
        self.scale = 1.0 / math.sqrt(ci) if use_scale else 1.0
        self.pool_first = sub_sample and pool_position == "before_proj"
        self.pool = nn.MaxPool2d(2) if self.pool_first else None
        self.theta = nn.Conv2d(channels, ci, 1, bias=bias)
        if sub_sample and not self.pool_first:
            self.phi = nn.Sequential(
                nn.Conv2d(channels, ci, 1, bias=bias), nn.MaxPool2d(2)
            )
            self.g = nn.Sequential(
                nn.Conv2d(channels, ci, 1, bias=bias), nn.MaxPool2d(2)
            )
        else:
            self.phi = nn.Conv2d(channels, ci, 1, bias=bias)
            self.g = nn.Conv2d(channels, ci, 1, bias=bias)
        if bn:
            self.W = nn.Sequential(
                nn.Conv2d(ci, channels, 1, bias=bias),
                nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum),
            )
            _bn_mode(self.W[1], bn)
        else:
            self.W = nn.Conv2d(ci, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        kv = self.pool(x) if self.pool is not None else x
        g_x = self.g(kv).view(n, self.ci, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(n, self.ci, -1).permute(0, 2, 1)
        phi_x = self.phi(kv).view(n, self.ci, -1)
        f = torch.matmul(theta_x, phi_x)
        if self.mode == "embedded_gaussian":
            attn = F.softmax(f * self.scale if self.scale != 1.0 else f, dim=-1)
        else:  # dot_product
            attn = f / f.size(-1)
        y = torch.matmul(attn, g_x)
        y = y.permute(0, 2, 1).contiguous().view(n, self.ci, h, w)
        z = self.W(y)
        return z + x if self.residual else z


class CGNL(nn.Module):
    """Compact generalized non-local block, dot kernel (Yue's SpatialCGNL)."""

    def __init__(
        self,
        channels: int,
        planes: int,
        groups: int = 8,
        use_scale: bool = False,
        norm: str | None = "gn",
        gn_groups: int | None = None,
        eps: float = 1e-5,
        bn_momentum: float = 0.1,
        bias: bool = False,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.groups, self.use_scale, self.residual = groups, use_scale, residual
        self.t = nn.Conv2d(channels, planes, 1, bias=bias)
        self.p = nn.Conv2d(channels, planes, 1, bias=bias)
        self.g = nn.Conv2d(channels, planes, 1, bias=bias)
        self.z = nn.Conv2d(planes, channels, 1, groups=groups, bias=False)
        self.gn = self.bn = None
        if norm == "gn":
            self.gn = nn.GroupNorm(gn_groups or groups, channels, eps=eps)
        elif norm in ("bn_train", "bn_eval"):
            self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=bn_momentum)
            _bn_mode(self.bn, "eval" if norm == "bn_eval" else "train")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, _h, _w = x.shape
        t, p, g = self.t(x), self.p(x), self.g(x)
        shape = (n, self.groups, -1)  # each group's channels and positions flattened
        t3, p3, g3 = t.reshape(shape), p.reshape(shape), g.reshape(shape)
        s = (p3 * g3).sum(dim=2, keepdim=True)
        if self.use_scale:
            s = s / math.sqrt(p3.shape[2])
        y = (s * t3).view_as(t)
        z = self.z(y)
        if self.gn is not None:
            z = self.gn(z)
        elif self.bn is not None:
            z = self.bn(z)
        return z + x if self.residual else z


class _KeyValue(nn.Module):
    def __init__(
        self,
        in_channels: int,
        planes: int,
        out_channels: int,
        bias: bool,
        bn: str | None,
        eps: float,
        momentum: float,
    ) -> None:
        super().__init__()
        self.phi = nn.Conv2d(in_channels, planes, 1, bias=bias)
        self.g = nn.Conv2d(in_channels, planes, 1, bias=bias)
        self.bn = (
            nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum) if bn else None
        )
        if self.bn is not None:
            _bn_mode(self.bn, bn)


class CrossLayerNL(nn.Module):
    """Cross-layer non-local (CNL): queries from x_q, keys/values from each x_kv."""

    def __init__(
        self,
        q_channels: int,
        kv_channels: Sequence[int],
        planes: int,
        use_scale: bool = True,
        bias: bool = False,
        bn: str | None = "train",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        layout: str = "transpose",
        out_proj: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.planes, self.layout, self.residual = planes, layout, residual
        self.scale = 1.0 / math.sqrt(planes) if use_scale else 1.0
        self.theta = nn.Conv2d(q_channels, planes, 1, bias=bias)
        self.W = nn.Conv2d(planes, q_channels, 1, bias=bias) if out_proj else None
        self.kv = nn.ModuleList(
            _KeyValue(c, planes, q_channels, bias, bn, bn_eps, bn_momentum)
            for c in kv_channels
        )

    def forward(self, x_q: torch.Tensor, *x_kv: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x_q.shape
        q = self.theta(x_q).view(n, self.planes, -1).permute(0, 2, 1)
        out = x_q if self.residual else None
        for layer, x in zip(self.kv, x_kv):
            k = layer.phi(x).view(n, self.planes, -1)
            v = layer.g(x).view(n, self.planes, -1).permute(0, 2, 1)
            attn = F.softmax(torch.bmm(q, k) * self.scale, dim=-1)
            o = torch.bmm(attn, v)
            if self.layout == "transpose":
                o = o.permute(0, 2, 1).contiguous()
            o = o.view(n, self.planes, h, w)
            z = self.W(o) if self.W is not None else o
            if layer.bn is not None:
                z = layer.bn(z)
            out = z if out is None else out + z
        return out


# ---------------------------------------------------------------------------
# factory and parameter loading


class _Transform(nn.Module):
    def __init__(self, channels: int, planes: int, eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, planes, 1)
        self.ln = nn.LayerNorm([planes, 1, 1], eps=eps)
        self.conv2 = nn.Conv2d(planes, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.ln(self.conv1(x)), inplace=True))


class GlobalContext(nn.Module):
    """GC block (mmcv ContextBlock), with refattn's parameter names."""

    def __init__(self, channels: int, planes: int, pooling_type: str,
                 fusion_types: Sequence[str], eps: float) -> None:
        super().__init__()
        self.pooling_type = pooling_type
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.channel_add = (_Transform(channels, planes, eps)
                            if "channel_add" in fusion_types else None)
        self.channel_mul = (_Transform(channels, planes, eps)
                            if "channel_mul" in fusion_types else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.pooling_type == "att":
            a = torch.softmax(self.conv_mask(x).view(n, 1, h * w), dim=-1)
            context = torch.matmul(x.view(n, c, h * w), a.transpose(1, 2))
            context = context.view(n, c, 1, 1)
        else:
            context = x.mean((2, 3), keepdim=True)
        out = x
        if self.channel_mul is not None:
            out = out * torch.sigmoid(self.channel_mul(context))
        if self.channel_add is not None:
            out = out + self.channel_add(context)
        return out


def input_order(block: str, shapes: Mapping[str, Shape]) -> list[str]:
    """The refattn input names in the order the module's forward takes them."""
    if block == "cross_layer":
        kv = (
            ["x_kv"]
            if "x_kv" in shapes
            else sorted(
                (k for k in shapes if k.startswith("x_kv.")), key=lambda k: int(k[5:])
            )
        )
        return ["x_q", *kv]
    return ["x"]


def make_module(block: str, cfg: Any, shapes: Mapping[str, Shape]) -> nn.Module:
    """The PyTorch module equivalent to refattn's `block` with resolved `cfg`."""
    c = _as_dict(cfg)
    order = input_order(block, shapes)
    cin = shapes[order[0]][1]
    if block == "conv1x1":
        return nn.Conv2d(
            cin,
            c["out_channels"],
            1,
            stride=c["stride"],
            padding=c["padding"],
            groups=c["groups"],
            bias=c["bias"],
        )
    if block == "mlpconv":
        return MLPConv(
            cin,
            c["channels"],
            c["kernel_size"],
            c["stride"],
            c["padding"],
            c["dilation"],
            c["groups"],
            c["bias"],
            c["relu_last"],
        )
    if block == "gap":
        return GAP(c["keepdim"])
    if block == "cbam":
        return CBAM(
            cin,
            c["reduction"],
            c["pool_types"],
            c["mlp_bias"],
            c["spatial"],
            c["spatial_kernel"],
            c["channel_pool_order"],
            c["spatial_bias"],
            c["spatial_bn"],
            c["bn_eps"],
            c["bn_momentum"],
            c["spatial_relu"],
        )
    if block == "non_local":
        _unsupported(block, "mode", c["mode"], ("embedded_gaussian", "dot_product"))
        if len(shapes["x"]) != 4:
            raise ValueError(
                f"x: the PyTorch non_local module is 2-D, got {shapes['x']}"
            )
        return NonLocal2d(
            cin,
            c["inter_channels"],
            c["mode"],
            c["sub_sample"],
            c["pool_position"],
            c["use_scale"],
            c["bias"],
            c["bn"],
            c["bn_eps"],
            c["bn_momentum"],
            c["residual"],
        )
    if block == "cgnl":
        _unsupported(block, "kernel", c["kernel"], ("dot",))
        return CGNL(
            cin,
            c["planes"],
            c["groups"],
            c["use_scale"],
            c["norm"],
            c["gn_groups"],
            c["eps"],
            c["bn_momentum"],
            c["bias"],
            c["residual"],
        )
    if block == "cross_layer":
        _unsupported(block, "layout", c["layout"], ("transpose", "official_noperm"))
        return CrossLayerNL(
            cin,
            [shapes[k][1] for k in order[1:]],
            c["planes"],
            c["use_scale"],
            c["bias"],
            c["bn"],
            c["bn_eps"],
            c["bn_momentum"],
            c["layout"],
            c["out_proj"],
            c["residual"],
        )
    if block == "gc":
        return GlobalContext(cin, c["planes"], c["pooling_type"], c["fusion_types"],
                             c["ln_eps"])
    raise ValueError(f"block: no PyTorch benchmark module for {block!r}")


def torch_name(block: str, name: str) -> str:
    """refattn canonical parameter/buffer name -> the module's state_dict name."""
    if block == "cbam":
        head, _, leaf = name.rpartition(".")
        return (
            {
                "mlp.fc1": "channel.mlp.1",
                "mlp.fc2": "channel.mlp.3",
                "spatial.conv": "spatial.conv",
                "spatial.bn": "spatial.bn",
            }[head]
            + "."
            + leaf
        )
    if block == "non_local":
        head, _, leaf = name.rpartition(".")
        return {"W_bn": "W.1"}.get(head, head) + "." + leaf
    if block == "cross_layer" and name.startswith("kv"):
        index, _, rest = name[2:].partition(".")
        return f"kv.{index}.{rest}"
    return name


def _fix_nested_names(block: str, module: nn.Module, name: str) -> str:
    """Sequential wrappers add an index (non_local: phi.0, g.0, W.0)."""
    keys = module.state_dict().keys()
    if name in keys:
        return name
    head, _, leaf = name.rpartition(".")
    alt = f"{head}.0.{leaf}"
    if alt in keys:
        return alt
    raise KeyError(f"{block}: refattn parameter maps to {name!r}, not in the module")


def load_refattn_params(
    module: nn.Module, block: str, tensors: Mapping[str, Any]
) -> None:
    """Copy refattn params and state (host arrays or tensors) into `module`,
    reshaping to the module's shapes (e.g. a (O, C) matrix into (O, C, 1, 1));
    every module entry must be covered."""
    sd = module.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, value in tensors.items():
            key = _fix_nested_names(block, module, torch_name(block, name))
            target = sd[key]
            src = torch.as_tensor(value).to(dtype=target.dtype).reshape(target.shape)
            target.copy_(src)
            loaded.add(key)
    missing = [
        k for k in sd if k not in loaded and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise KeyError(f"{block}: module entries not loaded from refattn: {missing}")
