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

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from refattn.adapters import common
from refattn.adapters.common import (
    TheirCode,
    UserCodeError,
    build_name_map,
    factory_config,
    factory_label,
    raised,
)
from refattn.validate import ValidationInputError

__all__ = ["UserCodeError", "build_name_map", "factory_config", "load_factory",
           "run_torch_case"]

_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _torch() -> Any:
    return common.import_framework("torch", "PyTorch", "torch")


def load_factory(spec: str) -> Callable[[dict[str, Any]], Any]:
    """``pkg.module:factory`` -> the callable (imports exactly that module;
    see ``refattn.adapters.common.load_factory``)."""
    return common.load_factory(spec, option="--torch", framework=_torch)


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
    who = f"the factory {factory_label(factory)}"
    with TheirCode(who, "while building the module") as their:
        return _run_module(case, factory, their, names=names, device=device,
                           torch=torch, dtype=dtype)


def _run_module(case: Any, factory: Callable[[dict[str, Any]], Any], their: TheirCode,
                *, names: str | Mapping[str, str], device: str, torch: Any, dtype: Any
                ) -> dict[str, np.ndarray]:
    """The body of ``run_torch_case``, inside ``their`` (whose ``doing`` it
    keeps up to date for the message of a ``UserCodeError``)."""
    manifest = case.manifest
    config = factory_config(manifest)
    try:
        module = factory(config)
    except Exception as err:
        raise ValidationInputError(raised("the factory", err)) from err
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
    common.match_names(name_map, theirs, aliases=False, what="module")
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
        raise ValidationInputError(raised("the module's forward", err)) from err
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
        raise ValidationInputError(raised("the backward of the module's output", err)
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


def _named_tensors(module: Any) -> list[tuple[str, Any]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()
