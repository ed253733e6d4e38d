"""What every framework adapter shares: factories, name maps, layouts, results.

An adapter (``refattn.adapters.torch``, ``.jax``, ``.keras``) runs the
user's implementation on a golden case and returns its tensors under the
fixture's keys, for ``refattn.validate.validate_results``.  The steps that do
not depend on the framework live here, once:

* ``load_factory``: ``MODULE:FACTORY`` -> the callable, importing exactly
  that module (the current directory first, as ``python -m`` does);
* ``factory_config``: the dict a factory is called with;
* ``build_name_map``: canonical fixture name -> the name the user's code
  gives the tensor (``canonical``, ``anchor`` or a JSON map);
* ``resolve_names``: ``build_name_map`` then ``match_names``, with the
  anchor map also fitting one part of the anchor's model on its own and a
  mismatch that names the nearest names;
* ``match_names``: that map resolved against the names the user's code
  really has, with the Flax/Keras leaf aliases (``kernel`` for ``weight``,
  ``moving_variance`` for ``running_var``...);
* ``to_theirs`` / ``to_canonical``: a parameter in and a gradient out of the
  channels-last kernel layout of a leaf named ``kernel``;
* ``to_data_format`` / ``from_data_format``: inputs and outputs between the
  fixture's channels-first layout and channels-last;
* ``checked_output``: the output refused unless it is a real float array of
  the fixture's shape;
* ``TheirCode``: ``sys.exit()`` or a stray ``KeyboardInterrupt`` in the
  user's code becomes ``UserCodeError`` (exit 2), a real Ctrl-C still
  interrupts.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from refattn.validate import ValidationInputError, check_real_float

__all__ = [
    "DATA_FORMATS",
    "LEAF_ALIASES",
    "TheirCode",
    "UserCodeError",
    "build_name_map",
    "checked_output",
    "factory_config",
    "factory_label",
    "fixture_results",
    "from_data_format",
    "is_kernel",
    "load_factory",
    "load_value",
    "match_names",
    "raised",
    "resolve_names",
    "to_canonical",
    "to_data_format",
    "to_theirs",
]

DATA_FORMATS = ("channels_first", "channels_last")
"""How the user's code lays out an input or output: the fixture's own
(N, C, *spatial), or (N, *spatial, C) as Flax and Keras default to."""

LEAF_ALIASES: dict[str, tuple[str, ...]] = {
    "weight": ("kernel", "scale", "gamma"),
    "bias": ("beta",),
    "running_mean": ("mean", "moving_mean"),
    "running_var": ("var", "moving_variance"),
}
"""The last component of a canonical (PyTorch-style) name -> what Flax
(``kernel``, ``scale``, ``mean``, ``var``) and Keras (``kernel``, ``gamma``,
``beta``, ``moving_mean``, ``moving_variance``) call the same tensor.  A name
is first looked up as it is; an alias is used only when the name itself is
absent and exactly one alias exists under the same parent."""


class UserCodeError(ValidationInputError):
    """The user's code ended the run itself: it raised ``SystemExit`` (called
    ``sys.exit``) or ``KeyboardInterrupt`` without a Ctrl-C, so there is no
    verdict.  A ``ValueError`` like the adapters' other refusals: a pytest
    run goes on and reports it, and ``refattn validate`` exits 2."""


class TheirCode:
    """A context in which the user's code runs (``who``, doing ``doing``,
    which the caller updates step by step): ``SystemExit`` and a
    ``KeyboardInterrupt`` that no SIGINT caused become ``UserCodeError``.
    A real SIGINT is recorded by a handler installed for the block (in the
    main thread, over Python's default one) and its interrupt goes through."""

    def __init__(self, who: str, doing: str) -> None:
        self.who = who
        self.doing = doing
        self._sigint_seen = False
        self._previous: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._sigint_seen = True
        signal.default_int_handler(signum, frame)

    def __enter__(self) -> TheirCode:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if isinstance(err, SystemExit):
            what = f"SystemExit({err.code!r})"
        elif isinstance(err, KeyboardInterrupt) and not self._sigint_seen:
            what = "KeyboardInterrupt"
        else:
            return
        raise UserCodeError(f"{self.who} raised {what} {self.doing}; no verdict") from err


def import_framework(module: str, label: str, extra: str) -> Any:
    """The framework `module`, or a ValidationInputError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValidationInputError(
            f"{label} is not installed: pip install 'refattn[{extra}]'"
        ) from None


def factory_label(factory: Callable[..., Any]) -> str:
    """``module:qualname`` of a factory, as ``--torch``/``--jax`` spell it."""
    module = getattr(factory, "__module__", None)
    name = getattr(factory, "__qualname__", None)
    return f"{module}:{name}" if module and name else repr(factory)


def raised(what: str, err: BaseException) -> str:
    """``<what> raised <Type>: <message on one line>``."""
    return f"{what} raised {type(err).__name__}: {' '.join(str(err).split())}"


def load_factory(spec: str, *, option: str = "--torch",
                 framework: Callable[[], Any] | None = None
                 ) -> Callable[[dict[str, Any]], Any]:
    """``pkg.module:factory`` -> the callable (imports exactly that module).

    Args:
        spec: ``MODULE:FACTORY``.
        option: the command-line option it came from, for the messages.
        framework: called first, so that a missing framework is said as such
            rather than as the user's module failing to import.

    The current directory is searched first, as ``python -m`` does, so a
    module beside the user's shell needs no PYTHONPATH.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or not attr.isidentifier():
        raise ValidationInputError(
            f"{option}: expected MODULE:FACTORY (e.g. mypkg.cbam:make_cbam), got {spec!r}"
        )
    if framework is not None:
        framework()
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        with TheirCode(f"the module {module_name}", f"while imported for {option} {spec}"):
            module = importlib.import_module(module_name)
    except UserCodeError:
        raise
    except Exception as err:  # ImportError, or their module raising while it loads
        raise ValidationInputError(
            f"{option}: cannot import {module_name!r}: {type(err).__name__}: "
            f"{' '.join(str(err).split())}"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValidationInputError(f"{option}: {module_name} has no callable {attr!r}")
    return factory


def build_name_map(case: Any, names: str | Mapping[str, str]) -> dict[str, str]:
    """canonical fixture name -> the user's name for it.

    `names`: ``"canonical"`` (identical names), ``"anchor"`` (the manifest's
    anchor map), or the user's map: a mapping, a JSON object given inline
    (text starting with ``{``) or the path of a JSON file.  A key of the
    user's map is a canonical name (an exact rule) or, when it is empty or
    ends with ``.``, a prefix rule: ``{"mlp.": "ChannelGate.mlp."}`` renames
    every name starting ``mlp.``.  An exact rule wins over a prefix rule,
    and a longer prefix over a shorter one; a name no rule covers keeps its
    canonical name, and a rule no name of the case matches is ignored, so
    one map serves every config of a block and its gate-level blocks.
    Keys of the form ``aux.<name>`` name forward hooks instead
    (``aux_hooks``) and are not parameter rules.
    """
    canonical = [k.split(".", 1)[1] for k in case.tensors if k.startswith(("param.", "state."))]
    if names == "canonical":
        return {k: k for k in canonical}
    if names == "anchor":
        anchor = case.manifest.get("anchor_names") or {}
        if not anchor and canonical:
            raise ValidationInputError(
                f"--names anchor: the case's preset ({case.manifest.get('preset')}) has no "
                "anchor name map; use --names canonical or a JSON map"
            )
        return {k: anchor.get(k, k) for k in canonical}
    user = user_name_map(names)
    rules = {k: v for k, v in user.items() if not k.startswith(AUX_PREFIX)}
    return {k: apply_name_rules(rules, k) for k in canonical}


AUX_PREFIX = "aux."
"""A key ``aux.<name>`` of a --names map names the submodule whose forward
output is the fixture's ``aux.<name>`` tensor (``refattn.adapters.torch``)."""


def is_prefix_rule(key: str) -> bool:
    """A --names key that renames a prefix: empty, or ending with ``.``."""
    return key == "" or key.endswith(".")


def apply_name_rules(rules: Mapping[str, str], name: str) -> str:
    """`name` renamed by the exact rule for it, else by the longest prefix
    rule it starts with, else unchanged."""
    if name in rules and not is_prefix_rule(name):
        return rules[name]
    best = None
    for key in rules:
        if is_prefix_rule(key) and name.startswith(key) and (
                best is None or len(key) > len(best)):
            best = key
    return name if best is None else rules[best] + name[len(best):]


def user_name_map(names: str | Mapping[str, str]) -> dict[str, str]:
    """The user's --names map (a mapping, inline JSON or a JSON file),
    checked to be an object of strings."""
    if isinstance(names, str):
        if names.lstrip().startswith("{"):
            from refattn.golden.files import shown

            try:
                user = json.loads(names)
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValidationInputError(
                    f"--names: cannot read the inline JSON map: {shown(str(err))}"
                ) from None
        else:
            user = _read_name_map(Path(names))
    else:
        user = dict(names)
    if not isinstance(user, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
        raise ValidationInputError(
            '--names: the map must be a JSON object of strings, e.g. '
            '{"mlp.": "ChannelGate.mlp."}')
    return user


def resolve_names(case: Any, names: str | Mapping[str, str], theirs: Iterable[str], *,
                  aliases: bool = True, what: str = "module") -> dict[str, str]:
    """canonical name -> their tensor's name: ``match_names`` of
    ``build_name_map``, with two helps.

    * ``names="anchor"`` also matches a module that is one part of the
      anchor's model on its own (Jongchan's ``ChannelGate`` rather than a
      ``CBAM`` holding it): when every anchor name starts with the same
      attribute (``ChannelGate.``) and the module's names are the anchor
      names without it, those are used.
    * A mismatch names the nearest of their names for each name they lack,
      and says so when ``--names anchor`` (or ``canonical``) would match.
    """
    their_set = set(theirs)
    try:
        return _fit(case, names, their_set, aliases=aliases, what=what)
    except ValidationInputError as err:
        failure = err
    name_map = build_name_map(case, names)
    hints = []
    for other in ("anchor", "canonical"):
        if other == names or (other == "anchor" and not case.manifest.get("anchor_names")):
            continue
        try:
            _fit(case, other, their_set, aliases=aliases, what=what)
        except ValidationInputError:
            continue
        hints.append(f"--names {other} matches this {what}")
        break
    wanted = {m for m in name_map.values()
              if (_resolve(m, their_set) if aliases else m if m in their_set else None)
              is None}
    extra = sorted(their_set - set(_found_names(name_map, their_set, aliases)))
    near = []
    for name in sorted(wanted):
        close = difflib.get_close_matches(name, extra, n=1, cutoff=0.3)
        if close:
            near.append(f"{name} ~ {close[0]}")
    if names not in ("canonical", "anchor"):
        canonical = list(name_map)
        unused = sorted(k for k in user_name_map(names)
                        if not k.startswith(AUX_PREFIX) and not any(
                            n == k or (is_prefix_rule(k) and n.startswith(k))
                            for n in canonical))
        if unused:
            hints.append(f"rules of the map that no name of this case matches: "
                         f"{', '.join(repr(k) for k in unused[:8])} (the case's names: "
                         f"{', '.join(sorted(canonical)) or 'none'})")
    if near:
        hints.append("nearest names: " + ", ".join(near[:8])
                     + (f" (+{len(near) - 8} more)" if len(near) > 8 else ""))
    if not hints:
        raise failure
    raise ValidationInputError(f"{failure}; " + "; ".join(hints)) from None


def _fit(case: Any, names: str | Mapping[str, str], their_set: set[str], *,
         aliases: bool, what: str) -> dict[str, str]:
    """``match_names`` of ``build_name_map``; for the anchor map, also the
    map without the first component all its names share."""
    name_map = build_name_map(case, names)
    try:
        return match_names(name_map, their_set, aliases=aliases, what=what)
    except ValidationInputError:
        stripped = _without_common_head(name_map) if names == "anchor" else None
        if stripped is None:
            raise
    return match_names(stripped, their_set, aliases=aliases, what=what)


def _found_names(name_map: Mapping[str, str], their_set: set[str],
                 aliases: bool) -> list[str]:
    out = []
    for mapped in name_map.values():
        f = _resolve(mapped, their_set) if aliases else (
            mapped if mapped in their_set else None)
        if f is not None:
            out.append(f)
    return out


def _without_common_head(name_map: Mapping[str, str]) -> dict[str, str] | None:
    """The map with the first component its values all share removed (None
    when they share none, or when there is nothing to map)."""
    heads = {v.split(".", 1)[0] for v in name_map.values()}
    if len(heads) != 1 or not all("." in v for v in name_map.values()):
        return None
    return {k: v.split(".", 1)[1] for k, v in name_map.items()}


NAME_MAP_LIMIT = 2**20
"""The largest --names JSON map read (a map of a few hundred names is ~10 kB)."""


def _read_name_map(path: Path) -> Any:
    """The user's JSON map: a regular UTF-8 file of at most ``NAME_MAP_LIMIT``
    bytes (a FIFO or a device is refused unread)."""
    from refattn.golden.files import display_path, read_regular, shown

    where = display_path(path)
    try:
        data = read_regular(path, limit=NAME_MAP_LIMIT, what="--names")
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValidationInputError(
            f"--names: cannot read JSON map {where}: not UTF-8 text (byte "
            f"{err.start}: {err.object[err.start:err.start + 1]!r})") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValidationInputError(
            f"--names: cannot read JSON map {where}: {shown(str(err))}") from None
    except OSError as err:
        raise ValidationInputError(
            f"--names: cannot read JSON map {where}: {err.strerror or err}") from None
    except ValueError as err:  # not a regular file, or too large
        raise ValidationInputError(str(err)) from None


def factory_config(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a factory is called with: the case's resolved config dict, plus
    ``input_shapes`` ({input name: shape}) and ``in_channels`` (the channels
    of the first input), which module constructors need."""
    config = dict(manifest["config"])
    shapes = {k: list(v) for k, v in manifest.get("input_shapes", {}).items()}
    config["input_shapes"] = shapes
    first = manifest["inputs"][0] if manifest.get("inputs") else None
    if first is not None and first in shapes and len(shapes[first]) > 1:
        config["in_channels"] = shapes[first][1]
    return config


def _mismatch(wanted: Iterable[str], theirs: Iterable[str], what: str) -> ValidationInputError:
    lacks = sorted(set(wanted) - set(theirs))
    extra = sorted(set(theirs) - set(wanted))
    return ValidationInputError(
        "parameter names do not match: fixture (mapped) has "
        f"[{', '.join(lacks) or '-'}] the {what} lacks; the {what} has "
        f"[{', '.join(extra) or '-'}] the fixture lacks"
    )


def _resolve(name: str, theirs: set[str]) -> str | None:
    """`name` itself if they have it, else its one alias (None if no alias or
    several: an ambiguous alias is no match)."""
    if name in theirs:
        return name
    parent, dot, leaf = name.rpartition(".")
    found = [f"{parent}{dot}{alias}" for alias in LEAF_ALIASES.get(leaf, ())
             if f"{parent}{dot}{alias}" in theirs]
    return found[0] if len(found) == 1 else None


def match_names(name_map: Mapping[str, str], theirs: Iterable[str], *,
                aliases: bool = True, what: str = "module") -> dict[str, str]:
    """canonical name -> their tensor's name, every one of theirs used once.

    Args:
        name_map: from ``build_name_map``.
        theirs: the names of the tensors their code holds (floating-point
            ones; counters are left out by the caller).
        aliases: also accept a ``LEAF_ALIASES`` leaf (``kernel`` for
            ``weight``...).  PyTorch names are matched exactly.
        what: "module", "pytree", "layer": for the message.

    Raises:
        ValidationInputError: a mapped name they lack, or a tensor of theirs
            the fixture has no value for (it would stay at its own init).
    """
    their_set = set(theirs)
    found = {canon: (_resolve(mapped, their_set) if aliases
                     else mapped if mapped in their_set else None)
             for canon, mapped in name_map.items()}
    if None not in found.values() and set(found.values()) == their_set:
        return found  # type: ignore[return-value]
    wanted = {f if f is not None else name_map[c] for c, f in found.items()}
    raise _mismatch(wanted, their_set, what)


def is_kernel(their_name: str) -> bool:
    """Flax and Keras call a convolution's or dense layer's weight ``kernel``
    and store it channels-last: (*k, C_in, C_out), where PyTorch and the
    fixture have (C_out, C_in, *k)."""
    return their_name.rpartition(".")[2] == "kernel"


def _kernel_perm(ndim: int) -> tuple[int, ...]:
    """(C_out, C_in, *k) -> (*k, C_in, C_out): the spatial axes first, then
    the two channel axes reversed.  Its own inverse only for ndim <= 2."""
    return tuple(range(2, ndim)) + (1, 0) if ndim >= 2 else tuple(range(ndim))


def _squeezed(shape: Iterable[int]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def to_theirs(value: np.ndarray, their_shape: tuple[int, ...], *, kernel: bool,
              name: str, canon: str) -> np.ndarray:
    """The fixture's `value` in their tensor's layout and shape.

    A ``kernel`` leaf gets the channels-last kernel permutation first; then a
    shape that differs only by size-1 axes is reshaped (a dense layer's
    (C_in, C_out) for a 1x1 convolution's, a 1x1 conv for a linear layer).

    Raises:
        ValidationInputError: the shapes disagree otherwise.
    """
    v = np.transpose(value, _kernel_perm(value.ndim)) if kernel else value
    if tuple(v.shape) == tuple(their_shape):
        return v
    if _squeezed(v.shape) == _squeezed(their_shape):
        return v.reshape(their_shape)
    layout = " (kernel layout: (*k, C_in, C_out))" if kernel else ""
    raise ValidationInputError(
        f"{name}: the shape is {tuple(their_shape)}{layout}, the fixture's {canon} is "
        f"{tuple(value.shape)}" + (f", i.e. {tuple(v.shape)} in that layout" if kernel else "")
    )


def to_canonical(grad: np.ndarray, canon_shape: tuple[int, ...], *, kernel: bool
                 ) -> np.ndarray:
    """Inverse of ``to_theirs``: their gradient in the fixture's shape."""
    if not kernel:
        return grad.reshape(canon_shape)
    perm = _kernel_perm(len(canon_shape))
    permuted = tuple(canon_shape[p] for p in perm)
    return np.transpose(grad.reshape(permuted), np.argsort(perm))


def to_data_format(x: np.ndarray, data_format: str) -> np.ndarray:
    """(N, C, *spatial) -> (N, *spatial, C) for channels_last; unchanged for
    channels_first or an array with fewer than 3 axes."""
    if data_format == "channels_first" or x.ndim < 3:
        return x
    return np.moveaxis(x, 1, -1)


def from_data_format(x: np.ndarray, data_format: str) -> np.ndarray:
    """Inverse of ``to_data_format``."""
    if data_format == "channels_first" or x.ndim < 3:
        return x
    return np.moveaxis(x, -1, 1)


def check_data_format(data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise ValidationInputError(
            f"data_format: expected one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    return data_format


def checked_output(value: Any, expected_shape: tuple[int, ...], subject: str,
                   data_format: str = "channels_first") -> np.ndarray:
    """Their output as a channels-first ndarray, refused unless it is a real
    floating-point array of the fixture's shape (nothing is cast: a complex
    output would pass on its real part)."""
    out = check_real_float("output.out", value, subject)
    out = from_data_format(out, data_format)
    if tuple(out.shape) != tuple(expected_shape):
        layout = "" if data_format == "channels_first" else f" (read as {data_format})"
        raise ValidationInputError(
            f"{subject}: the output has shape {tuple(out.shape)}{layout}, the fixture's "
            f"output.out is {tuple(expected_shape)}"
        )
    return out


def fixture_results(case: Any, found: Mapping[str, str], *, out: np.ndarray,
                    input_grads: Iterable[Any], param_grads: Mapping[str, Any],
                    state_after: Mapping[str, Any], data_format: str
                    ) -> dict[str, np.ndarray]:
    """Their tensors under the fixture's keys, in the fixture's layouts.

    Args:
        found: canonical name -> their name (``match_names``).
        out: the checked output (``checked_output``: already channels-first).
        input_grads: one per input, in the manifest's order, in
            `data_format` (None where their framework gave no gradient).
        param_grads: their name -> gradient, in their layout (a parameter the
            forward never used may be missing: its gradient is zero).
        state_after: their name -> running statistic after the forward (empty
            when their code does not return it: those rows are NOT CHECKED).
    """
    results: dict[str, np.ndarray] = {"output.out": out}
    for name, dx in zip(case.manifest["inputs"], input_grads):
        if dx is not None:
            results[f"grad.input.{name}"] = from_data_format(np.asarray(dx), data_format)
    for canon, theirs in found.items():
        if f"param.{canon}" in case.tensors:
            shape = case.tensors[f"param.{canon}"].shape
            grad = param_grads.get(theirs)
            results[f"grad.param.{canon}"] = (
                np.zeros(shape) if grad is None
                else to_canonical(np.asarray(grad), shape, kernel=is_kernel(theirs)))
        elif f"output.state.{canon}" in case.tensors and theirs in state_after:
            shape = case.tensors[f"output.state.{canon}"].shape
            results[f"output.state.{canon}"] = np.asarray(state_after[theirs]).reshape(shape)
    return results


def load_value(case: Any, canon: str, their_name: str, their_shape: tuple[int, ...]
               ) -> np.ndarray:
    """The fixture's ``param.<canon>`` (or ``state.<canon>``) in the layout and
    shape of their tensor `their_name` (``to_theirs``)."""
    value = case.tensors.get(f"param.{canon}")
    if value is None:
        value = case.tensors[f"state.{canon}"]
    return to_theirs(value, their_shape, kernel=is_kernel(their_name), name=their_name,
                     canon=canon)
