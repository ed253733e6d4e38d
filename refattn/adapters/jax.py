"""Run a JAX function (or a Flax NNX module) against a golden case.

``run_jax_case(case, factory)`` calls ``factory(config)``, which returns
either ``(apply, params)`` or a Flax NNX module (a module may also be given
in place of the factory):

* ``apply(params, *inputs)`` returns the output, or ``(out, new_state)``
  when it updates batch-norm statistics (Flax Linen's
  ``model.apply(variables, x, mutable=["batch_stats"])`` shape);
  ``params`` is any pytree (dicts, lists, dataclasses...) holding every
  parameter and running statistic;
* an ``nnx.Module`` is split into its graph and state (``nnx.split``), put
  in train or eval mode as the case says, and run the same way, its updated
  state being the new state.

The fixture's parameters go into the pytree by name: each leaf's path joined
by dots (``mlp.fc1.kernel``; a leading Linen collection ``params.`` or
``batch_stats.`` is dropped), matched through the same name maps as
``--torch`` (``canonical``, ``anchor``, a JSON map) and the Flax leaf
aliases of ``refattn.adapters.common.LEAF_ALIASES`` (``kernel``/``scale``
for ``weight``, ``mean``/``var`` for the running statistics).  A leaf named
``kernel`` is in Flax's channels-last layout, (*k, C_in, C_out).  Inputs are
given channels-first, as stored, unless ``data_format="channels_last"``.

``jax.vjp`` runs the forward and pulls the fixture's cotangent back to every
input and leaf.  A float64 case runs with ``jax_enable_x64`` switched on,
and the previous setting is restored afterwards (whatever happens); a
float32 case leaves the setting alone.

jax (and flax, for a module) is imported lazily: importing this module costs
nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from refattn.adapters import common
from refattn.adapters.common import TheirCode, factory_label, raised
from refattn.validate import ValidationInputError

__all__ = ["enable_x64", "load_factory", "pytree_names", "run_jax_case"]

_COLLECTIONS = ("params", "batch_stats")
"""Flax Linen's variable collections: the first path component, dropped."""


def _jax() -> Any:
    return common.import_framework("jax", "JAX", "jax")


def load_factory(spec: str) -> Callable[[dict[str, Any]], Any]:
    """``pkg.module:factory`` for ``--jax`` (imports exactly that module)."""
    return common.load_factory(spec, option="--jax", framework=_jax)


