"""How an op chooses between its raw CUDA kernel and its generic Array API path.

The generic code in ``refattn/ops`` is the specification and runs on every
namespace.  On CuPy arrays, with kernels enabled, an op that has a raw
kernel for its step hands its arguments, already validated, to the kernel
variant of the same name in ``refattn.cuda.kernel_ops``.  The variant returns
the same outputs and its own cache NamedTuple (holding what the kernel
backward needs, e.g. the flat arg-max index of the max-pool kernel), and the
op's backward routes by the cache's type.  Every wired op reads:

.. code-block:: python

    def softmax_forward(x, *, axis=-1):
        ...                                             # validation
        if use_kernel(x) and axis == x.ndim - 1:        # CuPy: raw kernel
            return kernel_ops.softmax_forward(x)
        ...                                             # the generic math

    def softmax_backward(dout, cache):
        if isinstance(cache, kernel_ops.SoftmaxKernelCache):
            return kernel_ops.softmax_backward(dout, cache)
        ...

``use_kernel`` is false for NumPy and array_api_strict arrays (cheaply, and
without importing CuPy), and for CuPy arrays when ``REFATTN_KERNELS=generic``
or ``refattn.cuda.use_kernels(False)`` / ``set_kernels_enabled(False)``
switch the kernels off.  ``KERNEL_OPS`` says which ops are wired and when
their kernel is taken; anything else runs the generic path on CuPy too
(matrix products and 1x1 convolutions always do: that is ``cupy.matmul``).
"""

from __future__ import annotations

from typing import Any

from refattn.cuda import wants_kernels

__all__ = ["KERNEL_OPS", "use_kernel"]

KERNEL_OPS: dict[str, str] = {
    "channel_pool": "kind 'max' or 'mean'; 1 to 3 spatial dims",
    "global_pool": "kind 'avg', 'max', 'lp' or 'lse'; 1 to 3 spatial dims",
    "gate_mul": "channel gate z (N, C, 1, ...) or spatial gate z (N, 1, *S); "
    "x with 0 to 3 spatial dims",
    "softmax": "the last axis",
    "max_pool": "1, 2 and 3 spatial dims (every case the op accepts)",
    "conv2d": "C_in, C_out <= 4, odd square k >= 3, padding (k - 1) / 2, "
    "stride 1, dilation 1, groups 1 (CBAM's spatial conv)",
    "batch_norm": "train and eval; statistics and backward sums by kernel",
    "group_norm": "statistics and backward sums by kernel",
    "cgnl (block)": "the Taylor moments of the Gaussian kernel and their VJP, "
    "order <= 8",
}
"""Op -> the cases that take its raw kernel on CuPy (all others: generic)."""


def use_kernel(*arrays: Any) -> bool:
    """Whether an op gets the raw-kernel path for these arrays.

    True when every given array (None entries are skipped) is a CuPy array
    and kernels are enabled (``refattn.cuda.kernels_enabled()``).
    """
    return wants_kernels(*arrays)
