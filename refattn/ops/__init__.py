"""Primitive ops: each ``<op>_forward(inputs..., *, options) -> (out, cache)``
is directly followed by ``<op>_backward(dout, cache) -> d<input>`` (a tuple
in input order when there are several).  Caches are NamedTuples holding
exactly what the backward formula mentions; nothing mutates its arguments.

Each public ``<op>_forward`` / ``<op>_backward`` checks its arguments (types,
shapes, dtypes, options, finite values) and calls the op's math step,
``_<op>`` / ``_<op>_backward`` (private to the package, documented "the math,
arguments already checked").  Blocks call the math steps: a block checks its
own arguments once (``refattn.blocks.spec``) and its results on the way out.

=================  ==========================================================
module             ops
=================  ==========================================================
``conv``           conv2d (k x k, stride, padding, dilation, groups, bias; the
                   1x1 fast path is one matmul), pointwise_conv (1x1, any rank)
``linear``         linear, matmul (batched, broadcasting)
``pool``           max_pool, avg_pool (1-3 spatial dims), global_pool (avg, max,
                   lp, lse), channel_pool (max, mean over C)
``elementwise``    relu, sigmoid, gate_mul (x * sigmoid(z)), mul, add
``softmax``        softmax along an axis
``norm``           batch_norm (train / eval), group_norm
=================  ==========================================================
"""

from __future__ import annotations

from refattn.ops.conv import (
    conv2d_backward,
    conv2d_forward,
    pointwise_conv_backward,
    pointwise_conv_forward,
)
from refattn.ops.elementwise import (
    add_backward,
    add_forward,
    gate_mul_backward,
    gate_mul_forward,
    mul_backward,
    mul_forward,
    relu_backward,
    relu_forward,
    sigmoid,
    sigmoid_backward,
    sigmoid_forward,
)
from refattn.ops.linear import (
    linear_backward,
    linear_forward,
    matmul_backward,
    matmul_forward,
)
from refattn.ops.norm import (
    batch_norm_backward,
    batch_norm_forward,
    group_norm_backward,
    group_norm_forward,
)
from refattn.ops.pool import (
    avg_pool_backward,
    avg_pool_forward,
    channel_pool_backward,
    channel_pool_forward,
    global_pool_backward,
    global_pool_forward,
    max_pool_backward,
    max_pool_forward,
)
from refattn.ops.softmax import softmax_backward, softmax_forward

OPS = {
    "conv2d": (conv2d_forward, conv2d_backward),
    "pointwise_conv": (pointwise_conv_forward, pointwise_conv_backward),
    "linear": (linear_forward, linear_backward),
    "matmul": (matmul_forward, matmul_backward),
    "max_pool": (max_pool_forward, max_pool_backward),
    "avg_pool": (avg_pool_forward, avg_pool_backward),
    "global_pool": (global_pool_forward, global_pool_backward),
    "channel_pool": (channel_pool_forward, channel_pool_backward),
    "relu": (relu_forward, relu_backward),
    "sigmoid": (sigmoid_forward, sigmoid_backward),
    "gate_mul": (gate_mul_forward, gate_mul_backward),
    "mul": (mul_forward, mul_backward),
    "add": (add_forward, add_backward),
    "softmax": (softmax_forward, softmax_backward),
    "batch_norm": (batch_norm_forward, batch_norm_backward),
    "group_norm": (group_norm_forward, group_norm_backward),
}
"""Every primitive: name -> (forward, backward)."""

__all__ = ["OPS", *sorted(f.__name__ for pair in OPS.values() for f in pair), "sigmoid"]
