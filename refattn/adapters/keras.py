"""Run a Keras 3 layer against a golden case, on Keras's JAX or torch backend.

``run_keras_case(case, factory)`` builds the layer with ``factory(config)``
under the case's dtype (Keras's float type and dtype policy are set to it
while the factory runs and the layer is built, and restored afterwards),
builds it on the case's inputs, loads the fixture's parameters and running
statistics into its variables by path, runs the forward in training or
inference mode as the case says, pulls the fixture's cotangent back with the
backend's autodiff and returns the results under the fixture's keys.

Names: a variable's path (``cbam/ca/fc/0/kernel``) without the layer's own
name in front, with dots for slashes (``ca.fc.0.kernel``), matched through
the same name maps as ``--torch`` and the Keras leaf aliases of
``refattn.adapters.common.LEAF_ALIASES`` (``kernel``/``gamma`` for
``weight``, ``beta`` for ``bias``, ``moving_mean``/``moving_variance``).  A
``kernel`` is in Keras's channels-last layout, (*k, C_in, C_out).  Inputs are
laid out as ``data_format`` says, by default Keras's
``image_data_format()`` (channels_last unless configured).

Gradients: on the JAX backend, ``jax.vjp`` of ``layer.stateless_call`` (the
running statistics come back as its new non-trainable variables; a float64
case runs with ``jax_enable_x64`` on, restored afterwards); on the torch
backend, torch autograd through the eager call.  Other backends are refused.

The backend is chosen when keras is first imported: if that happens here and
``KERAS_BACKEND`` is unset, it is set to ``jax`` (or ``torch`` when only torch
is installed).  keras is imported lazily: importing this module costs
nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from refattn.adapters import common
from refattn.adapters.common import TheirCode, factory_label, raised
from refattn.validate import ValidationInputError

__all__ = ["BACKENDS", "backend", "load_factory", "run_keras_case", "variable_name"]

BACKENDS = ("jax", "torch")
"""Keras backends whose autodiff the adapter drives."""


def _keras() -> Any:
    if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
        for backend in BACKENDS:
            if importlib.util.find_spec(backend) is not None:
                os.environ["KERAS_BACKEND"] = backend
                break
    keras = common.import_framework("keras", "Keras", "keras")
    backend = keras.config.backend()
    if backend not in BACKENDS:
        raise ValidationInputError(
            f"Keras runs on its {backend!r} backend; --keras drives the "
            f"{' or '.join(BACKENDS)} backend: set KERAS_BACKEND=jax before keras "
            "is imported"
        )
    return keras


def backend() -> str:
    """The Keras backend the adapter runs on (importing keras if needed)."""
    return str(_keras().config.backend())


def load_factory(spec: str) -> Callable[[dict[str, Any]], Any]:
    """``pkg.module:factory`` for ``--keras`` (imports exactly that module)."""
    return common.load_factory(spec, option="--keras", framework=_keras)


def variable_name(variable: Any, layer_name: str) -> str:
    """``cbam/ca/fc/0/kernel`` -> ``ca.fc.0.kernel`` (the layer's own name,
    when the path starts with it, is dropped)."""
    parts = str(variable.path).split("/")
    if len(parts) > 1 and parts[0] == layer_name:
        parts = parts[1:]
    return ".".join(parts)


@contextlib.contextmanager
def _dtype_scope(keras: Any, dtype: str) -> Iterator[None]:
    """Keras's floatx and global dtype policy set to `dtype` inside."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def _x64(keras: Any, dtype: str) -> Any:
    if keras.config.backend() == "jax":
        from refattn.adapters.jax import enable_x64

        return enable_x64(dtype == "float64")
    return contextlib.nullcontext()


def run_keras_case(case: Any, factory: Callable[[dict[str, Any]], Any], *,
                   names: str | Mapping[str, str] = "canonical",
                   data_format: str | None = None) -> dict[str, np.ndarray]:
    """Forward and backward of the layer ``factory(config)`` on the case;
    fixture-keyed results (numpy arrays, channels-first).

    The factory is called with ``refattn.adapters.common.factory_config``
    plus ``training`` (True for a train-mode case).

    Raises:
        ValidationInputError: the factory, build, forward or backward raised;
            names or shapes disagree; the output is not a real float array.
        UserCodeError: their code called ``sys.exit`` or raised
            ``KeyboardInterrupt`` (a real Ctrl-C still interrupts).
    """
    keras = _keras()
    data_format = common.check_data_format(data_format or keras.config.image_data_format())
    dtype = str(case.manifest["dtype"])
    with _x64(keras, dtype), TheirCode(f"the factory {factory_label(factory)}",
                                       "while building the layer") as their:
        return _run(case, factory, their, keras=keras, names=names,
                    data_format=data_format)


