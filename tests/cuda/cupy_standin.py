"""A stand-in for CuPy built on NumPy, whose RawModule runs the host shim.

Tier 2 of the op-level kernel tests (tests only).  ``install(library)``
puts two modules into ``sys.modules`` for the duration of a ``with`` block:

* ``cupy``: ``cupy.ndarray`` (a wrapper around a NumPy array that is *not* a
  NumPy array), the NumPy functions on it, ``cupy.cuda.Device`` /
  ``runtime``, ``cupy.is_available()`` and ``cupy.RawModule``, whose kernels
  run on the CPU through the C++ host shim (``shim_harness.ShimLibrary``);
* ``array_api_compat.cupy``: the Array API namespace of those arrays (the
  functions of ``array_api_compat.numpy`` on the wrapped arrays).

So ``refattn.backend.namespace`` sees CuPy arrays, ``refattn.cuda.wants_kernels``
is true, and the ops take their raw-kernel path through the real production
code: ``refattn.cuda.get_module()`` builds a ``cupy.RawModule`` from
``module_source()``, ``CupyRunner`` launches it.  Every launch is recorded
(``StandIn.launches``), so tests can count them.

Like CuPy, the stand-in refuses NumPy arrays where CuPy arrays are expected
(mixing raises TypeError and ``numpy.asarray(cupy_array)`` fails), and
``device=`` must be a ``cupy.cuda.Device``: host data leaking into a CuPy
computation is an error here too.  It cannot show anything about GPU
behaviour; tier 3 (tests/cuda/test_gpu.py) does that.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import array_api_compat.numpy as compat_numpy
import numpy as np
import pytest

import refattn.cuda as rc
from refattn.cuda import _runner

__all__ = ["Launch", "StandIn", "install", "ndarray", "to_device"]


# ---------------------------------------------------------------------------
# the device


class Device:
    """``cupy.cuda.Device``: one device, id 0."""

    def __init__(self, device: int | None = None) -> None:
        if device not in (None, 0):
            raise ValueError(f"device: the stand-in has one device (0), got {device!r}")
        self.id = 0

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("standin-device", self.id))

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id} (host-shim stand-in)>"


DEVICE = Device(0)


def _device_kwarg(kwargs: dict[str, Any]) -> None:
    """``device=`` must be None or a stand-in Device (CuPy refuses 'cpu')."""
    if "device" not in kwargs:
        return
    dev = kwargs["device"]
    if dev is not None and not isinstance(dev, Device):
        raise ValueError(f"device: expected a cupy.cuda.Device or None, got {dev!r}")
    kwargs["device"] = None


# ---------------------------------------------------------------------------
# the array


def _unwrap(v: Any) -> Any:
    if isinstance(v, ndarray):
        return v._a
    if isinstance(v, np.ndarray):
        raise TypeError(
            "a NumPy array was mixed with CuPy arrays (host data leaked into a "
            f"CuPy computation): shape {v.shape}, dtype {v.dtype}"
        )
    if isinstance(v, tuple):
        return tuple(_unwrap(i) for i in v)
    if isinstance(v, list):
        return [_unwrap(i) for i in v]
    return v


def _wrap(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return ndarray(v)
    if isinstance(v, np.generic) and not isinstance(v, (np.str_, np.bytes_)):
        return ndarray(np.asarray(v))  # CuPy reductions return 0-d arrays
    if type(v) is tuple:
        return tuple(_wrap(i) for i in v)
    if type(v) is list:
        return [_wrap(i) for i in v]
    return v


def _operand(v: Any) -> Any:
    if isinstance(v, ndarray):
        return v._a
    if isinstance(v, np.ndarray):
        _unwrap(v)  # raises
    return v


def _binary(op: Callable[[Any, Any], Any], reflected: bool = False) -> Callable:
    if reflected:
        return lambda self, other: _wrap(op(_operand(other), self._a))
    return lambda self, other: _wrap(op(self._a, _operand(other)))


def _inplace(op: Callable[[Any, Any], Any]) -> Callable:
    def method(self: ndarray, other: Any) -> ndarray:
        self._a = op(self._a, _operand(other))
        return self

    return method


class ndarray:  # noqa: N801 - the name CuPy uses
    """``cupy.ndarray`` on the host: a NumPy array that NumPy does not accept."""

    __slots__ = ("_a",)
    __array_ufunc__ = None  # NumPy operands defer to the reflected methods

    def __init__(self, a: np.ndarray) -> None:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"expected a numpy.ndarray, got {type(a).__name__}")
        self._a = a

    # attributes of the Array API standard
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    T = property(lambda self: ndarray(self._a.T))
    mT = property(lambda self: ndarray(np.swapaxes(self._a, -1, -2)))
    device = property(lambda self: DEVICE)
    flags = property(lambda self: self._a.flags)

    def __array_namespace__(self, api_version: str | None = None) -> Any:
        return COMPAT

    def to_device(self, device: Any, /, stream: Any = None) -> ndarray:
        _device_kwarg({"device": device})
        return self

    def get(self) -> np.ndarray:
        """Copy to the host, as ``cupy.ndarray.get``."""
        return self._a.copy()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly."
        )

    # indexing
    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._a[_unwrap(key)] = _operand(value)

    def __len__(self) -> int:
        return len(self._a)

    # conversions (synchronising, as on a GPU)
    def __bool__(self) -> bool:
        return bool(self._a)

    def __float__(self) -> float:
        return float(self._a)

    def __int__(self) -> int:
        return int(self._a)

    def __index__(self) -> int:
        return operator.index(self._a)

    def __complex__(self) -> complex:
        return complex(self._a)

    def __repr__(self) -> str:
        return "stand-in cupy " + repr(self._a)

    # arithmetic, comparisons, bit operations
    __add__, __radd__, __iadd__ = (
        _binary(operator.add), _binary(operator.add, True), _inplace(operator.iadd)
    )
    __sub__, __rsub__, __isub__ = (
        _binary(operator.sub), _binary(operator.sub, True), _inplace(operator.isub)
    )
    __mul__, __rmul__, __imul__ = (
        _binary(operator.mul), _binary(operator.mul, True), _inplace(operator.imul)
    )
    __truediv__, __rtruediv__, __itruediv__ = (
        _binary(operator.truediv),
        _binary(operator.truediv, True),
        _inplace(operator.itruediv),
    )
    __floordiv__, __rfloordiv__ = (
        _binary(operator.floordiv), _binary(operator.floordiv, True)
    )
    __mod__, __rmod__ = _binary(operator.mod), _binary(operator.mod, True)
    __pow__, __rpow__, __ipow__ = (
        _binary(operator.pow), _binary(operator.pow, True), _inplace(operator.ipow)
    )
    __matmul__, __rmatmul__ = _binary(operator.matmul), _binary(operator.matmul, True)
    __and__, __rand__ = _binary(operator.and_), _binary(operator.and_, True)
    __or__, __ror__ = _binary(operator.or_), _binary(operator.or_, True)
    __xor__, __rxor__ = _binary(operator.xor), _binary(operator.xor, True)
    __lshift__, __rshift__ = _binary(operator.lshift), _binary(operator.rshift)
    __eq__ = _binary(operator.eq)  # type: ignore[assignment]
    __ne__ = _binary(operator.ne)  # type: ignore[assignment]
    __lt__, __le__ = _binary(operator.lt), _binary(operator.le)
    __gt__, __ge__ = _binary(operator.gt), _binary(operator.ge)
    __hash__ = None  # type: ignore[assignment]

    def __neg__(self) -> ndarray:
        return _wrap(-self._a)

    def __pos__(self) -> ndarray:
        return _wrap(+self._a)

    def __abs__(self) -> ndarray:
        return _wrap(abs(self._a))

    def __invert__(self) -> ndarray:
        return _wrap(~self._a)

    # the rest of cupy.ndarray's methods (astype, copy, reshape, sum, item, ...)
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_a", "ctypes", "data", "base"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)
        return lambda *a, **k: _wrap(attr(*_unwrap(a), **_unwrap_kwargs(k)))


ndarray.__module__ = "cupy"  # what array_api_compat and refattn.cuda look at


def _unwrap_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
    _device_kwarg(kwargs)
    return kwargs


# ---------------------------------------------------------------------------
# the two namespaces


class _Namespace(types.ModuleType):
    """The functions of `base`, taking and returning stand-in arrays."""

    def __init__(self, name: str, base: Any) -> None:
        super().__init__(name)
        self._base = base

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__array_namespace_info__":
            raise AttributeError(name)
        attr = getattr(self._base, name)
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, constants
        base_fn = attr

        def fn(*args: Any, **kwargs: Any) -> Any:
            return _wrap(base_fn(*_unwrap(args), **_unwrap_kwargs(kwargs)))

        fn.__name__ = name
        setattr(self, name, fn)
        return fn


def _asarray_of(base: Any) -> Callable[..., ndarray]:
    """asarray: host data (NumPy arrays, lists, scalars) is copied to the
    'device'; a stand-in array is returned as it is (or copied with copy=True)."""

    def asarray(obj: Any, dtype: Any = None, *, device: Any = None, copy: Any = None,
                **kwargs: Any) -> ndarray:
        _device_kwarg({"device": device})
        if isinstance(obj, ndarray):
            a = base.asarray(obj._a, dtype=dtype, copy=copy)
        else:
            a = np.array(_unwrap(obj) if isinstance(obj, (list, tuple)) else obj,
                         dtype=dtype, copy=True)
        return ndarray(np.asarray(a))

    return asarray


def _asnumpy(a: Any, *args: Any, **kwargs: Any) -> np.ndarray:
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


# ---------------------------------------------------------------------------
# RawModule on the host shim


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the instantiation's name, grid and block sizes."""

    name: str
    grid: int
    block: int

    @property
    def base(self) -> str:
        """The kernel template without its type: ``refattn_softmax_fwd``."""
        return self.name.split("<")[0]


