"""Override points: where a faster implementation may replace a step's math.

The generic Array API code of the ops is the specification.  A step that
another implementation may replace (CuPy's raw CUDA kernels) is marked at
its boundary, and its body holds only the math:

.. code-block:: python

    @overridable("softmax")
    def _softmax(x, axis):                  # checked arguments -> (y, cache)
        ...

    @routed_by_cache("softmax")
    def softmax_backward(dout, cache):      # checks, then the math step
        ...

    @routed_by_cache("softmax")
    def _softmax_backward(dout, cache):     # the math, arguments checked
        ...

``OVERRIDES`` maps a step's name to its ``Override``.  The forward takes the
override when the first argument is a CuPy array (one check of its type's
module name, so NumPy and array_api_strict pay nothing more) and
``applies(*args)`` agrees; the override's forward takes the step's
arguments and returns the step's outputs with a cache of its own type,
``cache``.  The backward takes the override exactly when it gets a cache of
that type.  Both the public backward and its math step are routed: the
public one's checks read the generic cache's fields, so a kernel cache goes
to the kernel's backward (which checks its own dout) before them, and a
block, which calls the step directly, reaches the kernel the same way.

The table is filled lazily: the first CuPy array that reaches an override
point calls the loaders of ``LOADERS`` (``"module:function"``), once.  This
module imports nothing of ``refattn.cuda``; ``refattn.cuda.kernel_ops``
registers the kernels (its ``register``), and its ``applies`` functions
honour ``REFATTN_KERNELS=generic`` and ``refattn.cuda.use_kernels``.

NumPy arrays have a table of their own, ``CPU_OVERRIDES``, for the optional
CPU kernel tier (``refattn.cpu``, the ``cpu`` extra): the first plain
``numpy.ndarray`` that reaches an override point calls ``CPU_LOADERS``,
once; a loader whose tool is not installed registers nothing, and the
NumPy math runs.  Subclasses of ``numpy.ndarray`` and every other array
type never consult it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy

__all__ = [
    "CPU_LOADERS",
    "CPU_OVERRIDES",
    "LOADERS",
    "OVERRIDES",
    "Override",
    "overridable",
    "register",
    "register_cpu",
    "routed_by_cache",
]

F = TypeVar("F", bound=Callable[..., Any])

LOADERS: tuple[str, ...] = ("refattn.cuda.kernel_ops:register",)
"""What fills the table, called once when a CuPy array first reaches a step."""


CPU_LOADERS: tuple[str, ...] = ("refattn.cpu.kernel_ops:register",)
"""What fills the NumPy table, called once when an ndarray first reaches a step."""


class Override(NamedTuple):
    applies: Callable[..., bool]  # (the step's arguments) -> take the override?
    forward: Callable[..., Any]  # the step's arguments -> (outputs, cache)
    backward: Callable[..., Any]  # (dout, cache, ...) -> the step's gradients
    cache: type  # the type of the caches `forward` returns
    description: str  # the cases `applies` accepts, for the docs


OVERRIDES: dict[str, Override] = {}
"""Step name -> its override (filled by the loaders)."""

CPU_OVERRIDES: dict[str, Override] = {}
"""Step name -> its CPU-tier override for NumPy arrays (filled by CPU_LOADERS)."""

_loaded = False
_cpu_loaded = False


def register(name: str, override: Override) -> None:
    """Make `override` replace the step `name` where it applies."""
    OVERRIDES[name] = override


def register_cpu(name: str, override: Override) -> None:
    """Make `override` replace the step `name` for NumPy arrays where it applies."""
    CPU_OVERRIDES[name] = override


def _run(loaders: tuple[str, ...]) -> None:
    for loader in loaders:
        module, function = loader.split(":")
        getattr(importlib.import_module(module), function)()


def _load() -> None:
    global _loaded
    _run(LOADERS)
    _loaded = True


def _load_cpu() -> None:
    global _cpu_loaded
    _cpu_loaded = True  # once, even if a loader fails: the NumPy math stays
    _run(CPU_LOADERS)


def overridable(name: str) -> Callable[[F], F]:
    """Mark a forward step as replaceable by the override registered as `name`."""

    def decorate(math: F) -> F:
        @functools.wraps(math)
        def step(*args: Any) -> Any:
            if type(args[0]) is numpy.ndarray:
                if not _cpu_loaded:
                    _load_cpu()
                override = CPU_OVERRIDES.get(name)
                if override is not None and override.applies(*args):
                    return override.forward(*args)
            elif type(args[0]).__module__.startswith("cupy"):
                if not _loaded:
                    _load()
                override = OVERRIDES.get(name)
                if override is not None and override.applies(*args):
                    return override.forward(*args)
            return math(*args)

        return step  # type: ignore[return-value]

    return decorate


def routed_by_cache(name: str) -> Callable[[F], F]:
    """Mark a backward: a cache of the override's type goes to its backward."""

    def decorate(math: F) -> F:
        @functools.wraps(math)
        def backward(dout: Any, cache: Any, *args: Any, **kwargs: Any) -> Any:
            override = OVERRIDES.get(name)
            if override is not None and type(cache) is override.cache:
                return override.backward(dout, cache, *args, **kwargs)
            override = CPU_OVERRIDES.get(name)
            if override is not None and type(cache) is override.cache:
                return override.backward(dout, cache, *args, **kwargs)
            return math(dout, cache, *args, **kwargs)

        return backward  # type: ignore[return-value]

    return decorate
