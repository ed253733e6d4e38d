"""The library refuses misuse by name: another block's config or cache, a
cotangent of another dtype than the forward's, masked arrays and matrices
(each a TypeError naming the argument, never an AttributeError from inside
the math or a silent downcast)."""

from __future__ import annotations

import numpy as np
import pytest

from refattn.blocks.registry import BLOCKS, draw_case

NAMES = list(BLOCKS)


def _case(name: str, dtype: str = "float64"):
    spec = BLOCKS[name]
    cfg = spec.config()
    inputs, params, state = draw_case(spec, cfg)
    cast = lambda d: {k: v.astype(dtype) for k, v in d.items()}  # noqa: E731
    return spec, cfg, cast(inputs), cast(params), cast(state)


def _other(name: str) -> str:
    """A block whose config and cache types differ from `name`'s."""
    return "gap" if BLOCKS[name].config_cls is not BLOCKS["gap"].config_cls else "cgnl"


@pytest.mark.parametrize("name", NAMES)
def test_another_blocks_config_is_a_type_error_naming_cfg(name: str) -> None:
    spec, cfg, inputs, params, state = _case(name)
    wrong = BLOCKS[_other(name)].config()
    for bad in (wrong, vars(cfg) if hasattr(cfg, "__dict__") else {"x": 1}, None):
        with pytest.raises(TypeError, match=rf"cfg: expected a {spec.config_cls.__name__}"):
            spec.forward(inputs, params, state, bad)
    with pytest.raises(TypeError, match="cfg: expected"):
        spec.param_shapes(wrong, spec.fixture_shapes(cfg))


@pytest.mark.parametrize("name", NAMES)
def test_another_blocks_cache_is_a_type_error_naming_cache(name: str) -> None:
    spec, cfg, inputs, params, state = _case(name)
    outputs, _ = spec.forward(inputs, params, state, cfg)
    other = BLOCKS[_other(name)]
    o_cfg = other.config()
    o_in, o_p, o_s = draw_case(other, o_cfg)
    _, foreign = other.forward(o_in, o_p, o_s, o_cfg)
    for bad in (foreign, None, ("not", "a", "cache")):
        with pytest.raises(TypeError, match=rf"cache: {name.split('_')[0]}"):
            spec.backward({"out": np.ones_like(outputs["out"])}, bad)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("forward_dtype, dout_dtype", [("float64", "float32"),
                                                      ("float32", "float64")])
def test_a_cotangent_of_another_dtype_is_refused(name, forward_dtype, dout_dtype):
    spec, cfg, inputs, params, state = _case(name, forward_dtype)
    outputs, cache = spec.forward(inputs, params, state, cfg)
    dout = np.ones(outputs["out"].shape, dtype=dout_dtype)
    with pytest.raises(TypeError, match=r"douts\['out'\]"):
        spec.backward({"out": dout}, cache)
    # the check is what refused it: the same cotangent in the forward's dtype runs
    dinputs, _ = spec.backward({"out": dout.astype(forward_dtype)}, cache)
    assert all(v.dtype == np.dtype(forward_dtype) for v in dinputs.values())


@pytest.mark.parametrize("name", NAMES)
def test_a_native_cotangent_of_a_byteswapped_forward_is_accepted(name: str) -> None:
    """Byte order is storage, not dtype: a big-endian float64 forward takes a
    native float64 cotangent, and its gradients equal the native run's."""
    spec, cfg, inputs, params, state = _case(name)
    swapped = lambda d: {k: v.astype(v.dtype.newbyteorder(">")) for k, v in d.items()}  # noqa: E731
    outputs, cache = spec.forward(inputs, params, state, cfg)
    b_outputs, b_cache = spec.forward(swapped(inputs), swapped(params), swapped(state), cfg)
    dout = np.random.default_rng(1).standard_normal(outputs["out"].shape)
    grads = spec.backward({"out": dout}, cache)
    b_grads = spec.backward({"out": dout}, b_cache)
    np.testing.assert_array_equal(b_outputs["out"], outputs["out"])
    for group, b_group in zip(grads, b_grads, strict=True):
        assert group.keys() == b_group.keys()
        # an analytically-zero gradient (gc's conv_mask.bias under the softmax)
        # is round-off, which may differ with the byte order: on its group's scale
        scale = max((float(np.max(np.abs(v))) for v in group.values()), default=0.0)
        for key in group:
            np.testing.assert_allclose(b_group[key], group[key], rtol=1e-12,
                                       atol=1e-13 * scale)
    with pytest.raises(TypeError, match=r"douts\['out'\]"):
        spec.backward({"out": dout.astype(np.float32)}, b_cache)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("name", ["gap", "cbam", "non_local"])
def test_masked_arrays_and_matrices_are_refused(name: str) -> None:
    spec, cfg, inputs, params, state = _case(name)
    (key, x), = inputs.items()
    masked = np.ma.masked_array(x, mask=x > 1.0)
    with pytest.raises(TypeError, match=rf"{key}: .*numpy.ma.MaskedArray"):
        spec.forward({key: masked}, params, state, cfg)
    with pytest.raises(TypeError, match=r"numpy.matrix"):
        spec.forward({key: np.matrix(x.reshape(x.shape[0], -1))}, params, state, cfg)
    # a plain array of the same values passes the same check
    spec.forward({key: np.asarray(masked)}, params, state, cfg)