@dataclass
class StandIn:
    """The installed stand-in: its modules, the shim build and the record."""

    library: Any  # shim_harness.ShimLibrary
    cupy: types.ModuleType
    compat: types.ModuleType
    launches: list[Launch] = field(default_factory=list)
    modules_built: int = 0

    def bases(self) -> list[str]:
        """The kernel templates launched so far, in order."""
        return [launch.base for launch in self.launches]

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Launch]]:
        """``with standin.recording() as launched:`` -- the launches of the block."""
        start = len(self.launches)
        out: list[Launch] = []
        try:
            yield out
        finally:
            out.extend(self.launches[start:])


_ACTIVE: list[StandIn] = []


class RawModule:
    """``cupy.RawModule``: accepts exactly refattn's module text and runs its
    kernels through the host-shim build of that same text."""

    def __init__(self, code: str | None = None, *, options: tuple[str, ...] = (),
                 name_expressions: Any = (), backend: str = "nvrtc", **kwargs: Any
                 ) -> None:
        standin = _ACTIVE[-1]
        built = (standin.library.path.parent / "refattn_module.cu").read_text("utf-8")
        if code != built:
            raise ValueError(
                "code: the stand-in runs only the module the host shim was built "
                "from (refattn.cuda.module_source())"
            )
        if tuple(options) != rc.COMPILE_OPTIONS:
            raise ValueError(f"options: expected {rc.COMPILE_OPTIONS}, got {options}")
        self.names = set(name_expressions)
        self.standin = standin
        standin.modules_built += 1

    def get_function(self, name: str) -> RawKernel:
        if name not in self.names:
            raise KeyError(f"{name} is not among the module's name_expressions")
        return RawKernel(self.standin, name)


