"""Run a ``torch.nn.Module`` against a golden case.

``run_torch_case(case, factory)`` builds the module with ``factory(config)``,
loads the fixture's parameters and running statistics into it by name, sets
train or eval mode from the case, runs the forward on the fixture's inputs
(positionally, in manifest order), backpropagates the fixture's cotangent and
returns the module's outputs, updated running statistics, input gradients and
parameter gradients under the fixture's key names, ready for
``refattn.validate.validate_results``.

torch is imported lazily, and only the module the user names is imported.

Their code cannot end the run without a verdict: ``sys.exit()`` or a raised
``KeyboardInterrupt`` while their module is imported, built, loaded, run
forward or backward is ``UserCodeError`` naming the factory and the step.
A real Ctrl-C (SIGINT) during their code stays a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from refattn.validate import ValidationInputError

__all__ = ["UserCodeError", "build_name_map", "factory_config", "load_factory",
           "run_torch_case"]

_IGNORED_SUFFIXES = ("num_batches_tracked",)


class UserCodeError(ValidationInputError):
    """The user's code ended the run itself: it raised ``SystemExit`` (called
    ``sys.exit``) or ``KeyboardInterrupt`` without a Ctrl-C, so there is no
    verdict.  A ``ValueError`` like the adapter's other refusals: a pytest
    run goes on and reports it, and ``refattn validate`` exits 2."""


class _TheirCode:
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

    def __enter__(self) -> _TheirCode:
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
            raised = f"SystemExit({err.code!r})"
        elif isinstance(err, KeyboardInterrupt) and not self._sigint_seen:
            raised = "KeyboardInterrupt"
        else:
            return
        raise UserCodeError(
            f"{self.who} raised {raised} {self.doing}; no verdict"
        ) from err


def _label(factory: Callable[..., Any]) -> str:
    """``module:qualname`` of a factory, as ``--torch`` spells it."""
    module = getattr(factory, "__module__", None)
    name = getattr(factory, "__qualname__", None)
    return f"{module}:{name}" if module and name else repr(factory)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ValidationInputError(
            "PyTorch is not installed: pip install 'refattn[torch]'"
        ) from None
    return torch


def load_factory(spec: str) -> Callable[[dict[str, Any]], Any]:
    """``pkg.module:factory`` -> the callable (imports exactly that module).

    The current directory is searched first, as ``python -m`` does, so a
    module beside the user's shell needs no PYTHONPATH.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or not attr.isidentifier():
        raise ValidationInputError(
            f"--torch: expected MODULE:FACTORY (e.g. mypkg.cbam:make_cbam), got {spec!r}"
        )
    _torch()  # a missing torch is said as such, not as their module failing to import
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        with _TheirCode(f"the module {module_name}",
                        f"while imported for --torch {spec}"):
            module = importlib.import_module(module_name)
    except UserCodeError:
        raise
    except Exception as err:  # ImportError, or their module raising while it loads
        raise ValidationInputError(
            f"--torch: cannot import {module_name!r}: {type(err).__name__}: "
            f"{' '.join(str(err).split())}"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValidationInputError(f"--torch: {module_name} has no callable {attr!r}")
    return factory


def build_name_map(case: Any, names: str | Mapping[str, str]) -> dict[str, str]:
    """canonical fixture name -> module state_dict name.

    `names`: ``"canonical"`` (identical names), ``"anchor"`` (the manifest's
    anchor map) or a mapping / path of a JSON file with the user's map.
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
    if isinstance(names, str):
        user = _read_name_map(Path(names))
    else:
        user = dict(names)
    if not isinstance(user, dict) or not all(isinstance(v, str) for v in user.values()):
        raise ValidationInputError("--names: the map must be a JSON object of strings")
    unknown = sorted(set(user) - set(canonical))
    if unknown:
        raise ValidationInputError(
            f"--names: the map's keys must be the fixture's parameter names; unknown: "
            f"{', '.join(unknown)} (known: {', '.join(sorted(canonical)) or 'none'})"
        )
    return {k: user.get(k, k) for k in canonical}


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


_DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Devices whose tensors hold data that can be read back (not ``meta``)."""


def _torch_device(torch: Any, device: Any) -> Any:
    """``torch.device(device)``, or ``ValidationInputError`` naming --device."""
    from refattn.golden.files import shown

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in _DEVICE_TYPES:
        raise ValidationInputError(
            f"--device: expected a torch device of type {', '.join(_DEVICE_TYPES)} "
            f"(e.g. cpu, cuda:0), got {shown(device)}") from None
    return parsed


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


def run_torch_case(case: Any, factory: Callable[[dict[str, Any]], Any], *,
                   names: str | Mapping[str, str] = "canonical", device: str = "cpu"
                   ) -> dict[str, np.ndarray]:
    """Forward and backward of ``factory(config)`` on the case; fixture-keyed results.

    Raises:
        ValidationInputError: the module cannot be run on the case (its
            factory, forward or backward raised; names or shapes disagree).
        UserCodeError: their code called ``sys.exit`` or raised
            ``KeyboardInterrupt`` (a real Ctrl-C still interrupts).
    """
    torch = _torch()
    manifest = case.manifest
    dtype = {"float32": torch.float32, "float64": torch.float64}[manifest["dtype"]]
    device = _torch_device(torch, device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValidationInputError("--device cuda: torch sees no CUDA device")
    who = f"the factory {_label(factory)}"
    with _TheirCode(who, "while building the module") as their:
        return _run_module(case, factory, their, names=names, device=device,
                           torch=torch, dtype=dtype)


def _run_module(case: Any, factory: Callable[[dict[str, Any]], Any], their: _TheirCode,
                *, names: str | Mapping[str, str], device: str, torch: Any, dtype: Any
                ) -> dict[str, np.ndarray]:
    """The body of ``run_torch_case``, inside ``their`` (whose ``doing`` it
    keeps up to date for the message of a ``UserCodeError``)."""
    manifest = case.manifest
    config = factory_config(manifest)
    try:
        module = factory(config)
    except Exception as err:
        raise ValidationInputError(_raised("the factory", err)) from err
    if not isinstance(module, torch.nn.Module):
        raise ValidationInputError(
            f"the factory returned {type(module).__name__}, expected a torch.nn.Module"
        )
    their.doing = "while loading the fixture's parameters into the module"
    module = module.to(device=device, dtype=dtype)

    # 1. load parameters and buffers by name
    name_map = build_name_map(case, names)
    state_dict = module.state_dict()
    theirs = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
    wanted = set(name_map.values())
    if theirs != wanted:
        raise ValidationInputError(
            "parameter names do not match: fixture (mapped) has "
            f"[{', '.join(sorted(wanted - theirs)) or '-'}] the module lacks; the module has "
            f"[{', '.join(sorted(theirs - wanted)) or '-'}] the fixture lacks"
        )
    loaded = {}
    for canon, theirs_name in name_map.items():
        key = f"param.{canon}" if f"param.{canon}" in case.tensors else f"state.{canon}"
        value = case.tensors[key]
        target = state_dict[theirs_name]
        if tuple(target.shape) != tuple(value.shape):
            if target.numel() != value.size:
                raise ValidationInputError(
                    f"{theirs_name}: the module's shape is {tuple(target.shape)}, the "
                    f"fixture's {canon} is {tuple(value.shape)}"
                )
            value = value.reshape(tuple(target.shape))  # e.g. (O, C) vs (O, C, 1, 1)
        loaded[theirs_name] = torch.as_tensor(np.ascontiguousarray(value), dtype=dtype,
                                              device=device)
    with torch.no_grad():
        for name, tensor in _named_tensors(module):
            if name in loaded:
                tensor.copy_(loaded[name])

    # 2. mode, inputs, forward
    module.train(manifest.get("mode") == "train")
    inputs = []
    for name in manifest["inputs"]:
        t = torch.as_tensor(np.ascontiguousarray(case.tensors[f"input.{name}"]), dtype=dtype,
                            device=device).requires_grad_(True)
        inputs.append(t)
    their.doing = "in the module's forward"
    try:
        out = module(*inputs)
    except Exception as err:
        raise ValidationInputError(_raised("the module's forward", err)) from err
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor) and (out.is_complex() or not out.is_floating_point()):
        raise ValidationInputError(
            f"output.out: the module's output has dtype {out.dtype}; expected a real "
            "floating-point tensor (nothing is cast: a complex output would pass on "
            "its real part)")
    expected_shape = tuple(case.tensors["output.out"].shape)
    if tuple(out.shape) != expected_shape:
        raise ValidationInputError(
            f"the module's output has shape {tuple(out.shape)}, the fixture's output.out "
            f"is {expected_shape}"
        )

    # 3. backward with the fixture's cotangent
    cot = torch.as_tensor(np.ascontiguousarray(case.tensors["cotangent.out"]), dtype=dtype,
                          device=device)
    their.doing = "in the backward of the module's output"
    try:
        out.backward(cot)
    except Exception as err:
        raise ValidationInputError(_raised("the backward of the module's output", err)
                                   ) from err

    # 4. collect under fixture keys
    their.doing = "while its results were read"
    results: dict[str, np.ndarray] = {"output.out": _np(out)}
    for name, t in zip(manifest["inputs"], inputs):
        if t.grad is not None:
            results[f"grad.input.{name}"] = _np(t.grad)
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    for canon, theirs_name in name_map.items():
        if f"param.{canon}" in case.tensors:
            p = params.get(theirs_name)
            if p is None:
                continue  # loaded into a buffer: the module does not train it
            shape = case.tensors[f"param.{canon}"].shape
            # a parameter the forward never used has no .grad: its gradient is zero
            grad = np.zeros(shape) if p.grad is None else _np(p.grad).reshape(shape)
            results[f"grad.param.{canon}"] = grad
        elif f"output.state.{canon}" in case.tensors and theirs_name in buffers:
            results[f"output.state.{canon}"] = _np(buffers[theirs_name])
    return results


def _raised(what: str, err: Exception) -> str:
    return f"{what} raised {type(err).__name__}: {' '.join(str(err).split())}"


def _named_tensors(module: Any) -> list[tuple[str, Any]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()
