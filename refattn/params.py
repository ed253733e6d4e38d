"""Flat parameter dicts: the few functions that build and take them apart.

Parameters, buffers and gradients are flat ``{dotted_name: array}`` dicts
whose keys are the canonical names of each block (PyTorch ``state_dict``
style).  A block hands a child the entries under a prefix with
``sub_params`` and puts the prefix back on the child's gradients with
``with_prefix``; shared weights add their gradients with ``add_params``.
"""

from __future__ import annotations

from collections.abc import Mapping

from refattn._typing import Params

BUFFER_SUFFIXES = ("running_mean", "running_var")


def is_buffer(name: str) -> bool:
    """Buffers (BN running statistics) are never differentiated."""
    return name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES


def sub_params(params: Mapping[str, object], prefix: str) -> Params:
    """The entries under ``prefix.``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in params.items() if k.startswith(p)}


def with_prefix(prefix: str, d: Mapping[str, object]) -> Params:
    """Inverse of sub_params: put ``prefix.`` back on every key."""
    return {f"{prefix}.{k}": v for k, v in d.items()}


def add_params(a: Mapping[str, object], b: Mapping[str, object]) -> Params:
    """Key-wise sum of two gradient dicts over the same keys (shared weights)."""
    if a.keys() != b.keys():
        raise ValueError(f"gradient keys differ: {sorted(a.keys() ^ b.keys())}")
    return {k: a[k] + b[k] for k in a}  # type: ignore[operator]
