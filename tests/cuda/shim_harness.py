"""The host-shim build of the CUDA kernels and its runner (tests only).

The host shim (shim/cuda_host_shim.h) lets a C++20 compiler run the exact
text that cupy.RawModule compiles (refattn.cuda.module_source()).  The build
is made once per test session in a temporary directory; a ShimRunner then
plays the part of refattn.cuda._runner.CupyRunner with NumPy arrays, so the
launch wrappers of refattn.cuda.launch run unchanged on the CPU.

Environment:
    CXX   the C++ compiler (default: g++, then clang++)
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import refattn.cuda as rc

SHIM_DIR = Path(__file__).parent / "shim"
SANITIZE_FLAGS = (
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=all",
)


def find_cxx() -> str | None:
    """A C++ compiler that accepts -std=c++20, or None."""
    for cand in (os.environ.get("CXX"), "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def build_shim(
    out_dir: Path,
    *,
    files: tuple[str, ...] = rc.KERNEL_FILES,
    source: str | None = None,
    sanitize: bool = False,
    cxx: str | None = None,
) -> Path:
    """Compile the kernels + shim entry table into a shared library.

    `source` replaces module_source(files) (used for planted bugs).  Raises
    RuntimeError carrying the compiler output on failure.
    """
    cxx = cxx or find_cxx()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "refattn_module.cu").write_text(
        source if source is not None else rc.module_source(files), encoding="utf-8"
    )
    names = rc.kernel_names(files=files) if source is None else _names_in(source)
    entries = ",\n".join(f"    REFATTN_ENTRY({n})" for n in names)
    template = (SHIM_DIR / "entries.cpp.in").read_text(encoding="utf-8")
    cpp = out_dir / "entries.cpp"
    cpp.write_text(template.replace("@ENTRIES@", entries), encoding="utf-8")
    lib = out_dir / ("libshim_san.so" if sanitize else "libshim.so")
    # -O1 for the plain build (more warnings); -O0 -g compiles the
    # sanitizer build much faster and keeps exact line numbers in reports
    opt = ["-O0", "-g", *SANITIZE_FLAGS] if sanitize else ["-O1"]
    cmd = [
        cxx,
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-pthread",
        *opt,
        "-Wall",
        "-Wextra",
        "-Wconversion",
        "-Wsign-conversion",
        "-Wshadow",
        "-Wno-unused-parameter",
        f"-I{SHIM_DIR}",
        f"-I{out_dir}",
        str(cpp),
        "-o",
        str(lib),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"host-shim build failed: {' '.join(cmd)}\n{proc.stderr}")
    (out_dir / "build.log").write_text(proc.stderr, encoding="utf-8")
    return lib


def _names_in(source: str) -> list[str]:
    import re

    bases = re.findall(r"__global__\s+void\s+(refattn_\w+)\s*\(", source)
    return [f"{b}<{t}>" for b in bases for t in ("float", "double")]


_NP_OF_C = {
    "float": np.float32,
    "double": np.float64,
    "long long": np.int64,
    "int": np.int32,
}
_CT_OF_C = {
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "long long": ctypes.c_longlong,
    "int": ctypes.c_int,
}


class ShimLibrary:
    """A loaded host-shim build: kernel name -> (index, parameter types)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.refattn_shim_count.restype = ctypes.c_int
        self.lib.refattn_shim_name.restype = ctypes.c_char_p
        self.lib.refattn_shim_name.argtypes = [ctypes.c_int]
        self.lib.refattn_shim_signature.restype = ctypes.c_char_p
        self.lib.refattn_shim_signature.argtypes = [ctypes.c_int]
        self.lib.refattn_shim_launch.restype = None
        self.lib.refattn_shim_launch.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self.kernels: dict[str, tuple[int, list[str]]] = {}
        for i in range(self.lib.refattn_shim_count()):
            name = self.lib.refattn_shim_name(i).decode()
            sig = self.lib.refattn_shim_signature(i).decode().rstrip(",")
            self.kernels[name] = (i, sig.split(",") if sig else [])

    def runner(self, block: int = 32, max_grid: int = 3) -> ShimRunner:
        return ShimRunner(self, block, max_grid)

    def call(self, name: str, grid: int, block: int, args: tuple[Any, ...]) -> None:
        """Launch `name` after checking every argument against its C type."""
        index, sig = self.kernels[name]
        if len(args) != len(sig):
            raise TypeError(
                f"{name}: expected {len(sig)} arguments {sig}, got {len(args)}"
            )
        holders: list[Any] = []
        for pos, (a, ctype) in enumerate(zip(args, sig, strict=True)):
            holders.append(_convert(name, pos, a, ctype))
        argv = (ctypes.c_void_p * max(1, len(holders)))(
            *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders]
        )
        self.lib.refattn_shim_launch(index, grid, block, argv)


def _convert(name: str, pos: int, a: Any, ctype: str) -> Any:
    where = f"{name} argument {pos} ({ctype})"
    if ctype.endswith("*"):
        base = ctype.removeprefix("const ").removesuffix("*")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{where}: expected a NumPy array, got {type(a).__name__}")
        if a.dtype != _NP_OF_C[base]:
            raise TypeError(
                f"{where}: expected {_NP_OF_C[base].__name__}, got {a.dtype}"
            )
        if not ctype.startswith("const ") and not a.flags.writeable:
            raise TypeError(f"{where}: output array is read-only")
        return ctypes.c_void_p(a.ctypes.data)
    want = _NP_OF_C[ctype]
    if type(a) is not want:
        raise TypeError(
            f"{where}: expected a {want.__name__} scalar, got {type(a).__name__}"
        )
    return _CT_OF_C[ctype](a.item())


@dataclass
class ShimRunner:
    """refattn.cuda._runner.Runner on the CPU: NumPy arrays, host-shim kernels."""

    library: ShimLibrary
    block: int
    max_grid: int
    xp: Any = np
    launched: list[tuple[str, int]] = field(default_factory=list)

    def launch(self, base: str, dtype: Any, grid: int, args: tuple[Any, ...]) -> None:
        name = rc.kernel_name(base, dtype)
        if not 1 <= grid <= self.max_grid:
            raise ValueError(f"{name}: grid {grid} outside 1..{self.max_grid}")
        self.launched.append((name, grid))
        self.library.call(name, grid, self.block, args)
