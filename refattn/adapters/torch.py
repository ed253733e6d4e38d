"""Run a ``torch.nn.Module`` against a golden case.

``run_torch_case(case, factory)`` builds the module with ``factory(config)``,
loads the fixture's parameters and running statistics into it by name, sets
train or eval mode from the case, runs the forward on the fixture's inputs
(positionally, in manifest order), backpropagates the fixture's cotangent and
returns the module's outputs, updated running statistics, input gradients and
parameter gradients under the fixture's key names, ready for
``refattn.validate.validate_results``.

Intermediates (``aux.*``) are compared too when the module exposes them,
by either convention (both may be used at once):

* the module returns ``(out, {name: tensor})``: each ``name`` (with or
  without the ``aux.`` prefix) is the fixture's ``aux.<name>``;
* the --names map has ``"aux.<name>": "<submodule>"`` entries: a forward
  hook records that submodule's output (its last call, when it runs more
  than once; the first element of a tuple output).

A tensor that differs from the fixture's only by size-1 axes is reshaped.

When the module's backward raises, ``BackwardError`` carries the forward's
results (output, running statistics, intermediates), so that the forward is
still compared and reported before the error (``refattn.validate.
validate_run``).

torch is imported lazily, and only the module the user names is imported.

Their code cannot end the run without a verdict: ``sys.exit()`` or a raised
``KeyboardInterrupt`` while their module is imported, built, loaded, run
forward or backward is ``UserCodeError`` naming the factory and the step.
A real Ctrl-C (SIGINT) during their code stays a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import difflib
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
from refattn.validate import BackwardError, ValidationInputError

__all__ = ["UserCodeError", "build_name_map", "factory_config", "load_factory",
           "run_torch_case", "settle_vml_dispatch"]

_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _torch() -> Any:
    torch = common.import_framework("torch", "PyTorch", "torch")
    settle_vml_dispatch(torch)
    return torch


VML_OPS = ("abs", "acos", "asin", "atan", "cos", "erf", "erfc", "exp", "expm1",
           "log", "log10", "log1p", "log2", "sin", "sqrt", "tan", "tanh", "trunc")
"""The float unary ops ATen hands to MKL's VML on contiguous float32/float64
CPU tensors, one chunk of at most 2048 elements per intra-op thread."""

_settled: set[int] = set()


def settle_vml_dispatch(torch: Any) -> None:
    """Call every VML-backed op once per float dtype on one thread, before the
    module under validation makes a multi-threaded call to it.

    oneMKL 2024.2 (the build torch 2.13's wheels link) picks a VML function's
    kernel on its first call.  When that first call runs on several threads
    at once (a tensor of more than 2048 elements), one thread can run a
    low-accuracy kernel over its whole chunk although high accuracy was
    requested (pytorch/pytorch#188792).  Measured on the 2-core test machine:
    the first ``torch.exp`` of a (3, 32, 42) float64 tensor in a fresh process
    had relative errors up to 3.3e-9 in one thread's 2016 elements in 3 of
    42 processes; every later call was exact.  A correct module could then
    fail a float64 case whose tolerance is ~1e-11.  1024 elements stay on the
    calling thread, so after this warm-up the choice is made and later calls
    are accurate.  Once per torch module; a few microseconds.
    """
    if id(torch) in _settled:
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(0.125, 0.875, 1024, dtype=dtype)  # in every op's domain
        for op in VML_OPS:
            getattr(torch, op)(x)
    _settled.add(id(torch))


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
    state_dict = module.state_dict()
    theirs = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
    name_map = common.resolve_names(case, names, theirs, aliases=False, what="module")
    aux_seen = _hook_aux(case, module, names)
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
    finally:
        for handle in aux_seen.pop("", []):
            handle.remove()
    returned: Any = {}
    if isinstance(out, (tuple, list)):
        if len(out) == 2 and isinstance(out[1], Mapping):
            returned = out[1]
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

    forward = {"output.out": _np(out), **_aux_results(case, aux_seen, returned)}

    # 3. backward with the fixture's cotangent
    cot = torch.as_tensor(np.ascontiguousarray(case.tensors["cotangent.out"]), dtype=dtype,
                          device=device)
    their.doing = "in the backward of the module's output"
    try:
        out.backward(cot)
    except Exception as err:
        # the forward is still compared (BackwardError carries it), then the error
        forward |= _state_results(case, module, name_map)
        raise BackwardError(raised("the backward of the module's output", err),
                            forward) from err

    # 4. collect under fixture keys
    their.doing = "while its results were read"
    results: dict[str, np.ndarray] = dict(forward)
    for name, t in zip(manifest["inputs"], inputs):
        if t.grad is not None:
            results[f"grad.input.{name}"] = _np(t.grad)
    params = dict(module.named_parameters())
    for canon, theirs_name in name_map.items():
        if f"param.{canon}" in case.tensors:
            p = params.get(theirs_name)
            if p is None:
                continue  # loaded into a buffer: the module does not train it
            shape = case.tensors[f"param.{canon}"].shape
            # a parameter the forward never used has no .grad: its gradient is zero
            grad = np.zeros(shape) if p.grad is None else _np(p.grad).reshape(shape)
            results[f"grad.param.{canon}"] = grad
    results |= _state_results(case, module, name_map)
    return results


def _state_results(case: Any, module: Any, name_map: Mapping[str, str]
                   ) -> dict[str, np.ndarray]:
    """The running statistics after the forward, under fixture keys."""
    buffers = dict(module.named_buffers())
    return {f"output.state.{canon}": _np(buffers[theirs_name])
            for canon, theirs_name in name_map.items()
            if f"param.{canon}" not in case.tensors
            and f"output.state.{canon}" in case.tensors and theirs_name in buffers}


def _hook_aux(case: Any, module: Any, names: str | Mapping[str, str]
              ) -> dict[str, Any]:
    """Forward hooks for the ``aux.<name>: <submodule>`` entries of the user's
    map: {fixture key: [output]} filled by the forward, and under "" the hook
    handles (removed after the forward)."""
    if names in ("canonical", "anchor"):
        return {}
    user = common.user_name_map(names)
    wanted = {k: v for k, v in user.items() if k.startswith(common.AUX_PREFIX)}
    if not wanted:
        return {}
    modules = dict(module.named_modules())
    seen: dict[str, Any] = {"": []}
    for key, path in sorted(wanted.items()):
        if key not in case.tensors:
            continue  # a rule this case has no tensor for is ignored
        sub = modules.get(path)
        if sub is None:
            near = difflib.get_close_matches(path, [m for m in modules if m], n=3)
            raise ValidationInputError(
                f"--names: {key} names the submodule {path!r}, which the module does "
                "not have" + (f" (nearest: {', '.join(near)})" if near else ""))
        seen[key] = []

        def hook(mod: Any, args: Any, output: Any, _into: list = seen[key]) -> None:
            _into.append(output[0] if isinstance(output, (tuple, list)) else output)

        seen[""].append(sub.register_forward_hook(hook))
    return seen


def _aux_results(case: Any, seen: Mapping[str, Any], returned: Mapping[str, Any]
                 ) -> dict[str, np.ndarray]:
    """The intermediates the module exposed, under fixture keys: the dict a
    module returned beside its output (keys with or without ``aux.``) and
    the last output of each hooked submodule; each reshaped to the fixture's
    shape when only size-1 axes differ."""
    torch = _torch()
    found: dict[str, Any] = {}
    for key, value in returned.items():
        k = key if str(key).startswith(common.AUX_PREFIX) else f"aux.{key}"
        found[k] = value
    for key, outputs in seen.items():
        if key and outputs:
            found[key] = outputs[-1]
    results = {}
    for key, value in found.items():
        if key not in case.tensors:
            known = sorted(k for k in case.tensors if k.startswith(common.AUX_PREFIX))
            raise ValidationInputError(
                f"the module's intermediate {key} is not in the fixture (its "
                f"intermediates: {', '.join(known) or 'none'})")
        if not isinstance(value, torch.Tensor):
            raise ValidationInputError(
                f"{key}: the module gave {type(value).__name__}, expected a tensor")
        shape = tuple(case.tensors[key].shape)
        array = _np(value)
        if array.shape != shape and common._squeezed(array.shape) == common._squeezed(
                shape):
            array = array.reshape(shape)
        results[key] = array
    return results


def _named_tensors(module: Any) -> list[tuple[str, Any]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()
