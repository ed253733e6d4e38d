"""Non-local block anchors as PyTorch modules, in the structure of each anchor.

Their ``state_dict`` keys are the anchors' own; ``refattn.blocks.non_local.
anchor_names(preset, cfg, input_shapes)`` maps refattn's canonical keys onto
them:

* AlexHex7/Non-local_pytorch ``lib/non_local_{embedded_gaussian,gaussian,
  dot_product,concatenation}.py``: ``NONLocalBlockND`` is the four split
  files' ``_NonLocalBlockND`` in one class whose ``mode`` picks the file (the
  state_dict names and the math of each mode equal that file's).  ``g`` (and
  ``phi``) become ``Sequential(conv, max_pool)`` when sub-sampling (keys
  ``g.0.*``, ``phi.0.*``; in gaussian mode ``phi`` is the bare pool and has no
  parameters), ``W = Sequential(conv, BN)`` (``W.0.*``, ``W.1.*``) or, with
  ``bn_layer=False``, a single conv (``W.*``); concatenation adds
  ``concat_project = Sequential(Conv2d(2Ci, 1, 1, bias=False), ReLU)``
  (``concat_project.0.weight``), a 2-D conv in every dimension.
  ``forward(x, return_nl_map=False)``.
* facebookresearch/video-nonlocal-net ``lib/models/nonlocal_helper.py``
  (Caffe2): ``SpacetimeNonLocal``, a PyTorch port of ``spacetime_nonlocal``
  plus the residual ``Sum`` of ``add_nonlocal``.  ONE max-pool of the input
  feeds both phi and g (pool before the projection), ``dim_inner ** -0.5``
  scaling before the softmax, the no-softmax branch divides by the key count
  (a constant), ``g`` times the transposed attention gives ``(N, Ci, Lq)``
  directly.  State-dict keys and the Caffe2 blobs they hold (``<p>`` is the
  block's prefix, e.g. ``nonlocal_conv3_1``):

      theta.weight, theta.bias   <p>_theta_w, <p>_theta_b
      phi.weight, phi.bias       <p>_phi_w, <p>_phi_b
      g.weight, g.bias           <p>_g_w, <p>_g_b
      out.weight, out.bias       <p>_out_w, <p>_out_b
      bn.weight, bn.bias         <p>_bn_s, <p>_bn_b
      bn.running_mean            <p>_bn_rm
      bn.running_var             <p>_bn_riv (the running variance Caffe2's
                                 SpatialBN updates, despite the 'iv' name)

  Conv weights keep Caffe2's layout (O, I, 1, 1, 1).  Caffe2 writes BN
  momentum as the weight of the OLD running value (0.9); the port takes the
  PyTorch convention ``1 - 0.9 = 0.1``, i.e. the config's ``bn_momentum``.
* KaiyuYue/cgnl-network.pytorch ``model/resnet.py`` ``SpatialNL``: bias-free
  ``t``, ``p``, ``g``, ``z`` 1x1 Conv2d, ``bn`` BatchNorm2d, softmax over dim
  2 (the keys), scale ``1/sqrt(planes)``, residual.  2-D only.
* ``ReferenceNonLocal`` (``make_reference``): not an anchor; every refattn
  option (modes, both pool positions, scale, biases, BN, residual) with
  refattn's canonical names, written the direct PyTorch way (einsum
  contractions; concatenation through the explicit (N, 2Ci, Lq, Lk) tensor)
  as an independent check of the option combinations no anchor expresses.

Factories take the config dict (``refattn.blocks.spec.config_to_dict`` of a
resolved ``NonLocalConfig``, so ``inter_channels`` is an int) plus two
input-derived values: ``channels`` (C = x.shape[1]) and ``spatial_rank``
(x.ndim - 2; ``make_cgnl_repo`` accepts only 2 and defaults to it).  What
``refattn validate --torch`` adds (``in_channels`` and ``input_shapes``) is
enough too.  A
factory raises ValueError for a config its anchor cannot express.  Modules
are float64; ``bn='eval'`` returns the module in eval mode.  Every module
records its last attention map, detached, as ``last_attention``
((N, Lq, Lk), refattn's ``aux.attention``); that is not in the anchors and
does not touch the state_dict.

Known-buggy variants (AlexHex7 structure and names, for the validation tests;
each disagrees with refattn):

* ``make_alexhex7_softmax_over_queries``: softmax over dim 1, the QUERY axis
  (AlexHex7 #13 asked which; the popular port in shanglianlm0525/
  PyTorch-Networks uses ``nn.Softmax(dim=1)``).  Softmax modes only.  The
  attention (columns sum to 1 instead of rows), the output and every
  gradient differ.
* ``make_alexhex7_no_transpose``: ``y`` (N, Lq, Ci) reshaped to (N, Ci, *S)
  with ``view`` and no ``permute``: a scrambled y.  The attention agrees;
  the output and every gradient differ.
* ``make_alexhex7_divide_by_query_count``: dot-product / concatenation
  normalised by ``f.size(1)`` (N_q) instead of ``f.size(-1)`` (N_k).  With
  sub-sampling N_q != N_k; the attention is scaled by N_k / N_q, and with
  bn=None or 'eval' the output and every gradient differ plainly.  With
  bn='train' the batch statistics cancel the constant factor except through
  bn_eps, so how far the output moves depends on var(W y) against eps (from
  about 1e-6 relative to order 1): always outside a float64 tolerance, but
  the attention map is the tensor that shows the bug directly.
* ``make_alexhex7_view_with_c``: theta, phi and g viewed with C channels
  instead of Ci, as shanglianlm0525/PyTorch-Networks (issue #45) does for
  all three.  When Ci·L is not divisible by C the view raises a
  RuntimeError; otherwise the block runs and computes attention over
  "positions" that are C/Ci-fold chunks of the real ones: the attention has
  the wrong shape and the output and gradients differ.  (Viewing only phi
  with C, as the issue's one-line quote suggests, would fail at the matmul.)
  Embedded-Gaussian and dot-product modes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "NONLocalBlockND",
    "ReferenceNonLocal",
    "SpacetimeNonLocal",
    "SpatialNL",
    "make_alexhex7",
    "make_alexhex7_divide_by_query_count",
    "make_alexhex7_no_transpose",
    "make_alexhex7_softmax_over_queries",
    "make_alexhex7_view_with_c",
    "make_cgnl_repo",
    "make_facebook",
    "make_reference",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_KERNEL = {1: 2, 2: (2, 2), 3: (1, 2, 2)}


# ---------------------------------------------------------------------------
# AlexHex7/Non-local_pytorch


class NONLocalBlockND(nn.Module):
    """AlexHex7's ``_NonLocalBlockND``; ``mode`` selects the split file.

    ``bug`` plants one of the known mistakes (None for the faithful module):
    'softmax_over_queries', 'no_transpose', 'divide_by_query_count',
    'view_with_c'.
    """

    def __init__(self, in_channels: int, inter_channels: int | None = None,
                 dimension: int = 3, sub_sample: bool = True, bn_layer: bool = True,
                 *, mode: str = "embedded_gaussian", bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1, bug: str | None = None) -> None:
        super().__init__()
        assert dimension in (1, 2, 3)
        self.mode, self.bug = mode, bug
        self.dimension = dimension
        self.sub_sample = sub_sample
        self.in_channels = in_channels
        self.inter_channels = inter_channels
        if self.inter_channels is None:
            self.inter_channels = in_channels // 2
            if self.inter_channels == 0:
                self.inter_channels = 1
        conv_nd, bn = _CONV[dimension], _BN[dimension]
        max_pool_layer = _POOL[dimension](kernel_size=_KERNEL[dimension])
        ci = self.inter_channels

        self.g = conv_nd(in_channels, ci, kernel_size=1, stride=1, padding=0)
        if bn_layer:
            self.W = nn.Sequential(
                conv_nd(ci, in_channels, kernel_size=1, stride=1, padding=0),
                bn(in_channels, eps=bn_eps, momentum=bn_momentum),
            )
            nn.init.constant_(self.W[1].weight, 0)
            nn.init.constant_(self.W[1].bias, 0)
        else:
            self.W = conv_nd(ci, in_channels, kernel_size=1, stride=1, padding=0)
            nn.init.constant_(self.W.weight, 0)
            nn.init.constant_(self.W.bias, 0)
        if mode != "gaussian":
            self.theta = conv_nd(in_channels, ci, kernel_size=1, stride=1, padding=0)
            self.phi = conv_nd(in_channels, ci, kernel_size=1, stride=1, padding=0)
        if mode == "concatenation":
            self.concat_project = nn.Sequential(
                nn.Conv2d(ci * 2, 1, 1, 1, 0, bias=False), nn.ReLU()
            )
        if sub_sample:
            self.g = nn.Sequential(self.g, max_pool_layer)
            if mode != "gaussian":
                self.phi = nn.Sequential(self.phi, max_pool_layer)
            else:
                self.phi = max_pool_layer
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, return_nl_map: bool = False) -> Any:
        batch_size = x.size(0)
        ci = self.inter_channels
        c_view = self.in_channels if self.bug == "view_with_c" else ci
        g_x = self.g(x).view(batch_size, c_view, -1)
        g_x = g_x.permute(0, 2, 1)

        if self.mode == "concatenation":
            theta_x = self.theta(x).view(batch_size, ci, -1, 1)
            phi_x = self.phi(x).view(batch_size, ci, 1, -1)
            h = theta_x.size(2)
            w = phi_x.size(3)
            theta_x = theta_x.repeat(1, 1, 1, w)
            phi_x = phi_x.repeat(1, 1, h, 1)
            concat_feature = torch.cat([theta_x, phi_x], dim=1)
            f = self.concat_project(concat_feature)
            b, _, h, w = f.size()
            f = f.view(b, h, w)
        else:
            if self.mode == "gaussian":
                theta_x = x.view(batch_size, self.in_channels, -1)
                theta_x = theta_x.permute(0, 2, 1)
                source = self.phi(x) if self.sub_sample else x
                phi_x = source.view(batch_size, self.in_channels, -1)
            else:
                theta_x = self.theta(x).view(batch_size, c_view, -1)
                theta_x = theta_x.permute(0, 2, 1)
                phi_x = self.phi(x).view(batch_size, c_view, -1)
            f = torch.matmul(theta_x, phi_x)

        if self.mode in ("embedded_gaussian", "gaussian"):
            dim = 1 if self.bug == "softmax_over_queries" else -1
            f_div_C = F.softmax(f, dim=dim)
        else:
            N = f.size(1) if self.bug == "divide_by_query_count" else f.size(-1)
            f_div_C = f / N
        self.last_attention = f_div_C.detach()

        y = torch.matmul(f_div_C, g_x)
        if self.bug != "no_transpose":
            y = y.permute(0, 2, 1)
        y = y.contiguous()
        y = y.view(batch_size, ci, *x.size()[2:])
        W_y = self.W(y)
        z = W_y + x
        if return_nl_map:
            return z, f_div_C
        return z


def _require(anchor: str, config: dict[str, Any], **wanted: Any) -> None:
    for key, allowed in wanted.items():
        if isinstance(allowed, list):
            ok = config[key] in allowed
        else:
            ok = config[key] == allowed
        if not ok:
            raise ValueError(
                f"config: the {anchor} anchor has no switch for {key}; it needs "
                f"{key}={allowed!r}, got {config[key]!r}"
            )


def _dims(config: dict[str, Any], default_rank: int | None = None) -> tuple[int, int]:
    """(channels, spatial_rank): the input-derived values the factories need,
    from ``channels``/``spatial_rank`` or from what ``refattn validate`` passes
    (``in_channels``, ``input_shapes``)."""
    shape = (config.get("input_shapes") or {}).get("x")
    channels = config.get("channels", config.get("in_channels"))
    if channels is None and shape is not None:
        channels = shape[1]
    if channels is None:
        raise ValueError(
            "config: the non-local anchor factories need 'channels' (x.shape[1]) "
            "next to the config keys"
        )
    rank = config.get("spatial_rank")
    if rank is None:
        rank = len(shape) - 2 if shape is not None else default_rank
    if rank not in (1, 2, 3):
        raise ValueError(
            "config: the non-local anchor factories need 'spatial_rank' "
            f"(x.ndim - 2) in 1, 2, 3 next to the config keys, got {rank!r}"
        )
    return int(channels), int(rank)


def _inter(config: dict[str, Any], channels: int) -> int:
    ci = config["inter_channels"]
    return max(channels // 2, 1) if ci is None else int(ci)


def _finish(module: nn.Module, config: dict[str, Any]) -> nn.Module:
    module = module.double()
    module.train(config["bn"] != "eval")
    return module


def _alexhex7(config: dict[str, Any], bug: str | None = None) -> nn.Module:
    _require("AlexHex7", config, use_scale=False, bias=True, residual=True)
    if config["sub_sample"]:
        _require("AlexHex7", config, pool_position="after_proj")
    channels, rank = _dims(config)
    module = NONLocalBlockND(
        channels, _inter(config, channels), rank, config["sub_sample"],
        config["bn"] is not None, mode=config["mode"], bn_eps=config["bn_eps"],
        bn_momentum=config["bn_momentum"], bug=bug,
    )
    return _finish(module, config)


def make_alexhex7(config: dict[str, Any]) -> nn.Module:
    """AlexHex7's block for ``config['mode']`` (plus ``channels``, ``spatial_rank``)."""
    return _alexhex7(config)


