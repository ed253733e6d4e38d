"""A Keras 3 CBAM in the structure of the popular CBAM-keras repositories.

The luuuyi layout (``ca`` = ChannelAttention whose ``fc`` is two 1x1
convolutions around a ReLU, applied to the average- and the max-pooled maps
and summed; ``sa`` = SpatialAttention: channel mean then max, ``conv1`` 7x7
without bias; ``out = ca(x) * x; out = sa(out) * out``), with what the
Keras ports add: biases in the MLP and a reduction ratio of 8.  Channels-last,
backend-neutral (``keras.ops`` only), so it runs on the JAX and the torch
backends.  Its variable paths are ``ca/fc/0/kernel``, ``ca/fc/0/bias``,
``ca/fc/2/...``, ``sa/conv1/kernel``: the luuuyi preset's anchor names with
Keras's ``kernel`` for ``weight``, so ``--names anchor`` loads a
``--preset luuuyi --set mlp_bias=true --set reduction=8`` case into it.

Float64: outside TensorFlow, Keras's type promotion maps float64 to float32
(``keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE``), and
``keras.ops.mean`` accumulates in that promoted type, so on the JAX and torch
backends a float64 ``ops.mean`` is a float32 mean cast back: ``make_cbam``
passes the float32 case and fails the float64 one on every tensor, with
relative errors near 1e-8.  ``make_cbam_sum_mean`` takes the means as
``ops.sum(...) / count`` (float64 throughout) and passes both.

``make_cbam_max_mean``: the planted bug, the spatial pools concatenated max
then mean.  Every tensor downstream of the spatial pools fails: the output and
every gradient (the channel MLP's too, through the backward).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers, ops

__all__ = ["CBAM", "make_cbam", "make_cbam_max_mean", "make_cbam_sum_mean"]


def _mean(x: Any, axis: Any, exact: bool) -> Any:
    """``ops.mean``, or the sum over the count (float64 kept in float64)."""
    if not exact:
        return ops.mean(x, axis=axis, keepdims=True)
    axes = axis if isinstance(axis, tuple) else (axis,)
    count = 1
    for a in axes:
        count *= x.shape[a]
    return ops.sum(x, axis=axis, keepdims=True) / count


class ChannelAttention(layers.Layer):
    def __init__(self, channels: int, ratio: int = 8, exact_mean: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exact_mean = exact_mean
        self.fc = keras.Sequential([
            layers.Conv2D(channels // ratio, 1, use_bias=True, name="0"),
            layers.ReLU(name="1"),
            layers.Conv2D(channels, 1, use_bias=True, name="2"),
        ], name="fc")

    def call(self, x: Any) -> Any:  # (N, H, W, C) -> (N, 1, 1, C)
        avg = _mean(x, (1, 2), self.exact_mean)
        mx = ops.max(x, axis=(1, 2), keepdims=True)
        return ops.sigmoid(self.fc(avg) + self.fc(mx))


class SpatialAttention(layers.Layer):
    def __init__(self, kernel_size: int = 7, max_first: bool = False,
                 exact_mean: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exact_mean = exact_mean
        self.conv1 = layers.Conv2D(1, kernel_size, padding="same", use_bias=False,
                                   name="conv1")
        self.max_first = max_first

    def call(self, x: Any) -> Any:  # (N, H, W, C) -> (N, H, W, 1)
        pools = [_mean(x, -1, self.exact_mean), ops.max(x, axis=-1, keepdims=True)]
        if self.max_first:
            pools.reverse()
        return ops.sigmoid(self.conv1(ops.concatenate(pools, axis=-1)))


class CBAM(layers.Layer):
    def __init__(self, channels: int, ratio: int = 8, kernel_size: int = 7,
                 max_first: bool = False, exact_mean: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ca = ChannelAttention(channels, ratio, exact_mean, name="ca")
        self.sa = SpatialAttention(kernel_size, max_first, exact_mean, name="sa")

    def call(self, x: Any) -> Any:
        out = self.ca(x) * x
        return self.sa(out) * out


def _cbam(config: dict[str, Any], **options: Any) -> CBAM:
    wanted = {"channel_pool_order": "mean_max", "mlp_bias": True, "spatial_bias": False,
              "spatial_bn": None, "pool_types": ["avg", "max"], "spatial": True}
    for key, value in wanted.items():
        if config.get(key) != value:
            raise ValueError(f"this Keras CBAM needs {key}={value!r}, got {config.get(key)!r}")
    return CBAM(config["in_channels"], config["reduction"], config["spatial_kernel"],
                name="cbam", **options)


def make_cbam(config: dict[str, Any]) -> CBAM:
    return _cbam(config)


def make_cbam_sum_mean(config: dict[str, Any]) -> CBAM:
    return _cbam(config, exact_mean=True)


def make_cbam_max_mean(config: dict[str, Any]) -> CBAM:
    return _cbam(config, max_first=True)
