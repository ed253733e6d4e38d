"""The framework-free parts every adapter shares (refattn/adapters/common.py):
name matching with the Flax/Keras aliases, the kernel and data layouts, the
output check.  Each helper is also fed a wrong input and shown to refuse it."""

from __future__ import annotations

import numpy as np
import pytest

from refattn.adapters import common
from refattn.validate import ValidationInputError

# ---------------------------------------------------------------------------
# names


def test_names_match_exactly_or_through_one_alias() -> None:
    name_map = {"mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
                "bn.weight": "bn.weight", "bn.bias": "bn.bias",
                "bn.running_mean": "bn.running_mean", "bn.running_var": "bn.running_var"}
    flax = {"mlp.fc1.kernel", "mlp.fc1.bias", "bn.scale", "bn.bias", "bn.mean", "bn.var"}
    keras = {"mlp.fc1.kernel", "mlp.fc1.bias", "bn.gamma", "bn.beta", "bn.moving_mean",
             "bn.moving_variance"}
    assert common.match_names(name_map, flax) == {
        "mlp.fc1.weight": "mlp.fc1.kernel", "mlp.fc1.bias": "mlp.fc1.bias",
        "bn.weight": "bn.scale", "bn.bias": "bn.bias", "bn.running_mean": "bn.mean",
        "bn.running_var": "bn.var"}
    assert common.match_names(name_map, keras)["bn.running_var"] == "bn.moving_variance"
    assert common.match_names(name_map, set(name_map), aliases=False) == name_map


def test_names_refuse_a_missing_an_extra_and_an_ambiguous_tensor() -> None:
    name_map = {"conv.weight": "conv.weight", "conv.bias": "conv.bias"}
    with pytest.raises(ValidationInputError,
                       match=r"\[conv.bias\] the pytree lacks; the pytree has \[-\]"):
        common.match_names(name_map, {"conv.kernel"}, what="pytree")
    with pytest.raises(ValidationInputError, match=r"the layer has \[conv.extra\]"):
        common.match_names(name_map, {"conv.kernel", "conv.bias", "conv.extra"},
                           what="layer")
    # two aliases of one name: no guess
    with pytest.raises(ValidationInputError, match="conv.weight"):
        common.match_names(name_map, {"conv.kernel", "conv.scale", "conv.bias"})
    # PyTorch names are exact: no alias
    with pytest.raises(ValidationInputError, match=r"\[conv.weight\] the module lacks"):
        common.match_names(name_map, {"conv.kernel", "conv.bias"}, aliases=False)


# ---------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("canon_shape, kernel_shape", [
    ((5, 3), (3, 5)),                       # dense: (O, C) -> (C, O)
    ((5, 3, 4), (4, 3, 5)),                 # conv1d
    ((5, 3, 7, 2), (7, 2, 3, 5)),           # conv2d: (O, C, kh, kw) -> (kh, kw, C, O)
    ((5, 3, 2, 4, 6), (2, 4, 6, 3, 5)),     # conv3d
])
def test_kernel_layout_round_trips(canon_shape: tuple, kernel_shape: tuple,
                                   rng: np.random.Generator) -> None:
    value = rng.standard_normal(canon_shape)
    theirs = common.to_theirs(value, kernel_shape, kernel=True, name="k.kernel", canon="k")
    assert theirs.shape == kernel_shape
    # element (o, c, *k) sits at (*k, c, o)
    o, c = canon_shape[0] - 1, 1
    k = tuple(n - 1 for n in canon_shape[2:])
    assert theirs[k + (c, o)] == value[(o, c) + k]
    back = common.to_canonical(theirs, canon_shape, kernel=True)
    np.testing.assert_array_equal(back, value)
    # a planted wrong inverse (the forward permutation again) does not round-trip
    # where the permutation is not its own inverse (2-D and higher convolutions)
    if len(canon_shape) >= 4:
        wrong = np.transpose(theirs, common._kernel_perm(len(canon_shape)))
        assert wrong.shape != canon_shape


def test_size_one_axes_are_reshaped_and_other_shapes_refused(
        rng: np.random.Generator) -> None:
    w = rng.standard_normal((4, 6, 1, 1))            # a 1x1 conv in the fixture
    dense = common.to_theirs(w, (6, 4), kernel=True, name="fc.kernel", canon="fc.weight")
    np.testing.assert_array_equal(dense, w[:, :, 0, 0].T)
    np.testing.assert_array_equal(common.to_canonical(dense, w.shape, kernel=True), w)
    lin = rng.standard_normal((4, 6))                # a linear layer in the fixture
    conv = common.to_theirs(lin, (1, 1, 6, 4), kernel=True, name="fc.kernel",
                            canon="fc.weight")
    np.testing.assert_array_equal(conv[0, 0], lin.T)
    with pytest.raises(ValidationInputError,
                       match=r"fc.kernel: the shape is \(4, 6\) \(kernel layout.*"
                             r"fixture's fc.weight is \(4, 6\), i.e. \(6, 4\)"):
        common.to_theirs(lin, (4, 6), kernel=True, name="fc.kernel", canon="fc.weight")
    with pytest.raises(ValidationInputError, match=r"b: the shape is \(5,\)"):
        common.to_theirs(np.zeros(4), (5,), kernel=False, name="b", canon="bias")


def test_data_format_moves_the_channel_axis(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 4, 5))
    last = common.to_data_format(x, "channels_last")
    assert last.shape == (2, 4, 5, 3) and last[1, 2, 3, 0] == x[1, 0, 2, 3]
    np.testing.assert_array_equal(common.from_data_format(last, "channels_last"), x)
    assert common.to_data_format(x, "channels_first") is x
    v = rng.standard_normal((2, 3))                  # no spatial axes: unchanged
    assert common.to_data_format(v, "channels_last") is v
    with pytest.raises(ValidationInputError, match="data_format: expected one of "
                                                   "channels_first, channels_last, got 'nhwc'"):
        common.check_data_format("nhwc")


# ---------------------------------------------------------------------------
# the output


def test_checked_output_refuses_non_real_and_wrong_shapes() -> None:
    good = np.ones((2, 3, 4, 5))
    np.testing.assert_array_equal(common.checked_output(good, (2, 3, 4, 5), "s"), good)
    last = np.moveaxis(good * np.arange(3)[:, None, None], 1, -1)
    np.testing.assert_array_equal(
        common.checked_output(last, (2, 3, 4, 5), "s", "channels_last"),
        good * np.arange(3)[:, None, None])
    for bad, kind in [(good.astype(np.complex128), "complex"),
                      (good.astype(np.int32), "integer"), (good > 0, "boolean")]:
        with pytest.raises(ValidationInputError, match=f"output.out has dtype .*{kind}"):
            common.checked_output(bad, (2, 3, 4, 5), "s")
    with pytest.raises(ValidationInputError,
                       match=r"s: the output has shape \(2, 4, 5, 3\), the fixture's "
                             r"output.out is \(2, 3, 4, 5\)"):
        common.checked_output(last, (2, 3, 4, 5), "s")  # channels-last read as first