# ---------------------------------------------------------------------------
# facebookresearch/video-nonlocal-net (PyTorch port of the Caffe2 block)


class SpacetimeNonLocal(nn.Module):
    """``spacetime_nonlocal`` + ``add_nonlocal``'s residual, in PyTorch."""

    def __init__(self, dim_in: int, dim_inner: int, dimension: int = 3, *,
                 use_maxpool: bool = True, use_softmax: bool = True,
                 use_scale: bool = True, no_bias: bool = False, use_bn: bool = True,
                 bn_epsilon: float = 1e-5, bn_momentum: float = 0.1) -> None:
        super().__init__()
        conv = _CONV[dimension]
        self.dim_inner = dim_inner
        self.use_maxpool, self.use_softmax, self.use_scale = (
            use_maxpool, use_softmax, use_scale)
        self.theta = conv(dim_in, dim_inner, 1, bias=not no_bias)
        self.pool = _POOL[dimension](kernel_size=_KERNEL[dimension],
                                     stride=_KERNEL[dimension])
        self.phi = conv(dim_in, dim_inner, 1, bias=not no_bias)
        self.g = conv(dim_in, dim_inner, 1, bias=not no_bias)
        self.out = conv(dim_inner, dim_in, 1, bias=not no_bias)
        self.bn = _BN[dimension](dim_in, eps=bn_epsilon, momentum=bn_momentum) \
            if use_bn else None
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        theta = self.theta(x)
        max_pool = self.pool(x) if self.use_maxpool else x
        phi = self.phi(max_pool)
        g = self.g(max_pool)
        theta = theta.reshape(n, self.dim_inner, -1)  # (N, Ci, Lq)
        phi = phi.reshape(n, self.dim_inner, -1)  # (N, Ci, Lk)
        g = g.reshape(n, self.dim_inner, -1)  # (N, Ci, Lk)
        theta_phi = torch.bmm(theta.transpose(1, 2), phi)  # BatchMatMul trans_a
        if self.use_softmax:
            if self.use_scale:
                theta_phi = theta_phi * self.dim_inner ** -0.5
            p = F.softmax(theta_phi, dim=2)
        else:
            # ConstantFill ones, ReduceBackSum, broadcast Add, StopGradient, Div
            denom = torch.ones_like(theta_phi).sum(dim=2, keepdim=True).detach()
            p = theta_phi / denom
        self.last_attention = p.detach()
        t = torch.bmm(g, p.transpose(1, 2))  # BatchMatMul trans_b: (N, Ci, Lq)
        t_re = t.reshape((n, self.dim_inner) + tuple(x.shape[2:]))
        blob_out = self.out(t_re)
        if self.bn is not None:
            blob_out = self.bn(blob_out)
        return x + blob_out  # add_nonlocal: Sum([blob_in, blob_out])


