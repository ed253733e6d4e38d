"""CBAM, the non-local block and CGNL in Flax NNX, written as a Flax user would.

Channels-last (N, H, W, C) throughout, ``nnx.Linear`` / ``nnx.Conv`` /
``nnx.GroupNorm`` with their own names (``kernel``, ``scale``) and layouts,
attribute names that are the canonical ones (``mlp.fc1``, ``spatial.conv``,
``theta``, ``W_bn``, ``gn``...), so ``refattn validate --jax`` loads a
fixture into them with ``--names canonical`` and ``--data-format
channels_last``.  Each factory takes the config dict the adapter passes.

* ``make_cbam``: Jongchan's CBAM (shared MLP with biases over the average-
  and max-pooled vectors; spatial gate: channel max then mean, 7x7 conv, batch
  norm, sigmoid).
* ``make_non_local``: AlexHex7's embedded-Gaussian non-local block, 2-D,
  with the 2x2 max-pool after the phi and g projections, then W and its
  batch norm, plus the residual.
* ``make_cgnl``: Yue's dot-product CGNL (per channel group: s = <p, g> over
  the group's channels and positions, y = s t), grouped 1x1 conv z, group
  norm, residual.

Batch norm: ``BatchNorm2d`` below is PyTorch's (the running variance is
updated with the unbiased batch variance, M/(M-1) times the biased one, M =
N H W), as a port of a PyTorch model needs.  ``nnx.BatchNorm`` updates it
with the biased one: ``make_cbam_flax_bn`` and ``make_non_local_flax_bn`` use
it, and a train-mode case fails them on exactly ``output.state.*.running_var``.

Planted bugs, one per block, each caught on the tensors it must show on:

* ``make_cbam_no_spatial_sigmoid``: the spatial gate multiplies by the raw
  batch-norm output.  Everything fails but the running statistics (computed
  before the sigmoid).
* ``make_non_local_softmax_over_queries``: the softmax normalises over the
  query axis.  Everything fails but the gradients of the biases after the
  attention (``W.bias``, ``W_bn.bias``).
* ``make_cgnl_one_group_kernel``: the dot product is taken over all the
  planes at once, so every group is scaled by the same s (the groups are
  forgotten in the kernel).  Everything fails but ``grad.param.gn.bias``
  (the sum of the cotangent, whatever came before).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "BatchNorm2d",
    "make_cbam",
    "make_cbam_flax_bn",
    "make_cbam_no_spatial_sigmoid",
    "make_cgnl",
    "make_cgnl_one_group_kernel",
    "make_non_local",
    "make_non_local_flax_bn",
    "make_non_local_softmax_over_queries",
]


class BatchNorm2d(nnx.Module):
    """PyTorch's BatchNorm2d, channels-last, with Flax's variable names.

    train: y = (x − μ_B)/sqrt(σ²_B + eps)·scale + bias, and
           mean ← (1 − m)·mean + m·μ_B,  var ← (1 − m)·var + m·σ²_B·M/(M − 1)
    eval:  μ, σ² = mean, var
    (m is PyTorch's momentum; M = N·H·W values per channel.)
    """

    def __init__(self, channels: int, *, eps: float, momentum: float) -> None:
        self.scale = nnx.Param(jnp.ones(channels))
        self.bias = nnx.Param(jnp.zeros(channels))
        self.mean = nnx.BatchStat(jnp.zeros(channels))
        self.var = nnx.BatchStat(jnp.ones(channels))
        self.eps, self.momentum = eps, momentum
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, C)
        if self.use_running_average:
            mu, var = self.mean[...], self.var[...]
        else:
            mu, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # (C,)
            m, count = self.momentum, x.size // x.shape[-1]
            self.mean[...] = (1 - m) * self.mean[...] + m * mu
            self.var[...] = (1 - m) * self.var[...] + m * var * count / (count - 1)
        return (x - mu) / jnp.sqrt(var + self.eps) * self.scale[...] + self.bias[...]


def _flax_bn(channels: int, *, eps: float, momentum: float, rngs: nnx.Rngs) -> nnx.Module:
    """nnx.BatchNorm with PyTorch's momentum m as Flax's 1 − m."""
    return nnx.BatchNorm(channels, epsilon=eps, momentum=1 - momentum, rngs=rngs)


def _torch_bn(channels: int, *, eps: float, momentum: float, rngs: nnx.Rngs) -> nnx.Module:
    return BatchNorm2d(channels, eps=eps, momentum=momentum)


def _require(config: dict[str, Any], **wanted: Any) -> None:
    for key, value in wanted.items():
        if config.get(key) != value:
            raise ValueError(f"this Flax port needs {key}={value!r}, got {config.get(key)!r}")


# ---------------------------------------------------------------------------
# CBAM (Jongchan)


class MLP(nnx.Module):
    def __init__(self, channels: int, hidden: int, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(channels, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, channels, rngs=rngs)

    def __call__(self, v: jax.Array) -> jax.Array:  # (N, C)
        return self.fc2(nnx.relu(self.fc1(v)))


class SpatialConv(nnx.Module):
    def __init__(self, kernel: int, bn: Any, *, eps: float, momentum: float,
                 rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(2, 1, (kernel, kernel), padding=kernel // 2, use_bias=False,
                             rngs=rngs)
        self.bn = bn(1, eps=eps, momentum=momentum, rngs=rngs)

    def __call__(self, d: jax.Array) -> jax.Array:  # (N, H, W, 2)
        return self.bn(self.conv(d))


class CBAM(nnx.Module):
    def __init__(self, channels: int, reduction: int, kernel: int, *, eps: float,
                 momentum: float, bn: Any = _torch_bn, spatial_sigmoid: bool = True,
                 rngs: nnx.Rngs) -> None:
        self.mlp = MLP(channels, channels // reduction, rngs)
        self.spatial = SpatialConv(kernel, bn, eps=eps, momentum=momentum, rngs=rngs)
        self.spatial_sigmoid = spatial_sigmoid

    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, C)
        # channel gate: one MLP on the average- and the max-pooled vectors
        logits = self.mlp(x.mean(axis=(1, 2))) + self.mlp(x.max(axis=(1, 2)))  # (N, C)
        x = x * nnx.sigmoid(logits)[:, None, None, :]
        # spatial gate: channel max and mean, 7x7 conv + BN, sigmoid
        d = jnp.concatenate([x.max(axis=-1, keepdims=True),
                             x.mean(axis=-1, keepdims=True)], axis=-1)  # (N, H, W, 2)
        s = self.spatial(d)                                              # (N, H, W, 1)
        return x * (nnx.sigmoid(s) if self.spatial_sigmoid else s)


def _cbam(config: dict[str, Any], **options: Any) -> CBAM:
    _require(config, channel_pool_order="max_mean", mlp_bias=True, spatial_bias=False,
             pool_types=["avg", "max"], spatial=True, spatial_relu=False)
    if config["spatial_bn"] not in ("train", "eval"):
        raise ValueError(f"this Flax port needs a spatial BN, got {config['spatial_bn']!r}")
    return CBAM(config["in_channels"], config["reduction"], config["spatial_kernel"],
                eps=config["bn_eps"], momentum=config["bn_momentum"], rngs=nnx.Rngs(0),
                **options)


def make_cbam(config: dict[str, Any]) -> CBAM:
    return _cbam(config)


def make_cbam_flax_bn(config: dict[str, Any]) -> CBAM:
    return _cbam(config, bn=_flax_bn)


def make_cbam_no_spatial_sigmoid(config: dict[str, Any]) -> CBAM:
    return _cbam(config, spatial_sigmoid=False)


# ---------------------------------------------------------------------------
# non-local (AlexHex7, embedded Gaussian, 2-D)


class NonLocal(nnx.Module):
    def __init__(self, channels: int, inter: int, *, eps: float, momentum: float,
                 bn: Any = _torch_bn, softmax_axis: int = -1, rngs: nnx.Rngs) -> None:
        conv = partial(nnx.Conv, kernel_size=(1, 1), rngs=rngs)
        self.theta, self.phi, self.g = (conv(channels, inter) for _ in range(3))
        self.W = conv(inter, channels)
        self.W_bn = bn(channels, eps=eps, momentum=momentum, rngs=rngs)
        self.softmax_axis = softmax_axis

    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, C)
        n, h, w, _ = x.shape
        pool = partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
        theta = self.theta(x).reshape(n, h * w, -1)             # (N, L, Ci)
        phi = pool(self.phi(x)).reshape(n, -1, theta.shape[-1])  # (N, L', Ci)
        g = pool(self.g(x)).reshape(n, -1, theta.shape[-1])      # (N, L', Ci)
        f = jax.nn.softmax(theta @ phi.transpose(0, 2, 1), axis=self.softmax_axis)
        y = (f @ g).reshape(n, h, w, -1)                         # (N, H, W, Ci)
        return x + self.W_bn(self.W(y))


def _non_local(config: dict[str, Any], **options: Any) -> NonLocal:
    _require(config, mode="embedded_gaussian", sub_sample=True, pool_position="after_proj",
             use_scale=False, bias=True, residual=True)
    if config["bn"] not in ("train", "eval") or len(config["input_shapes"]["x"]) != 4:
        raise ValueError("this Flax port is the 2-D block with a batch norm")
    return NonLocal(config["in_channels"], config["inter_channels"], eps=config["bn_eps"],
                    momentum=config["bn_momentum"], rngs=nnx.Rngs(0), **options)


def make_non_local(config: dict[str, Any]) -> NonLocal:
    return _non_local(config)


def make_non_local_flax_bn(config: dict[str, Any]) -> NonLocal:
    return _non_local(config, bn=_flax_bn)


def make_non_local_softmax_over_queries(config: dict[str, Any]) -> NonLocal:
    return _non_local(config, softmax_axis=1)


# ---------------------------------------------------------------------------
# CGNL (Yue, dot-product kernel)


class CGNL(nnx.Module):
    def __init__(self, channels: int, planes: int, groups: int, gn_groups: int, *,
                 eps: float, one_group_kernel: bool = False, rngs: nnx.Rngs) -> None:
        conv = partial(nnx.Conv, kernel_size=(1, 1), use_bias=False, rngs=rngs)
        self.t, self.p, self.g = (conv(channels, planes) for _ in range(3))
        self.z = conv(planes, channels, feature_group_count=groups)
        self.gn = nnx.GroupNorm(channels, num_groups=gn_groups, epsilon=eps, rngs=rngs)
        self.groups, self.one_group_kernel = groups, one_group_kernel

    def _split(self, a: jax.Array) -> jax.Array:  # (N, H, W, P) -> (N, L, G, P/G)
        n, h, w, planes = a.shape
        return a.reshape(n, h * w, self.groups, planes // self.groups)

    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, C)
        t, p, g = self._split(self.t(x)), self._split(self.p(x)), self._split(self.g(x))
        s = jnp.einsum("nlgc,nlgc->ng", p, g)                  # (N, G): one dot per group
        if self.one_group_kernel:
            s = jnp.broadcast_to(s.sum(axis=1, keepdims=True), s.shape)
        y = s[:, None, :, None] * t                             # (N, L, G, P/G)
        y = y.reshape(*x.shape[:3], -1)                         # (N, H, W, P)
        return x + self.gn(self.z(y))


def _cgnl(config: dict[str, Any], **options: Any) -> CGNL:
    _require(config, kernel="dot", use_scale=False, norm="gn", bias=False, residual=True)
    return CGNL(config["in_channels"], config["planes"], config["groups"],
                config["gn_groups"] or config["groups"], eps=config["eps"],
                rngs=nnx.Rngs(0), **options)


def make_cgnl(config: dict[str, Any]) -> CGNL:
    return _cgnl(config)


def make_cgnl_one_group_kernel(config: dict[str, Any]) -> CGNL:
    return _cgnl(config, one_group_kernel=True)
