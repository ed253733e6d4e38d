"""CGNL anchors as PyTorch modules, in the structure of the anchor classes.

KaiyuYue/cgnl-network.pytorch ``model/resnet.py``:

* ``SpatialCGNL(inplanes, planes, use_scale=False, groups=None)``: bias-free
  1x1 convs ``t``, ``p``, ``g`` (C -> P), the dot kernel evaluated per group
  with two ``bmm`` calls on ``(b, 1, c·h·w)`` views (the groups come from
  ``torch.split`` of the P channels into chunks of ``int(P / groups)``; with
  ``groups=1`` the whole P channels are one group, and the constructor
  default ``groups=None`` crashes in ``nn.Conv2d``), ``z`` a grouped
  1x1 conv P -> C (``groups`` groups, no bias), ``gn = GroupNorm(groups, C)``
  and the residual.  ``use_scale`` divides each group's scalar by
  ``sqrt(cg·h·w)``.
* ``SpatialCGNLx(..., order=2)``: the same structure with the Gaussian RBF
  kernel by its Taylor expansion: for q = 0..order it concatenates
  ``sqrt(α_q) t^q`` and ``sqrt(α_q) p^q`` (α_q = exp(−2γ) (2γ)^q / q!, the
  constant-beta approximation), ``att = bmm(p_taylor, g)`` gives the Q+1
  moments and ``bmm(att, t_taylor)`` sums the series.

state_dict keys ``t.weight``, ``p.weight``, ``g.weight`` (P, C, 1, 1),
``z.weight`` (C, P/G, 1, 1), ``gn.weight``, ``gn.bias`` (C,): identical to
refattn's canonical names (``refattn.blocks.cgnl.anchor_names`` is the
identity).

Departures from the anchor source, none of which changes the math of a
float64 module: the anchor builds γ as ``torch.Tensor(1).fill_(1e-4)``
(default dtype, float32) and moves α to the GPU with ``.cuda()``; the ports
here compute α in the dtype and on the device of ``t`` (so they run on the
CPU in float64), and take γ (hard-coded 1e-4 in the anchor), the order and
the GroupNorm eps from the config so that larger-γ cases can be compared.
The anchor's float32 α is the separate buggy factory
``make_yue_gaussian_alpha_float32``.  Every module also records, detached,
``last_s`` (refattn's ``aux.s``: (N, G) for the dot kernel, (N, G, Q+1)
moments without α for the Gaussian one) and ``last_y`` (``aux.y``, the
attended features before ``z``, (N, P, H, W)); neither is in the anchor or
touches the state_dict.

Factories take the config dict (``refattn.blocks.spec.config_to_dict`` of a
resolved ``CGNLConfig``: ``planes`` and ``gn_groups`` are ints) plus the
input channel count C, as ``channels`` or through ``input_shapes['x']`` (what
``refattn.adapters.torch`` passes).  A factory raises ValueError for a config
its anchor cannot express.  Modules are float64.

Also here:

* ``SeedNotesKernel``: the seed notes' ``kernel`` method as given there (the
  dot kernel of ``SpatialCGNL`` for one group: ``bmm(p, g)``, optional
  ``/ sqrt(c·h·w)``, ``bmm(att, t)``).
* ``ReferenceCGNL`` (``make_reference``): not an anchor; every refattn option
  (both kernels, beta 'const' / 'per_element', biases, GroupNorm with any
  gn_groups, batch norm, no norm, no residual, 1-3 spatial dims) with the
  canonical names, written the direct PyTorch way (reshape to (N, G, M),
  einsum, an explicit loop over the Taylor terms) as an independent check of
  the option combinations the anchor cannot express.

Known-buggy variants (anchor structure and names, for the validation tests;
each disagrees with refattn):

* ``make_yue_gaussian_alpha_float32``: ``SpatialCGNLx`` with α computed in
  float32 as the anchor's ``torch.Tensor(1)`` γ does, inside a float64
  model.  Each α_q then carries a relative error up to 2^-24 ≈ 6e-8.  At the
  anchor's γ = 1e-4 the error of α_0 rescales the dominant q = 0 offset of y:
  the attended features (``last_y``) are off by ~4e-8 relative, the output
  after GroupNorm by ~1e-10 (both far outside float64 agreement) and the
  gradients by ~3e-8, inside their conditioning-widened fixture tolerance
  (docs/blocks/cgnl.md); with γ = 0.1 and order 3 the output, ``last_y``
  and every gradient but GN's beta differ by ~1e-8 to 1e-7 relative.  The
  moments ``last_s`` carry no α and agree.
* ``make_yue_scale_all_planes``: ``use_scale`` divides by ``sqrt(P·h·w)`` (the
  whole planes count) instead of the per-group ``sqrt(cg·h·w)``: every s is
  too small by sqrt(G).  ``aux.s`` differs by exactly that factor; the
  aligned GroupNorm cancels a per-group scale up to eps, so the output and
  the t/z gradients move only at the eps level (still far outside float64
  agreement) while the p/g gradients (whose size is eps/s²) differ plainly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "ReferenceCGNL",
    "SeedNotesKernel",
    "SpatialCGNL",
    "SpatialCGNLx",
    "make_reference",
    "make_yue",
    "make_yue_gaussian",
    "make_yue_gaussian_alpha_float32",
    "make_yue_scale_all_planes",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# ---------------------------------------------------------------------------
# KaiyuYue/cgnl-network.pytorch


class SpatialCGNL(nn.Module):
    """``SpatialCGNL``: the dot-product kernel per channel group.

    ``scale_all_planes`` plants the known scale bug (divide by sqrt(P·h·w)).
    """

    def __init__(self, inplanes: int, planes: int, use_scale: bool = False,
                 groups: int | None = None, *, eps: float = 1e-5,
                 scale_all_planes: bool = False) -> None:
        self.use_scale = use_scale
        self.groups = groups
        self.scale_all_planes = scale_all_planes
        super().__init__()
        self.t = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.p = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.g = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.z = nn.Conv2d(planes, inplanes, kernel_size=1, stride=1,
                           groups=self.groups, bias=False)
        self.gn = nn.GroupNorm(num_groups=self.groups, num_channels=inplanes,
                               eps=eps)
        self.last_s: torch.Tensor | None = None
        self.last_y: torch.Tensor | None = None
        self._s: list[torch.Tensor] = []

    def kernel(self, t, p, g, b, c, h, w, c_scale=None):
        """The linear kernel (dot product) of one group; ``c_scale`` is the
        channel count the scale uses (the group's own unless the bug is on)."""
        t = t.view(b, 1, c * h * w)
        p = p.view(b, 1, c * h * w)
        g = g.view(b, c * h * w, 1)
        att = torch.bmm(p, g)
        if self.use_scale:
            att = att.div(((c if c_scale is None else c_scale) * h * w) ** 0.5)
        self._s.append(att.detach().reshape(b))
        x = torch.bmm(att, t)
        x = x.view(b, c, h, w)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        t = self.t(x)
        p = self.p(x)
        g = self.g(x)
        b, c, h, w = t.size()
        self._s = []
        c_scale = c if self.scale_all_planes else None
        if self.groups and self.groups > 1:
            _c = int(c / self.groups)
            ts = torch.split(t, split_size_or_sections=_c, dim=1)
            ps = torch.split(p, split_size_or_sections=_c, dim=1)
            gs = torch.split(g, split_size_or_sections=_c, dim=1)
            _t_sequences = []
            for i in range(self.groups):
                _x = self.kernel(ts[i], ps[i], gs[i], b, _c, h, w, c_scale)
                _t_sequences.append(_x)
            x = torch.cat(_t_sequences, dim=1)
        else:
            x = self.kernel(t, p, g, b, c, h, w, c_scale)
        self.last_s = torch.stack(self._s, dim=1)  # (N, G)
        self.last_y = x.detach()
        x = self.z(x)
        x = self.gn(x) + residual
        return x


class SpatialCGNLx(nn.Module):
    """``SpatialCGNLx``: the Gaussian RBF kernel by its order-Q Taylor series.

    ``alpha_dtype=torch.float32`` reproduces the anchor's float32 α (a bug in
    a float64 model); None computes α in the dtype of ``t`` (faithful port).
    ``scale_all_planes`` plants the scale bug.
    """

    def __init__(self, inplanes: int, planes: int, use_scale: bool = False,
                 groups: int | None = None, order: int = 2, *, gamma: float = 1e-4,
                 eps: float = 1e-5, alpha_dtype: torch.dtype | None = None,
                 scale_all_planes: bool = False) -> None:
        self.use_scale = use_scale
        self.groups = groups
        self.order = order
        self.gamma = gamma
        self.alpha_dtype = alpha_dtype
        self.scale_all_planes = scale_all_planes
        super().__init__()
        self.t = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.p = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.g = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.z = nn.Conv2d(planes, inplanes, kernel_size=1, stride=1,
                           groups=self.groups, bias=False)
        self.gn = nn.GroupNorm(num_groups=self.groups, num_channels=inplanes,
                               eps=eps)
        self.last_s: torch.Tensor | None = None
        self.last_y: torch.Tensor | None = None
        self._s: list[torch.Tensor] = []

    def kernel(self, t, p, g, b, c, h, w, c_scale=None):
        """The non-linear kernel (Gaussian RBF) of one group."""
        t = t.view(b, 1, c * h * w)
        p = p.view(b, 1, c * h * w)
        g = g.view(b, c * h * w, 1)
        # the anchor: torch.Tensor(1).fill_(1e-4), i.e. the default dtype
        dtype = t.dtype if self.alpha_dtype is None else self.alpha_dtype
        gamma = torch.full((1,), self.gamma, dtype=dtype, device=t.device)
        # beta: the constant exp(-2 gamma) in place of exp(-gamma(|t|^2 + |p|^2))
        beta = torch.exp(-2 * gamma)
        t_taylor = []
        p_taylor = []
        sqrt_alphas = []
        for order in range(self.order + 1):
            alpha = torch.mul(
                torch.div(torch.pow((2 * gamma), order), math.factorial(order)), beta
            )
            alpha = torch.sqrt(alpha)  # the anchor moves it with .cuda() here
            _t = t.pow(order).mul(alpha)
            _p = p.pow(order).mul(alpha)
            t_taylor.append(_t)
            p_taylor.append(_p)
            sqrt_alphas.append(alpha.to(t.dtype))
        t_taylor = torch.cat(t_taylor, dim=1)
        p_taylor = torch.cat(p_taylor, dim=1)
        att = torch.bmm(p_taylor, g)
        if self.use_scale:
            att = att.div(((c if c_scale is None else c_scale) * h * w) ** 0.5)
        moments = att.detach().reshape(b, self.order + 1) / torch.cat(sqrt_alphas)
        self._s.append(moments)
        att = att.view(b, 1, int(self.order + 1))
        x = torch.bmm(att, t_taylor)
        x = x.view(b, c, h, w)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        t = self.t(x)
        p = self.p(x)
        g = self.g(x)
        b, c, h, w = t.size()
        self._s = []
        c_scale = c if self.scale_all_planes else None
        if self.groups and self.groups > 1:
            _c = int(c / self.groups)
            ts = torch.split(t, split_size_or_sections=_c, dim=1)
            ps = torch.split(p, split_size_or_sections=_c, dim=1)
            gs = torch.split(g, split_size_or_sections=_c, dim=1)
            _t_sequences = []
            for i in range(self.groups):
                _x = self.kernel(ts[i], ps[i], gs[i], b, _c, h, w, c_scale)
                _t_sequences.append(_x)
            x = torch.cat(_t_sequences, dim=1)
        else:
            x = self.kernel(t, p, g, b, c, h, w, c_scale)
        self.last_s = torch.stack(self._s, dim=1)  # (N, G, Q+1)
        self.last_y = x.detach()
        x = self.z(x)
        x = self.gn(x) + residual
        return x


class SeedNotesKernel:
    """The seed notes' CGNL ``kernel`` method, as given there."""

    def __init__(self, use_scale: bool = False) -> None:
        self.use_scale = use_scale

    def kernel(self, t, p, g, b, c, h, w):
        """The linear kernel (dot production).
        Args:
            t: output of conv theata
            p: output of conv phi
            g: output of conv g
            b: batch size
            c: channels number
            h: height of featuremaps
            w: width of featuremaps
        """
        t = t.view(b, 1, c * h * w)
        p = p.view(b, 1, c * h * w)
        g = g.view(b, c * h * w, 1)

        att = torch.bmm(p, g)

        if self.use_scale:
            att = att.div((c*h*w)**0.5)

        x = torch.bmm(att, t)
        x = x.view(b, c, h, w)

        return x


# ---------------------------------------------------------------------------
# factories


def _require(anchor: str, config: dict[str, Any], **wanted: Any) -> None:
    for key, allowed in wanted.items():
        value = config[key]
        ok = value in allowed if isinstance(allowed, list) else value == allowed
        if not ok:
            raise ValueError(
                f"config: the {anchor} anchor has no switch for {key}; it needs "
                f"{key}={allowed!r}, got {config[key]!r}"
            )


def _dims(config: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, planes, spatial rank) from the config and the input shape."""
    shape = (config.get("input_shapes") or {}).get("x")
    if "channels" in config:
        channels = int(config["channels"])
    elif shape is not None:
        channels = int(shape[1])
    else:
        raise ValueError(
            "config: the CGNL anchor factories need 'channels' (x.shape[1]) or "
            "'input_shapes' next to the config keys"
        )
    rank = int(config.get("spatial_rank", len(shape) - 2 if shape is not None else 2))
    if rank not in (1, 2, 3):
        raise ValueError(f"config: spatial_rank must be 1, 2 or 3, got {rank!r}")
    planes = config["planes"]
    planes = channels // 2 if planes is None else int(planes)
    return channels, planes, rank


def _anchor_dims(anchor: str, config: dict[str, Any]) -> tuple[int, int]:
    _require(anchor, config, bias=False, norm="gn", residual=True)
    channels, planes, rank = _dims(config)
    if rank != 2:
        raise ValueError(f"config: {anchor} is 2-D only, got spatial_rank={rank}")
    gn_groups = config["gn_groups"]
    if gn_groups is not None and gn_groups != config["groups"]:
        raise ValueError(
            f"config: the {anchor} anchor's GroupNorm has `groups` groups; it needs "
            f"gn_groups=None or {config['groups']}, got {gn_groups!r}"
        )
    return channels, planes


def _spatial_cgnl(config: dict[str, Any], **bug: Any) -> nn.Module:
    _require("SpatialCGNL", config, kernel="dot")
    channels, planes = _anchor_dims("SpatialCGNL", config)
    return SpatialCGNL(channels, planes, config["use_scale"], config["groups"],
                       eps=config["eps"], **bug).double()


def _spatial_cgnlx(config: dict[str, Any], **bug: Any) -> nn.Module:
    _require("SpatialCGNLx", config, kernel="gaussian", beta="const")
    channels, planes = _anchor_dims("SpatialCGNLx", config)
    return SpatialCGNLx(channels, planes, config["use_scale"], config["groups"],
                        config["order"], gamma=config["gamma"], eps=config["eps"],
                        **bug).double()


def make_yue(config: dict[str, Any]) -> nn.Module:
    """``SpatialCGNL(C, planes, use_scale, groups)`` (preset ``yue``)."""
    return _spatial_cgnl(config)


def make_yue_gaussian(config: dict[str, Any]) -> nn.Module:
    """``SpatialCGNLx(C, planes, use_scale, groups, order)`` (``yue_gaussian``),
    α in the module's dtype."""
    return _spatial_cgnlx(config)


def make_yue_gaussian_alpha_float32(config: dict[str, Any]) -> nn.Module:
    """BUG: ``SpatialCGNLx`` with the anchor's float32 α in a float64 model."""
    return _spatial_cgnlx(config, alpha_dtype=torch.float32)


def make_yue_scale_all_planes(config: dict[str, Any]) -> nn.Module:
    """BUG: ``use_scale`` by sqrt(P·h·w) instead of sqrt(cg·h·w) (either kernel)."""
    if not config["use_scale"]:
        raise ValueError("config: the scale bug needs use_scale=True, got False")
    if config["kernel"] == "dot":
        return _spatial_cgnl(config, scale_all_planes=True)
    return _spatial_cgnlx(config, scale_all_planes=True)


# ---------------------------------------------------------------------------
# a direct PyTorch version of every refattn option (canonical names)


class ReferenceCGNL(nn.Module):
    """Every option of refattn's CGNL block, with the canonical names."""

    def __init__(self, config: dict[str, Any], channels: int, planes: int,
                 rank: int) -> None:
        super().__init__()
        self.cfg = config
        conv, bias, G = _CONV[rank], config["bias"], config["groups"]
        self.planes = planes
        self.t = conv(channels, planes, 1, bias=bias)
        self.p = conv(channels, planes, 1, bias=bias)
        self.g = conv(channels, planes, 1, bias=bias)
        self.z = conv(planes, channels, 1, groups=G, bias=False)
        norm = config["norm"]
        if norm == "gn":
            gn_groups = config["gn_groups"] or G
            self.gn = nn.GroupNorm(gn_groups, channels, eps=config["eps"])
        elif norm is not None:
            self.bn = _BN[rank](channels, eps=config["eps"],
                                momentum=config["bn_momentum"])
        self.last_s: torch.Tensor | None = None
        self.last_y: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n, G = x.shape[0], cfg["groups"]
        t, p, g = (m(x).reshape(n, G, -1) for m in (self.t, self.p, self.g))
        M = t.shape[-1]
        c = 1.0 / math.sqrt(M) if cfg["use_scale"] else 1.0
        if cfg["kernel"] == "dot":
            s = c * torch.einsum("nkm,nkm->nk", p, g)
            y = s[:, :, None] * t
        else:
            gamma, Q = cfg["gamma"], cfg["order"]
            exact = cfg["beta"] == "per_element"
            if exact:
                g = torch.exp(-gamma * p**2) * g
            s = torch.stack([c * (p**q * g).sum(-1) for q in range(Q + 1)], dim=-1)
            y = torch.zeros_like(t)
            for q in range(Q + 1):
                alpha = (2 * gamma) ** q / math.factorial(q)
                if not exact:
                    alpha *= math.exp(-2 * gamma)
                y = y + alpha * s[:, :, q : q + 1] * t**q
            if exact:
                y = torch.exp(-gamma * t**2) * y
        self.last_s = s.detach()
        y = y.reshape((n, self.planes) + tuple(x.shape[2:]))
        self.last_y = y.detach()
        z = self.z(y)
        if cfg["norm"] == "gn":
            z = self.gn(z)
        elif cfg["norm"] is not None:
            z = self.bn(z)
        return z + x if cfg["residual"] else z


def make_reference(config: dict[str, Any]) -> nn.Module:
    """Every refattn option (plus ``channels`` and optionally ``spatial_rank``);
    batch norm in eval mode for norm='bn_eval'."""
    channels, planes, rank = _dims(config)
    module = ReferenceCGNL(config, channels, planes, rank).double()
    module.train(config["norm"] != "bn_eval")
    return module

