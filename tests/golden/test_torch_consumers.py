"""A float32 PyTorch consumer of every golden case, the way a third party
would write one: without refattn.

For every block and preset (``refattn golden --all``, float32 cases, plus the
other modes of AlexHex7's non-local block), the anchor-structured module from
``tests/anchors`` is built in float32, the case is loaded with
``safetensors.torch.load_file`` into its ``state_dict`` through the
manifest's ``anchor_names``, forward and backward run with the case's inputs
and cotangent, and every output, running statistic, input gradient and
parameter gradient must meet the manifest's tolerance
(``|a - e| <= atol + rtol |e|``, which is ``torch.testing.assert_close``'s
rule).  Planted bugs (CBAM's spatial pool order, the missing transpose
before the reshape, softmax over the query axis) must fail.

refattn is used only to write the cases; the consumer side reads files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from refattn.blocks.registry import BLOCKS
from refattn.golden.generate import all_requests, bn_mode_of, expand_requests

# the anchor factory of every block's preset (None: the block's default
# config), from the registry (BlockSpec.anchors)
FACTORIES = {(name, preset): factory for name, spec in BLOCKS.items()
             for preset, factory in spec.anchors.items()}


def _requests() -> dict[str, tuple[Any, Any]]:
    reqs = all_requests(("float32",))
    for mode in ("gaussian", "dot_product", "concatenation"):
        reqs += expand_requests("non_local", "alexhex7", {"mode": mode},
                                dtype="float32")
    out = {}
    for req, cfg in reqs:
        case_id = req.case_id(bn_mode_of(BLOCKS[req.block], cfg))
        label = f"{req.block}/{case_id}"
        if req.overrides:
            label += "-" + "-".join(str(v) for v in req.overrides.values())
        out[label] = (req, cfg)
    return out


REQUESTS = _requests()


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cases, written on first use (refattn's only part in this file)."""
    from refattn.golden.format import write_case
    from refattn.golden.generate import generate_case

    root = tmp_path_factory.mktemp("golden32")

    class Lazy(dict):
        def __missing__(self, label: str) -> Path:
            req, cfg = REQUESTS[label]
            c = generate_case(req, cfg)
            self[label] = write_case(root, c.block, c.case_id, c.tensors, c.manifest,
                                     tolerances=c.tolerances,
                                     accumulation=c.accumulation,
                                     formats=("safetensors",))
            return self[label]

    return Lazy()


def factory(spec: str) -> Any:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(f"anchors.{module}"), name)


def consume(torch: Any, case: Path, make: Any) -> tuple[dict[str, str], set[str]]:
    """Run a float32 module on a case as a third party would; returns
    ({key: assert_close message} of the failures, every key compared)."""
    from safetensors.torch import load_file

    manifest = json.loads((case / "manifest.json").read_text())
    t = load_file(str(case / "tensors.safetensors"))
    shapes = manifest["input_shapes"]
    first = shapes[manifest["inputs"][0]]
    config = dict(manifest["config"], input_shapes=shapes, in_channels=first[1])
    module = make(config).float()

    # load parameters and running statistics through the anchor names
    anchor = manifest["anchor_names"] or {}
    own = module.state_dict()
    state = {}
    for key, value in t.items():
        role, _, name = key.partition(".")
        if role in ("param", "state"):
            theirs = anchor.get(name, name)
            state[theirs] = value.reshape(own[theirs].shape)  # (O, C) vs (O, C, 1, 1)
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    module.train(manifest["mode"] == "train")

    inputs = [t[f"input.{n}"].clone().requires_grad_() for n in manifest["inputs"]]
    out = module(*inputs)
    out.backward(t["cotangent.out"])

    mine = {"output.out": out.detach()}
    mine |= {f"grad.input.{n}": x.grad for n, x in zip(manifest["inputs"], inputs)}
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    for canon, theirs in ((k, anchor.get(k, k)) for k in _names(t, "param.")):
        p = params[theirs]
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        mine[f"grad.param.{canon}"] = grad.reshape(t[f"grad.param.{canon}"].shape)
    for canon in _names(t, "output.state."):
        mine[f"output.state.{canon}"] = buffers[anchor.get(canon, canon)]

    failures = {}
    for key, actual in mine.items():
        spec = manifest["tensors"][key]
        try:
            torch.testing.assert_close(actual, t[key], rtol=spec["rtol"],
                                       atol=spec["atol"])  # dtypes must agree too
        except AssertionError as err:
            failures[key] = str(err)
    return failures, set(mine)


def _names(t: dict[str, Any], prefix: str) -> list[str]:
    return [k[len(prefix):] for k in t if k.startswith(prefix)]


@pytest.mark.parametrize("label", list(REQUESTS))
def test_float32_anchor_consumes_the_case(torch: Any, cases: dict[str, Path],
                                          label: str) -> None:
    req, _ = REQUESTS[label]
    case = cases[label]
    failures, compared = consume(torch, case,
                                 factory(FACTORIES[(req.block, req.preset)]))
    assert not failures, "\n\n".join(f"{k}:\n{m}" for k, m in failures.items())
    manifest = json.loads((case / "manifest.json").read_text())
    assert manifest["dtype"] == "float32"
    # every result tensor of the case was compared (aux.* are intermediates)
    assert compared == {k for k in manifest["tensors"]
                        if k.startswith(("output.", "grad."))}


def test_every_block_and_preset_is_consumed() -> None:
    covered = {(req.block, req.preset) for req, _ in REQUESTS.values()}
    expected = {(name, p) for name, spec in BLOCKS.items()
                for p in (list(spec.presets) or [None])}
    assert covered == expected
    assert covered <= set(FACTORIES)


PLANTED = [
    # (case label, buggy factory, tensors that must fail)
    ("cbam/jongchan-train-float32", "cbam:make_jongchan_swapped_pool_order",
     {"output.out", "grad.param.spatial.conv.weight"}),
    ("cbam/jongchan-eval-float32", "cbam:make_jongchan_swapped_pool_order",
     {"output.out", "grad.input.x"}),
    ("non_local/alexhex7-eval-float32", "non_local:make_alexhex7_no_transpose",
     {"output.out", "grad.param.g.weight"}),
    ("cross_layer/cnl-train-float32", "cross_layer:make_cnl_missing_transpose",
     {"output.out", "grad.input.x_q"}),
    ("non_local/alexhex7-train-float32", "non_local:make_alexhex7_softmax_over_queries",
     {"output.out", "grad.param.theta.weight"}),
    ("cross_layer/cnl-eval-float32", "cross_layer:make_cnl_softmax_over_queries",
     {"output.out", "grad.input.x_kv.0"}),
]


@pytest.mark.parametrize("label, bug, fails", PLANTED,
                         ids=[f"{b.split(':')[1]}-{lab.split('/')[1]}"
                              for lab, b, _ in PLANTED])
def test_planted_bug_fails(torch: Any, cases: dict[str, Path], label: str, bug: str,
                           fails: set[str]) -> None:
    failures, _ = consume(torch, cases[label], factory(bug))
    assert fails <= set(failures), sorted(failures)
    assert "Mismatched elements" in failures["output.out"]