def make_facebook(config: dict[str, Any]) -> nn.Module:
    """The facebook block (plus ``channels``, ``spatial_rank``; the official
    network is 3-D).  Modes embedded_gaussian (USE_SOFTMAX) and dot_product."""
    _require("facebook", config, mode=["embedded_gaussian", "dot_product"],
             residual=True)
    if config["sub_sample"]:
        _require("facebook", config, pool_position="before_proj")
    channels, rank = _dims(config)
    module = SpacetimeNonLocal(
        channels, _inter(config, channels), rank,
        use_maxpool=config["sub_sample"],
        use_softmax=config["mode"] == "embedded_gaussian",
        use_scale=config["use_scale"], no_bias=not config["bias"],
        use_bn=config["bn"] is not None, bn_epsilon=config["bn_eps"],
        bn_momentum=config["bn_momentum"],
    )
    return _finish(module, config)


# ---------------------------------------------------------------------------
# KaiyuYue/cgnl-network.pytorch SpatialNL


class SpatialNL(nn.Module):
    """The CGNL repo's non-local block (a port of facebook's, no sub-sampling)."""

    def __init__(self, inplanes: int, planes: int, use_scale: bool = False, *,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
        self.use_scale = use_scale
        super().__init__()
        self.t = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.p = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.g = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.softmax = nn.Softmax(dim=2)
        self.z = nn.Conv2d(planes, inplanes, kernel_size=1, stride=1, bias=False)
        self.bn = nn.BatchNorm2d(inplanes, eps=bn_eps, momentum=bn_momentum)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        t = self.t(x)
        p = self.p(x)
        g = self.g(x)
        b, c, h, w = t.size()
        t = t.view(b, c, -1).permute(0, 2, 1)
        p = p.view(b, c, -1)
        g = g.view(b, c, -1).permute(0, 2, 1)
        att = torch.bmm(t, p)
        if self.use_scale:
            att = att.div(c ** 0.5)
        att = self.softmax(att)
        self.last_attention = att.detach()
        x = torch.bmm(att, g)
        x = x.permute(0, 2, 1)
        x = x.contiguous()
        x = x.view(b, c, h, w)
        x = self.z(x)
        x = self.bn(x) + residual
        return x


def make_cgnl_repo(config: dict[str, Any]) -> nn.Module:
    """``SpatialNL(inplanes, planes, use_scale)`` (plus ``channels``)."""
    _require("cgnl_repo", config, mode="embedded_gaussian", sub_sample=False,
             bias=False, bn=["train", "eval"], residual=True)
    channels, rank = _dims(config, default_rank=2)
    if rank != 2:
        raise ValueError(f"config: SpatialNL is 2-D only, got spatial_rank={rank}")
    module = SpatialNL(channels, _inter(config, channels), config["use_scale"],
                       bn_eps=config["bn_eps"], bn_momentum=config["bn_momentum"])
    return _finish(module, config)


# ---------------------------------------------------------------------------
# SAGAN self-attention (= DANet's position attention module)


class SelfAttention(nn.Module):
    """SAGAN's attention layer: query and key 1x1 convs to C // 8, value to C,
    softmax over the keys, out = gamma * (value · attentionᵀ) + x."""

    def __init__(self, in_dim: int, qk_dim: int) -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(in_dim, qk_dim, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, qk_dim, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.size()
        query = self.query_conv(x).view(batch, -1, height * width).permute(0, 2, 1)
        key = self.key_conv(x).view(batch, -1, height * width)
        energy = torch.bmm(query, key)  # (B, HW, HW)
        attention = self.softmax(energy)
        self.last_attention = attention.detach()
        value = self.value_conv(x).view(batch, -1, height * width)
        out = torch.bmm(value, attention.permute(0, 2, 1))
        out = out.view(batch, channels, height, width)
        return self.gamma * out + x


def make_sagan(config: dict[str, Any]) -> nn.Module:
    """SAGAN's ``Self_Attn(in_dim)`` (plus ``channels``): 2-D, embedded Gaussian
    without scale or pooling, biased projections, value width C."""
    _require("sagan", config, mode="embedded_gaussian", sub_sample=False,
             use_scale=False, bias=True, out_proj=False, bn=None, gamma=True,
             residual=True)
    channels, rank = _dims(config, default_rank=2)
    if rank != 2:
        raise ValueError(f"config: SAGAN's layer is 2-D only, got spatial_rank={rank}")
    return _finish(SelfAttention(channels, _inter(config, channels)), config)


# ---------------------------------------------------------------------------
# mmcv NonLocal1d/2d/3d (_NonLocalNd): ConvModule wrappers


class ConvModule(nn.Module):
    """mmcv's ConvModule reduced to what the non-local block uses: a conv
    (``conv``), then an optional norm (``bn``); with a norm, no conv bias."""

    def __init__(self, conv: type, c_in: int, c_out: int, norm: type | None = None,
                 eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.conv = conv(c_in, c_out, 1, bias=norm is None)
        if norm is not None:
            self.bn = norm(c_out, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if hasattr(self, "bn") else x


class MmcvNonLocal(nn.Module):
    """mmcv's ``_NonLocalNd`` with ``sub_sample`` (max-pool after g and phi),
    ``use_scale`` (1/sqrt(Ci), embedded Gaussian only) and ``norm_cfg`` (BN on
    ``conv_out`` only); modes embedded_gaussian, gaussian and dot_product."""

    def __init__(self, in_channels: int, inter_channels: int, rank: int, *,
                 mode: str, use_scale: bool, sub_sample: bool, norm: bool,
                 eps: float, momentum: float) -> None:
        super().__init__()
        conv = _CONV[rank]
        self.mode, self.use_scale = mode, use_scale
        self.inter_channels = inter_channels
        self.g = ConvModule(conv, in_channels, inter_channels)
        self.conv_out = ConvModule(conv, inter_channels, in_channels,
                                   _BN[rank] if norm else None, eps, momentum)
        if mode != "gaussian":
            self.theta = ConvModule(conv, in_channels, inter_channels)
            self.phi = ConvModule(conv, in_channels, inter_channels)
        if sub_sample:
            pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[rank]
            max_pool = pool(kernel_size=_KERNEL[rank])
            self.g = nn.Sequential(self.g, max_pool)
            self.phi = (nn.Sequential(self.phi, max_pool) if mode != "gaussian"
                        else max_pool)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        g_x = self.g(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
        if self.mode == "gaussian":
            theta_x = x.view(n, x.size(1), -1).permute(0, 2, 1)
            phi_x = (self.phi(x) if hasattr(self, "phi") else x).view(n, x.size(1), -1)
        else:
            theta_x = self.theta(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi(x).view(n, self.inter_channels, -1)
        pairwise = torch.matmul(theta_x, phi_x)
        if self.mode == "dot_product":
            pairwise = pairwise / pairwise.shape[-1]
        else:
            if self.mode == "embedded_gaussian" and self.use_scale:
                pairwise = pairwise / theta_x.shape[-1] ** 0.5
            pairwise = pairwise.softmax(dim=-1)
        self.last_attention = pairwise.detach()
        y = torch.matmul(pairwise, g_x).permute(0, 2, 1).contiguous()
        y = y.reshape(n, self.inter_channels, *x.size()[2:])
        return x + self.conv_out(y)


def make_mmcv(config: dict[str, Any]) -> nn.Module:
    """mmcv's ``NonLocal{1,2,3}d(in_channels, reduction, use_scale, norm_cfg,
    mode, sub_sample)``, for the presets ``mmcv`` (norm_cfg=None) and
    ``mmcv_bn`` (norm_cfg=BN: W_z without bias)."""
    _require("mmcv", config, mode=["embedded_gaussian", "gaussian", "dot_product"],
             pool_position="after_proj", bias=True, out_proj=True, gamma=False,
             residual=True, scale_channels="inter", reduction=2, divisor=None)
    if config["mode"] != "embedded_gaussian":
        _require("mmcv", config, use_scale=False)
    _require("mmcv", config, out_bias=config["bn"] is None)
    channels, rank = _dims(config)
    module = MmcvNonLocal(
        channels, _inter(config, channels), rank, mode=config["mode"],
        use_scale=config["use_scale"], sub_sample=config["sub_sample"],
        norm=config["bn"] is not None, eps=config["bn_eps"],
        momentum=config["bn_momentum"])
    return _finish(module, config)


# ---------------------------------------------------------------------------
# timm NonLocalAttn


class NonLocalAttn(nn.Module):
    """timm's spatial non-local block: biased ``t``, ``p``, ``g``, ``z`` 1x1
    convs, BN ``norm``, the affinity scaled by 1/sqrt(C) (the INPUT width)."""

    def __init__(self, in_channels: int, rd_channels: int, use_scale: bool = True,
                 *, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.scale = in_channels ** -0.5 if use_scale else 1.0
        self.t = nn.Conv2d(in_channels, rd_channels, kernel_size=1, bias=True)
        self.p = nn.Conv2d(in_channels, rd_channels, kernel_size=1, bias=True)
        self.g = nn.Conv2d(in_channels, rd_channels, kernel_size=1, bias=True)
        self.z = nn.Conv2d(rd_channels, in_channels, kernel_size=1, bias=True)
        self.norm = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        t, p, g = self.t(x), self.p(x), self.g(x)
        b, c, h, w = t.size()
        t = t.view(b, c, -1).permute(0, 2, 1)
        p = p.view(b, c, -1)
        g = g.view(b, c, -1).permute(0, 2, 1)
        att = torch.bmm(t, p) * self.scale
        att = F.softmax(att, dim=2)
        self.last_attention = att.detach()
        x = torch.bmm(att, g)
        x = x.permute(0, 2, 1).reshape(b, c, h, w)
        x = self.z(x)
        return self.norm(x) + shortcut


def make_timm(config: dict[str, Any]) -> nn.Module:
    """timm's ``NonLocalAttn(in_channels, use_scale, rd_channels)`` (plus
    ``channels``): 2-D, no pooling, BN after z."""
    _require("timm", config, mode="embedded_gaussian", sub_sample=False, bias=True,
             out_proj=True, out_bias=True, bn=["train", "eval"], gamma=False,
             residual=True)
    if config["use_scale"]:
        _require("timm", config, scale_channels="in")
    channels, rank = _dims(config, default_rank=2)
    if rank != 2:
        raise ValueError(f"config: NonLocalAttn is 2-D only, got spatial_rank={rank}")
    module = NonLocalAttn(channels, _inter(config, channels), config["use_scale"],
                          eps=config["bn_eps"], momentum=config["bn_momentum"])
    return _finish(module, config)


# ---------------------------------------------------------------------------
# a direct PyTorch version of every refattn option (canonical names)


class ReferenceNonLocal(nn.Module):
    """Every option of refattn's non-local block, with the canonical names
    (``config`` resolved: ``inter_channels``, ``value_channels`` and
    ``out_bias`` filled in)."""

    def __init__(self, config: dict[str, Any], channels: int, rank: int) -> None:
        super().__init__()
        self.cfg = config
        ci = _inter(config, channels)
        cv = self.cv = config["value_channels"]
        conv, bias = _CONV[rank], config["bias"]
        self.kernel = _KERNEL[rank]
        self.rank = rank
        if config["mode"] != "gaussian":
            self.theta = conv(channels, ci, 1, bias=bias)
            self.phi = conv(channels, ci, 1, bias=bias)
        self.g = conv(channels, cv, 1, bias=bias)
        if config["mode"] == "concatenation":
            self.concat_project = nn.Conv2d(2 * ci, 1, 1, bias=config["concat_bias"])
        if config["out_proj"]:
            self.W = conv(cv, channels, 1, bias=config["out_bias"])
        if config["bn"] is not None:
            self.W_bn = _BN[rank](channels, eps=config["bn_eps"],
                                  momentum=config["bn_momentum"])
        if config["gamma"]:
            self.gamma = nn.Parameter(torch.zeros(1))
        self.last_attention: torch.Tensor | None = None

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[self.rank]
        return pool(t, self.kernel, self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n, c = x.shape[:2]
        embedded = cfg["mode"] != "gaussian"
        sub, before = cfg["sub_sample"], cfg["pool_position"] == "before_proj"
        theta = self.theta(x) if embedded else x
        if sub and before:
            xk = self._pool(x)
            phi, g = (self.phi(xk) if embedded else xk), self.g(xk)
        else:
            phi, g = (self.phi(x) if embedded else x), self.g(x)
            if sub:
                phi, g = self._pool(phi), self._pool(g)
        theta, phi, g = (t.reshape(n, t.shape[1], -1) for t in (theta, phi, g))
        lq, lk = theta.shape[2], phi.shape[2]
        if cfg["mode"] == "concatenation":
            pair = torch.cat([theta[:, :, :, None].expand(-1, -1, -1, lk),
                              phi[:, :, None, :].expand(-1, -1, lq, -1)], dim=1)
            attention = F.relu(self.concat_project(pair))[:, 0] / lk
        else:
            f = torch.einsum("nci,ncj->nij", theta, phi)
            if cfg["use_scale"]:
                width = c if cfg["scale_channels"] == "in" else theta.shape[1]
                f = f / width ** 0.5
            if cfg["mode"] == "dot_product":
                attention = f / lk
            else:
                attention = torch.softmax(f, dim=-1)
        self.last_attention = attention.detach()
        y = torch.einsum("nij,ncj->nci", attention, g)
        z = y.reshape((n, self.cv) + tuple(x.shape[2:]))
        if cfg["out_proj"]:
            z = self.W(z)
        if cfg["bn"] is not None:
            z = self.W_bn(z)
        if cfg["gamma"]:
            z = self.gamma * z
        return z + x if cfg["residual"] else z


def make_reference(config: dict[str, Any]) -> nn.Module:
    """Any refattn config (plus ``channels``, ``spatial_rank``), canonical names."""
    channels, rank = _dims(config)
    return _finish(ReferenceNonLocal(config, channels, rank), config)


# ---------------------------------------------------------------------------
# known-buggy variants (AlexHex7 structure and names)


def make_alexhex7_softmax_over_queries(config: dict[str, Any]) -> nn.Module:
    """AlexHex7 with softmax over dim 1 (queries); softmax modes."""
    _require("softmax-over-queries", config, mode=["embedded_gaussian", "gaussian"])
    return _alexhex7(config, "softmax_over_queries")


def make_alexhex7_no_transpose(config: dict[str, Any]) -> nn.Module:
    """AlexHex7 reshaping y (N, Lq, Ci) to (N, Ci, *S) without the permute."""
    return _alexhex7(config, "no_transpose")


def make_alexhex7_divide_by_query_count(config: dict[str, Any]) -> nn.Module:
    """AlexHex7 dot-product/concatenation divided by N_q = f.size(1), not N_k."""
    _require("divide-by-query-count", config, mode=["dot_product", "concatenation"])
    return _alexhex7(config, "divide_by_query_count")


def make_alexhex7_view_with_c(config: dict[str, Any]) -> nn.Module:
    """AlexHex7 viewing theta, phi and g with C channels instead of Ci."""
    _require("view-with-C", config, mode=["embedded_gaussian", "dot_product"])
    return _alexhex7(config, "view_with_c")
