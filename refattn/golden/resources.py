"""Will a case fit?  The memory a case needs, estimated from its shapes and
config before anything is drawn, and the memory this process may still use.

``case_bytes`` is a deliberate over-estimate of the peak that generating,
writing and reading back a case (or gradchecking it) adds to the process:

    bytes = COPIES * 8 * (P + A + M)

where, with N the batch and L the number of positions (H*W) of an input,

* ``P`` counts the parameter and buffer elements (``param_shapes``);
* ``A = sum over inputs of N * width * L``: every activation of the block
  is at most ``width`` channels wide, the largest of the input channels,
  a parameter's first dimension (a layer's output channels) and the
  product of its other dimensions (an unfolded k x k convolution);
* ``M = N * L_first * sum of L over inputs`` for blocks whose cache holds a
  map over pairs of positions (``PAIRWISE``: non-local attention, 0 else);
* ``COPIES`` covers the float64 reference, its cache and gradients, the
  stored copies and the read-back check; tests/golden/test_resources.py
  measures the real peak of every block and preset and checks that the
  estimate is never below it.

``available_bytes`` is the least of what the kernel would still give: the
system's ``MemAvailable``, the memory cgroup's limit less its usage (v2
``memory.max``/``memory.current``, v1 ``memory.limit_in_bytes``/
``memory.usage_in_bytes``, for this process's cgroup and every cgroup above
it), and the address-space and data limits (``RLIMIT_AS``, ``RLIMIT_DATA``)
less what the process already maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COPIES", "PAIRWISE", "Available", "available_bytes", "case_bytes",
           "gib"]

COPIES = 6
"""Float64 copies of the dominant terms alive at the peak (measured: at most
4.1 for the blocks' standard presets at twice their fixture shapes)."""

PAIRWISE = frozenset({"non_local", "cross_layer"})
"""Blocks whose forward builds an N x L x L' map over pairs of positions."""

_UNLIMITED = 2**60
"""Limits at or above this are 'no limit' (cgroup v1 writes 2**63 - 4096)."""


def case_bytes(block: str, shapes: Mapping[str, Sequence[int]],
               param_shapes: Mapping[str, Sequence[int]]) -> int:
    """The estimated peak bytes of one case (module docstring)."""
    params = sum(math.prod(s) for s in param_shapes.values())
    width = max([s[1] for s in shapes.values() if len(s) > 1]
                + [s[0] for s in param_shapes.values() if len(s) > 0]
                + [math.prod(s[1:]) for s in param_shapes.values() if len(s) > 1]
                + [1])
    positions = [math.prod(s[2:]) for s in shapes.values()]
    batch = max((s[0] for s in shapes.values() if s), default=1)
    activations = sum(batch * width * n for n in positions)
    pairs = batch * positions[0] * sum(positions) if block in PAIRWISE else 0
    return COPIES * 8 * (params + activations + pairs)


@dataclass(frozen=True)
class Available:
    """Bytes the process may still allocate, and the limit that says so."""

    bytes: int
    source: str  # "MemAvailable", "cgroup memory.max 1.0 GiB (0.1 GiB in use)", ...


def available_bytes(proc: Path = Path("/proc"),
                    cgroup_root: Path = Path("/sys/fs/cgroup")) -> Available | None:
    """The least of the limits in the module docstring; None when none can be
    read (not Linux).  `proc` and `cgroup_root` are parameters for tests."""
    found = [a for a in (_meminfo(proc), *_cgroups(proc, cgroup_root), *_rlimits(proc))
             if a is not None]
    return min(found, key=lambda a: a.bytes) if found else None


def gib(n: float) -> str:
    """``n`` bytes in a short human form: '1.2 GiB', '340 MiB', '12 KiB'."""
    if n >= 2**1000:  # beyond a float: no machine has it anyway
        return "more than 2**1000 B"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _meminfo(proc: Path) -> Available | None:
    try:
        lines = (proc / "meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, rest = line.partition(":")
        if key == "MemAvailable" and rest.split():
            return Available(int(rest.split()[0]) * 1024, "MemAvailable")
    return None


def _cgroup_dirs(proc: Path, cgroup_root: Path) -> list[tuple[Path, str]]:
    """(directory, version) of this process's memory cgroup and its ancestors,
    as mounted under `cgroup_root` (v2: the unified hierarchy, at the root or
    under ``unified/``; v1: ``memory/``)."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and rel:
            mounts = [(cgroup_root, "v2"), (cgroup_root / "unified", "v2")]
        elif "memory" in controllers.split(","):
            mounts = [(cgroup_root / "memory", "v1")]
        else:
            continue
        for mount, version in mounts:
            here = mount / rel.lstrip("/")
            while True:
                out.append((here, version))
                if here == mount or mount not in here.parents:
                    break
                here = here.parent
    return out


def _cgroups(proc: Path, cgroup_root: Path) -> list[Available | None]:
    out: list[Available | None] = []
    for directory, version in _cgroup_dirs(proc, cgroup_root):
        names = (("memory.max", "memory.current") if version == "v2"
                 else ("memory.limit_in_bytes", "memory.usage_in_bytes"))
        limit = _read_int(directory / names[0])
        if limit is None:
            continue
        used = _read_int(directory / names[1]) or 0
        out.append(Available(max(limit - used, 0),
                             f"cgroup {names[0]} {gib(limit)}, {gib(used)} in use"))
    return out


def _rlimits(proc: Path) -> list[Available | None]:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return []
    status = _status_kib(proc)
    out: list[Available | None] = []
    for name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft == resource.RLIM_INFINITY or soft >= _UNLIMITED:
            continue
        used = status.get(field, 0) * 1024
        out.append(Available(max(soft - used, 0),
                             f"{name} {gib(soft)}, {gib(used)} already mapped"))
    return out


def _status_kib(proc: Path) -> dict[str, int]:
    try:
        lines = (proc / "self" / "status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out