def _run(case: Any, factory: Callable[[dict[str, Any]], Any], their: TheirCode, *,
         keras: Any, names: str | Mapping[str, str], data_format: str
         ) -> dict[str, np.ndarray]:
    """The body of ``run_keras_case``, inside ``their`` (and the x64 setting)."""
    manifest = case.manifest
    dtype = str(manifest["dtype"])
    train = manifest.get("mode") == "train"
    inputs = [np.asarray(common.to_data_format(case.tensors[f"input.{n}"], data_format),
                         dtype=dtype) for n in manifest["inputs"]]
    if isinstance(factory, keras.layers.Layer):
        raise ValidationInputError(
            f"got the layer {factory.name!r} itself; pass a factory that builds it "
            "(config -> layer), so that it is built in the case's dtype")
    with _dtype_scope(keras, dtype):
        try:
            layer = factory({**common.factory_config(manifest), "training": train})
        except Exception as err:
            raise ValidationInputError(raised("the factory", err)) from err
        if not isinstance(layer, keras.layers.Layer):
            raise ValidationInputError(
                f"the factory returned {type(layer).__name__}, expected a keras Layer")
        their.doing = "while the layer was built on the case's inputs"
        try:
            if not layer.built:
                layer(*inputs, **_training(layer, False))
        except Exception as err:
            raise ValidationInputError(raised("building the layer", err)) from err

    # 1. the fixture's parameters and running statistics into the variables
    their.doing = "while loading the fixture's parameters into the layer"
    variables = {variable_name(v, layer.name): v for v in layer.variables
                 if np.issubdtype(np.dtype(v.dtype), np.floating)}
    found = common.resolve_names(case, names, variables, what="layer")
    for canon, theirs in found.items():
        v = variables[theirs]
        v.assign(common.load_value(case, canon, theirs, tuple(v.shape)).astype(v.dtype))

    # 2. forward and backward with the backend's autodiff
    run = _run_jax if keras.config.backend() == "jax" else _run_torch
    out, dxs, grads, after = run(keras, layer, inputs, case, their, train=train,
                                 data_format=data_format)
    return common.fixture_results(case, found, out=out, input_grads=dxs,
                                  param_grads=grads, state_after=after,
                                  data_format=data_format)


def _training(layer: Any, train: bool) -> dict[str, bool]:
    """``{"training": train}`` if the layer's ``call`` takes it, else nothing
    (``stateless_call`` passes keywords through unchanged)."""
    params = inspect.signature(layer.call).parameters.values()
    takes = any(p.name == "training" or p.kind is p.VAR_KEYWORD for p in params)
    return {"training": train} if takes else {}


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_jax(keras: Any, layer: Any, inputs: list[np.ndarray], case: Any,
             their: TheirCode, *, train: bool, data_format: str
             ) -> tuple[np.ndarray, list[Any], dict[str, Any], dict[str, Any]]:
    """``jax.vjp`` of ``layer.stateless_call``: output, input gradients,
    gradients and new values of the variables by name."""
    import jax

    trainable = list(layer.trainable_variables)
    frozen = list(layer.non_trainable_variables)

    def forward(values: list[Any], *xs: Any) -> tuple[Any, list[Any]]:
        out, new_frozen = layer.stateless_call(values, [v.value for v in frozen], *xs,
                                               **_training(layer, train))
        return _first(out), new_frozen

    their.doing = "in the layer's forward"
    try:
        out, vjp, new_frozen = jax.vjp(forward, [v.value for v in trainable],
                                       *[jax.numpy.asarray(x) for x in inputs],
                                       has_aux=True)
    except Exception as err:
        raise ValidationInputError(raised("the layer's forward", err)) from err
    out_np = _checked(case, np.asarray(out), data_format)
    cot = common.to_data_format(case.tensors["cotangent.out"], data_format)
    their.doing = "in the VJP of the layer's output"
    try:
        dvalues, *dxs = vjp(jax.numpy.asarray(cot, dtype=out.dtype))
    except Exception as err:
        raise ValidationInputError(raised("the VJP of the layer's output", err)) from err
    name = layer.name
    grads = {variable_name(v, name): g for v, g in zip(trainable, dvalues)}
    after = {variable_name(v, name): a for v, a in zip(frozen, new_frozen)}
    return out_np, dxs, grads, after


def _run_torch(keras: Any, layer: Any, inputs: list[np.ndarray], case: Any,
               their: TheirCode, *, train: bool, data_format: str
               ) -> tuple[np.ndarray, list[Any], dict[str, Any], dict[str, Any]]:
    """torch autograd through the eager call; the running statistics are the
    non-trainable variables after it."""
    import torch

    xs = [torch.tensor(x, requires_grad=True) for x in inputs]
    their.doing = "in the layer's forward"
    try:
        out = _first(layer(*xs, **_training(layer, train)))
    except Exception as err:
        raise ValidationInputError(raised("the layer's forward", err)) from err
    out_np = _checked(case, out.detach().cpu().numpy(), data_format)
    cot = common.to_data_format(case.tensors["cotangent.out"], data_format)
    their.doing = "in the backward of the layer's output"
    try:
        out.backward(torch.as_tensor(np.ascontiguousarray(cot), dtype=out.dtype))
    except Exception as err:
        raise ValidationInputError(raised("the backward of the layer's output", err)
                                   ) from err
    name = layer.name
    grads = {variable_name(v, name): v.value.grad.detach().cpu().numpy()
             for v in layer.trainable_variables if v.value.grad is not None}
    after = {variable_name(v, name): keras.ops.convert_to_numpy(v.value)
             for v in layer.non_trainable_variables}
    dxs = [None if x.grad is None else x.grad.numpy() for x in xs]
    return out_np, dxs, grads, after


def _checked(case: Any, out: np.ndarray, data_format: str) -> np.ndarray:
    return common.checked_output(out, tuple(case.tensors["output.out"].shape),
                                 "the layer's output", data_format)
