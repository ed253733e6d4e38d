"""The spec modules' shared parameter draws (refattn.blocks.spec)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refattn.blocks.spec import (
    check_batch_statistics,
    draw_bias,
    draw_bn_state,
    draw_norm_affine,
    draw_param,
    draw_weight,
    init_norm,
    norm_shapes,
    single_x_shape,
    with_bn_field,
)

SHAPES = {"conv.weight": (64, 3, 2, 2), "conv.bias": (64,), "weight": (8, 5, 1, 1)}


def _state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def test_random_is_draw_weight_and_draw_bias():
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    w = draw_param(a, "conv.weight", SHAPES)
    bias = draw_param(a, "conv.bias", SHAPES)
    np.testing.assert_array_equal(w, draw_weight(b, (64, 3, 2, 2)))
    np.testing.assert_array_equal(bias, draw_bias(b, (64,)))


@pytest.mark.parametrize("key", ["conv.weight", "conv.bias"])
def test_torch_bound_comes_from_the_layers_weight(key):
    # fan_in of conv.bias is the weight's C·KH·KW = 12, not the bias's 1
    bound = 1.0 / math.sqrt(12)
    values = np.concatenate([
        draw_param(np.random.default_rng(s), key, SHAPES, "torch").ravel()
        for s in range(20)
    ])
    assert np.abs(values).max() <= bound
    assert np.abs(values).max() > 0.95 * bound
    assert values.min() < 0 < values.max()


def test_torch_key_without_a_layer_prefix():
    w = draw_param(np.random.default_rng(0), "weight", SHAPES, "torch")
    assert w.shape == (8, 5, 1, 1)
    assert np.abs(w).max() <= 1.0 / math.sqrt(5)


def test_small_and_zeros():
    rng = np.random.default_rng(1)
    w = draw_param(rng, "conv.weight", SHAPES, "small")
    assert w.dtype == np.float64 and 0.007 < float(np.std(w)) < 0.013
    before = _state(rng)
    b = draw_param(rng, "conv.bias", SHAPES, "small")
    z = draw_param(rng, "conv.weight", SHAPES, "zeros")
    assert _state(rng) == before  # a zero init draws nothing
    assert b.dtype == z.dtype == np.float64
    assert not b.any() and not z.any() and z.shape == (64, 3, 2, 2)


@pytest.mark.parametrize("scheme", ["Random", "uniform", ""])
def test_unknown_scheme_is_refused(scheme):
    with pytest.raises(ValueError, match=r"scheme: expected 'random'.*got"):
        draw_param(np.random.default_rng(0), "conv.weight", SHAPES, scheme)


def test_norm_shapes():
    assert norm_shapes("kv0.bn", 3) == {
        "kv0.bn.weight": (3,), "kv0.bn.bias": (3,),
        "kv0.bn.running_mean": (3,), "kv0.bn.running_var": (3,),
    }
    assert norm_shapes("gn", 4, running=False) == {"gn.weight": (4,), "gn.bias": (4,)}


def test_init_norm_draws_affine_then_running_statistics():
    params, state = init_norm(np.random.default_rng(5), "bn", 6, identity=False)
    ref = np.random.default_rng(5)
    gamma, beta = draw_norm_affine(ref, 6)
    mean, var = draw_bn_state(ref, 6)
    assert list(params) == ["bn.weight", "bn.bias"]
    assert list(state) == ["bn.running_mean", "bn.running_var"]
    for got, want in [(params["bn.weight"], gamma), (params["bn.bias"], beta),
                      (state["bn.running_mean"], mean), (state["bn.running_var"], var)]:
        np.testing.assert_array_equal(got, want)


def test_init_norm_without_running_statistics_draws_only_the_affine():
    rng, ref = np.random.default_rng(2), np.random.default_rng(2)
    params, state = init_norm(rng, "gn", 4, identity=False, running=False)
    draw_norm_affine(ref, 4)
    assert state == {} and list(params) == ["gn.weight", "gn.bias"]
    assert _state(rng) == _state(ref)


def test_init_norm_identity_draws_nothing():
    rng = np.random.default_rng(9)
    before = _state(rng)
    params, state = init_norm(rng, "W_bn", 3, identity=True)
    assert _state(rng) == before
    assert not params["W_bn.weight"].any() and not params["W_bn.bias"].any()
    assert not state["W_bn.running_mean"].any()
    np.testing.assert_array_equal(state["W_bn.running_var"], np.ones(3))
    # four separate arrays: writing one must not change another
    params["W_bn.weight"][0] = 7.0
    assert params["W_bn.bias"][0] == 0.0 and state["W_bn.running_mean"][0] == 0.0


# ---------------------------------------------------------------------------
# the spec modules' shared checks


def test_with_bn_field():
    from refattn.blocks.cross_layer import CrossLayerConfig

    cfg = CrossLayerConfig(bn="train")
    assert with_bn_field(cfg, "bn", "eval").bn == "eval"
    assert with_bn_field(cfg, "bn", "train") == cfg
    assert with_bn_field(CrossLayerConfig(bn=None), "bn", "eval") is None
    for bad in ("Eval", "inference", None):
        with pytest.raises(ValueError, match=r"mode: expected 'train' or 'eval', got"):
            with_bn_field(cfg, "bn", bad)


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 3, 4, 5), (2, 1, 2, 3, 4)])
def test_single_x_shape_takes_one_to_three_spatial_dims(shape):
    assert single_x_shape("blk", {"x": list(shape)}) == shape


@pytest.mark.parametrize("given, message", [
    ({"x": (2, 3, 4), "y": (2, 3, 4)}, r"inputs: blk takes exactly one input 'x', "
                                       r"got \['x', 'y'\]"),
    ({"z": (2, 3, 4)}, r"inputs: blk takes exactly one input 'x', got \['z'\]"),
    ((2, 3, 4), r"inputs: blk takes exactly one input 'x', got \(2, 3, 4\)"),
    ({"x": (2, 3)}, r"x: expected a 3-D .* array, got shape \(2, 3\)"),
    ({"x": (2, 3, 4, 5, 6, 7)}, r"x: expected a 3-D .* got shape \(2, 3, 4, 5, 6, 7\)"),
    ({"x": (2, 0, 4)}, r"x: expected every dim >= 1, got shape \(2, 0, 4\)"),
])
def test_single_x_shape_refuses(given, message):
    with pytest.raises(ValueError, match=message):
        single_x_shape("blk", given)


@pytest.mark.parametrize("shape", [(1, 3, 2), (2, 5, 1, 1), (1, 4, 1, 2, 1)])
def test_batch_statistics_with_two_values_pass(shape):
    check_batch_statistics(shape, "bn='train'", "y")


@pytest.mark.parametrize("shape", [(1, 3, 1), (1, 5, 1, 1), (1, 4, 1, 1, 1)])
def test_batch_statistics_of_one_value_are_refused(shape):
    with pytest.raises(ValueError) as err:
        check_batch_statistics(shape, "bn='train'", "W's output")
    assert str(err.value) == (
        "x: bn='train' normalises W's output with batch statistics over N·|S| "
        f"values per channel, which needs N·|S| >= 2, got shape {shape}")
    with pytest.raises(ValueError, match=r"^x_q: .* over N·Hq·Wq values .* >= 2"):
        check_batch_statistics(shape, "bn='train'", "Z", name="x_q", count="N·Hq·Wq")