@contextlib.contextmanager
def enable_x64(on: bool) -> Iterator[None]:
    """``jax_enable_x64`` set to True inside (when `on`), and back to what it
    was on the way out, exception or not."""
    jax = _jax()
    before = bool(jax.config.read("jax_enable_x64"))
    if on:
        jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def pytree_names(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """``[(dotted path, leaf)]`` in leaf order, and the tree structure.

    ``{"params": {"mlp": {"fc1": {"kernel": k}}}}`` -> ``("mlp.fc1.kernel", k)``.
    """
    jax = _jax()
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in flat:
        parts = [_key_name(k) for k in path]
        if len(parts) > 1 and parts[0] in _COLLECTIONS:
            parts = parts[1:]
        out.append((".".join(parts), leaf))
    return out, treedef


def _is_float(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    try:
        return dtype is not None and np.issubdtype(dtype, np.floating)
    except TypeError:  # extended dtypes (PRNG keys)
        return False


def _from_nnx(module: Any, train: bool) -> tuple[Callable[..., Any], Any]:
    """An NNX module as ``(apply, params)``: ``params`` is its state as a pure
    dict, ``apply`` merges a state back into the graph, calls it and returns
    ``(out, its state after the call)``."""
    from flax import nnx

    if hasattr(module, "train") and hasattr(module, "eval"):
        module.train() if train else module.eval()
    graphdef, state = nnx.split(module)

    def apply(pure: Any, *inputs: Any) -> tuple[Any, Any]:
        fresh = _jax().tree.map(lambda a: a, state)  # a copy: the module stays as it was
        nnx.replace_by_pure_dict(fresh, pure)
        merged = nnx.merge(graphdef, fresh)
        return merged(*inputs), nnx.to_pure_dict(nnx.state(merged))

    return apply, nnx.to_pure_dict(state)


def _is_nnx(obj: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def _unpack(made: Any, train: bool) -> tuple[Callable[..., Any], Any, bool]:
    """The factory's result as ``(apply, params, is_nnx)``."""
    if _is_nnx(made):
        apply, params = _from_nnx(made, train)
        return apply, params, True
    if (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
        return made[0], made[1], False
    raise ValidationInputError(
        f"the factory returned {type(made).__name__}, expected (apply, params) or a "
        "flax.nnx.Module"
    )


def run_jax_case(case: Any, factory: Callable[[dict[str, Any]], Any], *,
                 names: str | Mapping[str, str] = "canonical",
                 data_format: str = "channels_first") -> dict[str, np.ndarray]:
    """Forward and ``jax.vjp`` of ``factory(config)`` on the case;
    fixture-keyed results (numpy arrays, channels-first).

    The factory is called with ``refattn.adapters.common.factory_config``
    (the case's config, ``input_shapes``, ``in_channels``) plus
    ``training`` (True for a train-mode case).

    Raises:
        ValidationInputError: the factory, forward or VJP raised; names or
            shapes disagree; the output is not a real float array.
        UserCodeError: their code called ``sys.exit`` or raised
            ``KeyboardInterrupt`` (a real Ctrl-C still interrupts).
    """
    _jax()
    common.check_data_format(data_format)
    with enable_x64(case.manifest["dtype"] == "float64"), TheirCode(
            f"the factory {factory_label(factory)}", "while building the model") as their:
        return _run(case, factory, their, names=names, data_format=data_format)


def _run(case: Any, factory: Callable[[dict[str, Any]], Any], their: TheirCode, *,
         names: str | Mapping[str, str], data_format: str) -> dict[str, np.ndarray]:
    """The body of ``run_jax_case``, inside ``their`` and the x64 setting."""
    jax = _jax()
    import jax.numpy as jnp

    manifest = case.manifest
    dtype = jnp.dtype(manifest["dtype"])
    train = manifest.get("mode") == "train"
    config = {**common.factory_config(manifest), "training": train}
    try:
        made = factory if _is_nnx(factory) else factory(config)  # a module as such
        apply, params, is_nnx = _unpack(made, train)
    except ValidationInputError:
        raise
    except Exception as err:
        raise ValidationInputError(raised("the factory", err)) from err
    what = "module" if is_nnx else "pytree"

    # 1. the fixture's parameters and running statistics into the pytree
    their.doing = "while loading the fixture's parameters into the pytree"
    leaves, treedef = pytree_names(params)
    floats = {name for name, leaf in leaves if _is_float(leaf)}
    found = common.resolve_names(case, names, floats, what=what)
    by_theirs = {theirs: canon for canon, theirs in found.items()}
    new_leaves = []
    for name, leaf in leaves:
        if name in by_theirs:
            value = common.load_value(case, by_theirs[name], name, tuple(leaf.shape))
            leaf = jnp.asarray(value, dtype=dtype)
        new_leaves.append(leaf)
    params = jax.tree_util.tree_unflatten(treedef, new_leaves)

    # 2. forward and VJP
    inputs = [jnp.asarray(common.to_data_format(case.tensors[f"input.{n}"], data_format),
                          dtype=dtype) for n in manifest["inputs"]]

    def forward(p: Any, *xs: Any) -> tuple[Any, Any]:
        made = apply(p, *xs)
        if isinstance(made, tuple) and len(made) == 2:
            return made[0], made[1]
        return made, None

    their.doing = "in the forward"
    try:
        out, vjp, new_state = jax.vjp(forward, params, *inputs, has_aux=True)
    except Exception as err:
        raise ValidationInputError(raised("the forward", err)) from err
    subject = "the forward's output"
    expected = tuple(case.tensors["output.out"].shape)
    out_np = common.checked_output(np.asarray(out), expected, subject, data_format)
    cot = common.to_data_format(case.tensors["cotangent.out"], data_format)
    their.doing = "in the VJP of the forward's output"
    try:
        grads = vjp(jnp.asarray(cot, dtype=out.dtype))
    except Exception as err:
        raise ValidationInputError(raised("the VJP of the forward's output", err)) from err

    # 3. collect under fixture keys
    their.doing = "while its results were read"
    dleaves = dict(zip([n for n, _ in leaves], jax.tree_util.tree_leaves(grads[0])))
    after = {} if new_state is None else dict(pytree_names(new_state)[0])
    return common.fixture_results(case, found, out=out_np, input_grads=grads[1:],
                                  param_grads=dleaves, state_after=after,
                                  data_format=data_format)