class RawKernel:
    """One kernel of a stand-in RawModule: ``kernel(grid, block, args)``."""

    def __init__(self, standin: StandIn, name: str) -> None:
        self.standin = standin
        self.name = name

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...],
                 args: tuple[Any, ...], **kwargs: Any) -> None:
        if len(grid) != 1 or len(block) != 1:
            raise ValueError(
                f"{self.name}: refattn launches 1-D grids, got {grid}, {block}"
            )
        g, b = int(grid[0]), int(block[0])
        if not (1 <= g <= 2**31 - 1 and 1 <= b <= 1024):
            raise ValueError(f"{self.name}: launch ({g}, {b}) outside CUDA's limits")
        host = tuple(a._a if isinstance(a, ndarray) else a for a in args)
        self.standin.launches.append(Launch(self.name, g, b))
        self.standin.library.call(self.name, g, b, host)


# ---------------------------------------------------------------------------
# the modules and their installation


def _make_modules() -> tuple[types.ModuleType, types.ModuleType]:
    cupy = _Namespace("cupy", np)
    cupy.ndarray = ndarray  # type: ignore[attr-defined]
    cupy.asarray = _asarray_of(np)  # type: ignore[attr-defined]
    cupy.array = _asarray_of(np)  # type: ignore[attr-defined]
    cupy.asnumpy = _asnumpy  # type: ignore[attr-defined]
    cupy.is_available = lambda: True  # type: ignore[attr-defined]
    cupy.RawModule = RawModule  # type: ignore[attr-defined]
    cupy.__version__ = "stand-in"  # type: ignore[attr-defined]
    runtime = types.SimpleNamespace(
        getDevice=lambda: 0,
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda i: {"name": b"host-shim stand-in"},
    )
    cupy.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        Device=Device, runtime=runtime
    )
    compat = _Namespace("array_api_compat.cupy", compat_numpy)
    compat.asarray = _asarray_of(compat_numpy)  # type: ignore[attr-defined]
    return cupy, compat


_CUPY, _COMPAT = _make_modules()
COMPAT = _COMPAT


@contextlib.contextmanager
def install(library: Any, *, block: int = 32, max_grid: int = 3) -> Iterator[StandIn]:
    """Make ``import cupy`` and ``array_api_compat.cupy`` the stand-in.

    The default CuPy runner gets `block` threads per block and at most
    `max_grid` blocks (small: tails and grid-stride loops run, and the shim,
    one thread per CUDA thread, stays quick); ``block=256, max_grid=65535``
    is what a GPU gets.  Compiled modules are forgotten on entry and exit, so
    nothing of the stand-in outlives the block.
    """
    standin = StandIn(library, _CUPY, _COMPAT)
    runner = _runner.default_runner()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", _CUPY)
        mp.setitem(sys.modules, "array_api_compat.cupy", _COMPAT)
        mp.setattr(array_api_compat, "cupy", _COMPAT, raising=False)
        mp.setattr(runner, "block", block)
        mp.setattr(runner, "max_grid", max_grid)
        rc._module_for_device.cache_clear()
        _ACTIVE.append(standin)
        try:
            yield standin
        finally:
            _ACTIVE.pop()
            rc._module_for_device.cache_clear()


def to_device(a: np.ndarray) -> ndarray:
    """A host array copied into the stand-in (``cupy.asarray``)."""
    return _CUPY.asarray(a)  # type: ignore[attr-defined]
