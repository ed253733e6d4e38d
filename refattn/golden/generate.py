"""Case generation: one block, preset, config, shapes, dtype and seed -> every
tensor a third party needs to validate a forward and a backward.

The recipe (DESIGN sections 5 and 7):

1. Draw inputs ~ N(0, 1), parameters and running statistics (the block's
   ``init_params``: random and non-degenerate) and the cotangent ~ N(0, 1) on
   the host with ``numpy.random.default_rng``, in float64.  A float32 case
   rounds every drawn tensor to float32 first, so a float32 consumer gets
   bit-identical inputs.
2. Run the forward in float64 and measure the margin from every ReLU kink and
   max tie (``kink_margin``); below ``MIN_MARGIN`` the draw is repeated with
   the next sub-seed, and the number of redraws is recorded.
3. Run the backward in float64 and collect every tensor under the keys of the
   fixture format (``input.*``, ``param.*``, ``state.*``, ``cotangent.out``,
   ``output.*``, ``output.state.*``, ``grad.input.*``, ``grad.param.*``,
   ``aux.*``), stored in the case's dtype.
4. Give each tensor a tolerance for a consumer computing in that dtype
   (``refattn.golden.tolerance.tolerance_for``, from the tensor's accumulation
   length); a gradient that is analytically zero (pure round-off in the
   float64 reference) is compared with an absolute tolerance on the scale of
   its tensor family instead (check kind ``"zero"``), and a tensor whose
   tolerance would exceed the dtype's cap (``strength.MAX_RTOL``) is recorded
   as not checkable (``"none"``) with the reason.
5. Prove every other tolerance can fail (``strength.case_weaknesses``:
   zeroed, negated, scaled and one-off results must be rejected); a case
   that would carry a vacuous tolerance is refused.

Blocks whose unit-scale draws leave a tensor ill-conditioned (CGNL) name
factors for their parameter draws (``BlockSpec.draw_scales``); they are
applied after ``init_params`` and recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refattn import __version__, backend
from refattn.blocks.registry import BLOCKS
from refattn.blocks.spec import (
    MIN_MARGIN,
    BlockSpec,
    config_to_dict,
    json_ready,
    to_namespace,
)
from refattn.checks import check_input_shapes
from refattn.cuda import use_kernels
from refattn.golden.strength import MAX_RTOL, tolerance_weaknesses
from refattn.golden.tolerance import tolerance_for

__all__ = ["MAX_REDRAWS", "MAX_SEED", "CaseRequest", "GeneratedCase", "all_requests",
           "case_shapes", "expand_requests", "generate_case"]

MAX_REDRAWS = 100
MAX_SEED = 2**63 - 1
"""The largest case seed: the case id spells it (``-s<seed>``, 128 characters
at most) and every seed of 63 bits fits."""
MIN_MARGIN_FLOAT32 = 2e-5
"""float32 fixtures keep a wider margin: a correct float32 implementation's
round-off in a K-term pre-activation is about 6e-8*sqrt(K) of its rms (2.7e-6
for K = 2000), and it must not flip a ReLU or a max that the float64
reference did not flip.  A wider margin would make large presets (NIN's 57k
pre-activations) need too many redraws."""
ROUNDOFF_ZERO = 1e-9
"""A float64 reference tensor whose max is below this fraction of its family's
scale is analytically zero: only round-off remains in it."""

RNG_NAME = (
    "numpy.random.default_rng(PCG64) seeded by SeedSequence([seed, draw, stream, "
    "*utf8(input name)]): stream 0 inputs, 1 parameters, 2 the cotangent"
)


@dataclass(frozen=True)
class CaseRequest:
    """What to generate: the CLI's options, validated."""

    block: str
    preset: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] | None = None
    dtype: str = "float64"
    seed: int = 0

    def case_id(self, cfg_mode: str | None) -> str:
        """``<preset|default>[-<bn mode>]-<dtype>[-s<seed>][-<overrides>-<hash>]``.

        A case with ``--set`` or ``--shape`` values spells them after the
        dtype, readably (``reduction.8-pool_types.avg.max-x.2x16x7x6``: key,
        dot, value, a list's items joined by dots, a shape's sizes by ``x``;
        every character outside ``[A-Za-z0-9._-]`` becomes ``_``, and the
        part is cut at ``READABLE_CHARS``), then the first 8 hex digits of the
        SHA-256 of the values, which tell apart what the cut or the spelling
        merges.  A case without overrides keeps its bare id
        (``jongchan-train-float64``), so the committed set never moves.
        """
        parts = [self.preset or "default"]
        if cfg_mode:
            parts.append(cfg_mode)
        parts.append(self.dtype)
        if self.seed != 0:
            parts.append(f"s{self.seed}")
        if self.overrides or self.shapes:
            blob = json.dumps(
                {"set": json_ready(dict(self.overrides)),
                 "shape": {k: list(v) for k, v in (self.shapes or {}).items()}},
                sort_keys=True,
            )
            digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
            room = ID_CHARS - len("-".join(parts)) - len(digest) - 2
            readable = _readable(self.overrides, self.shapes, min(READABLE_CHARS, room))
            if readable:
                parts.append(readable)
            parts.append(digest)
        return "-".join(parts)


READABLE_CHARS = 64
"""The longest readable overrides part of a case id (the hash follows it)."""
ID_CHARS = 128
"""The longest case id the fixture format takes."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _spelled(value: Any) -> str:
    """A --set value as a case id spells it: lists dotted, None/bools in words."""
    if isinstance(value, (list, tuple)):
        return ".".join(_spelled(v) for v in value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ".".join(f"{k}.{_spelled(v)}" for k, v in sorted(value.items()))
    return str(value)


def _readable(overrides: Mapping[str, Any],
              shapes: Mapping[str, Sequence[int]] | None, limit: int) -> str:
    """The overrides part of a case id: ``key.value`` items (keys sorted),
    then ``name.NxCxHxW`` shapes (names sorted), joined by ``-``; sanitized and cut at
    `limit` characters (never ending in a separator)."""
    items = [f"{k}.{_spelled(v)}" for k, v in sorted(overrides.items())]
    items += [f"{k}.{'x'.join(str(d) for d in v)}" for k, v in sorted((shapes or {}).items())]
    text = _UNSAFE.sub("_", "-".join(items))
    if len(text) > limit:
        text = text[:max(limit, 0)]
    return text.rstrip("._-")


@dataclass
class GeneratedCase:
    """Tensors, manifest fields and tolerances of one case, ready to write."""

    block: str
    case_id: str
    tensors: dict[str, np.ndarray]
    manifest: dict[str, Any]
    tolerances: dict[str, tuple[float, float]]
    accumulation: dict[str, int]
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Tensors not checked in full: key -> (kind "zero" or "none", reason)."""


def _seed(seed: int, draw: int, stream: int, name: str = "") -> int:
    """An independent 63-bit seed per (case seed, redraw, stream, tensor name).

    Inputs are drawn from a generator of their own, keyed by their name, so a
    draw does not depend on the order the inputs are listed in.
    """
    entropy = [seed, draw, stream, *name.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def bn_mode_of(spec: BlockSpec, cfg: Any) -> str | None:
    """'train' / 'eval' when the config has a live batch norm, else None."""
    train = spec.with_bn_mode(cfg, "train")
    if train is None:
        return None
    return "train" if train == cfg else "eval"


def expand_requests(block: str, preset: str | None, overrides: Mapping[str, Any],
                    **kwargs: Any) -> list[tuple[CaseRequest, Any]]:
    """A request becomes one case, or two (train and eval) for a batch-norm
    preset whose BN mode the user did not set explicitly."""
    spec = BLOCKS[block]
    preset = spec.default_preset if preset is None else preset
    cfg = spec.config(preset, **overrides)
    req = CaseRequest(block, preset, dict(overrides), **kwargs)
    mode = bn_mode_of(spec, cfg)
    if mode is None or _sets_bn(spec, cfg, overrides):
        return [(req, cfg)]
    return [(req, spec.with_bn_mode(cfg, m)) for m in ("train", "eval")]


def all_requests(dtypes: tuple[str, ...] = ("float64", "float32"), *, seed: int = 0
                 ) -> list[tuple[CaseRequest, Any]]:
    """Every preset of every block (or its default config) in each dtype: the
    cases of ``refattn golden --all [--seed K]`` and, with seed 0, of the
    committed golden/ set."""
    out = []
    for name, spec in BLOCKS.items():
        presets = list(spec.presets) or [None]
        for preset in presets:
            for dtype in dtypes:
                out += expand_requests(name, preset, {}, dtype=dtype, seed=seed)
    return out


def _sets_bn(spec: BlockSpec, cfg: Any, overrides: Mapping[str, Any]) -> bool:
    """Did the overrides set a key that switches the BN mode?"""
    train = config_to_dict(spec.with_bn_mode(cfg, "train"))
    evals = config_to_dict(spec.with_bn_mode(cfg, "eval"))
    bn_keys = {k for k in train if train[k] != evals[k]}
    return bool(bn_keys & set(overrides))


def merge_shapes(defaults: Mapping[str, Sequence[int]],
                 given: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """The block's default input shapes, with the user's replacing them by name.

    A given name replaces every default sharing its base name (the part before
    the first dot), so ``x_kv.0=...`` and ``x_kv.1=...`` replace a default
    ``x_kv``: the inputs say how many key/value layers there are.
    """
    if not given:
        return {k: tuple(v) for k, v in defaults.items()}
    bases = {k.split(".")[0] for k in given}
    known = {k.split(".")[0] for k in defaults}
    unknown = sorted(bases - known)
    if unknown:
        raise ValueError(
            f"shape: no input named {', '.join(unknown)} (inputs: {', '.join(defaults)})"
        )
    merged: dict[str, tuple[int, ...]] = {}
    for k, v in defaults.items():  # keep the block's input order
        base = k.split(".")[0]
        if base not in bases:
            merged[k] = tuple(v)
        else:
            same = sorted((g for g in given if g.split(".")[0] == base), key=_index)
            merged |= {g: tuple(given[g]) for g in same}
    return merged


def _index(name: str) -> tuple[int, str]:
    """Sort key of ``x_kv.0``, ``x_kv.1``, ...: by the number after the dot."""
    suffix = name.partition(".")[2]
    return (int(suffix), name) if suffix.isdigit() else (-1, name)


def case_shapes(req: CaseRequest, cfg: Any
                ) -> tuple[dict[str, tuple[int, ...]], Any, dict[str, tuple[int, ...]]]:
    """(input shapes, resolved config, parameter and buffer shapes) of a
    request, computed without drawing anything; the parameter shapes also
    validate channels, groups and sizes against the config."""
    spec = BLOCKS[req.block]
    shapes = check_input_shapes(merge_shapes(spec.fixture_shapes(cfg), req.shapes))
    resolved = spec.resolve(cfg, shapes)
    params = {k: tuple(v) for k, v in spec.param_shapes(resolved, shapes).items()}
    return shapes, resolved, params


def generate_case(req: CaseRequest, cfg: Any, *, xp: Any = None, device: Any = None
                  ) -> GeneratedCase:
    """Draw, run forward and backward in float64, and collect one case.

    On NumPy the case is always the NumPy formulas': the CPU kernel tier,
    whose sums differ from NumPy's in the last bits, is off here, so a
    fixture's bits depend neither on numba being installed nor on the
    case's size.  (CuPy cases keep the CUDA kernels; they are compared with
    the NumPy cases within the manifest tolerances.)
    """
    if xp is None:
        import array_api_compat.numpy as xp  # the default backend
    on_numpy = _backend_name(xp) == "numpy"
    with use_kernels(False) if on_numpy else contextlib.nullcontext():
        return _generate_case(req, cfg, xp, device)


def _generate_case(req: CaseRequest, cfg: Any, xp: Any, device: Any) -> GeneratedCase:
    """The body of generate_case, on the path its caller chose."""
    if req.dtype not in backend.FLOAT_DTYPES:
        raise ValueError(f"dtype: expected float32 or float64, got {req.dtype!r}")
    if (not isinstance(req.seed, int) or isinstance(req.seed, bool)
            or not 0 <= req.seed <= MAX_SEED):
        raise ValueError(f"seed: expected an int from 0 to 2**63-1, got "
                         f"{str(req.seed)[:40]!r}")
    spec = BLOCKS[req.block]
    shapes, resolved, _ = case_shapes(req, cfg)
    rounding = np.float32 if req.dtype == "float32" else np.float64
    scales = spec.draw_scales(resolved, shapes) if spec.draw_scales else {}
    min_margin = MIN_MARGIN_FLOAT32 if req.dtype == "float32" else MIN_MARGIN

    for draw in range(MAX_REDRAWS):
        inputs = {
            k: _round(np.random.default_rng(_seed(req.seed, draw, 0, k)).standard_normal(s),
                      rounding)
            for k, s in shapes.items()
        }
        params, state = spec.init_params(resolved, shapes, seed=_seed(req.seed, draw, 1))
        params = {k: _round(v * scales.get(k.rsplit(".", 1)[0], 1.0), rounding)
                  for k, v in params.items()}
        state = {k: _round(v, rounding) for k, v in state.items()}
        dev = {
            "inputs": to_namespace(inputs, xp, device=device),
            "params": to_namespace(params, xp, device=device),
            "state": to_namespace(state, xp, device=device),
        }
        outputs, cache = spec.forward(dev["inputs"], dev["params"], dev["state"], resolved)
        margin = float(spec.kink_margin(cache))
        if margin >= min_margin:
            break
    else:
        raise ValueError(
            f"could not draw {req.block} inputs with a kink/tie margin >= {min_margin} "
            f"in {MAX_REDRAWS} draws (shapes {shapes}); try smaller shapes or another seed"
        )

    out_host = backend.to_host(outputs["out"])
    crng = np.random.default_rng(_seed(req.seed, draw, 2))
    cot = _round(crng.standard_normal(out_host.shape), rounding)
    dout = to_namespace({"out": cot}, xp, device=device)["out"]
    dinputs, dparams = spec.backward({"out": dout}, cache)

    ref: dict[str, np.ndarray] = {}
    ref |= {f"input.{k}": v for k, v in inputs.items()}
    ref |= {f"param.{k}": v for k, v in params.items()}
    ref |= {f"state.{k}": v for k, v in state.items()}
    ref["cotangent.out"] = cot
    for k, v in outputs.items():
        if k == "out":
            ref["output.out"] = backend.to_host(v)
        elif k.startswith("state."):
            ref[f"output.{k}"] = backend.to_host(v)
        elif k.startswith("aux."):
            ref[k] = backend.to_host(v)
        else:
            ref[f"output.{k}"] = backend.to_host(v)
    ref |= {f"grad.input.{k}": backend.to_host(v) for k, v in dinputs.items()}
    ref |= {f"grad.param.{k}": backend.to_host(v) for k, v in dparams.items()}

    accumulation = _accumulation(spec.accumulation(resolved, shapes), ref)
    tolerances, checks = _tolerances(req.dtype, ref, accumulation)
    tensors = {k: np.asarray(v, dtype=rounding, order="C") for k, v in ref.items()}
    mode = bn_mode_of(spec, resolved)
    manifest = {
        "block": req.block,
        "preset": req.preset,
        "case_id": req.case_id(mode),
        "config": config_to_dict(resolved),
        "dtype": req.dtype,
        "mode": mode,
        "seed": req.seed,
        "rng": RNG_NAME,
        "input_constraints": {
            "inputs": "standard normal, rounded to the case dtype",
            "cotangent": "standard normal, rounded to the case dtype",
            "params": "block init_params (random, non-degenerate)"
                      + (", the modules in param_scales multiplied by their factor "
                         "so that every tensor is well conditioned (docs/blocks/"
                         f"{req.block}.md, Tolerances)" if scales else "")
                      + ", rounded to the case dtype",
            **({"param_scales": dict(sorted(scales.items()))} if scales else {}),
            "min_kink_margin": min_margin,
            "kink_margin": margin if np.isfinite(margin) else None,  # None: no kinks
        },
        "redraws": draw,
        "inputs": list(shapes),
        "input_shapes": {k: list(s) for k, s in shapes.items()},
        "outputs": ["out"],
        "anchor_names": spec.anchor_names(req.preset, resolved, shapes),
        "provenance": {
            "refattn": __version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "backend": _backend_name(xp),
            "reference_dtype": "float64",
        },
    }
    weak = [w for key, value in tensors.items() if _family(key)
            for w in tolerance_weaknesses(key, value, *tolerances[key], req.dtype,
                                          checks.get(key, ("full",))[0])]
    if weak:
        raise ValueError(
            f"{req.block}/{manifest['case_id']}: refusing a case whose tolerance cannot "
            f"reject a wrong result: {weak[0]}"
            + (f" (and {len(weak) - 1} more)" if len(weak) > 1 else ""))
    return GeneratedCase(req.block, manifest["case_id"], tensors, manifest, tolerances,
                         accumulation, checks)


def _round(a: np.ndarray, dtype: Any) -> np.ndarray:
    """Round to the case dtype and back: float32-representable float64 values."""
    return np.asarray(a, dtype=dtype).astype(np.float64)


def _backend_name(xp: Any) -> str:
    name = getattr(xp, "__name__", str(xp))
    return name.replace("array_api_compat.", "")


def _accumulation(lengths: Mapping[str, int], ref: Mapping[str, np.ndarray]
                  ) -> dict[str, int]:
    """Per tensor key: the longest matching prefix's length (1 for data)."""
    out = {}
    for key in ref:
        best, length = "", 1
        for prefix, n in lengths.items():
            p = "output." + prefix if prefix in ("out", "state") else prefix
            if (key == p or key.startswith(p + ".")) and len(p) > len(best):
                best, length = p, int(n)
        out[key] = max(length, 1)
    return out


_FAMILIES = ("grad.input.", "grad.param.", "output.state.", "output.", "aux.")


def _tolerances(dtype: str, ref: Mapping[str, np.ndarray],
                accumulation: Mapping[str, int]
                ) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[str, str]]]:
    """(rtol, atol) per tensor (inputs and parameters are exact data), and
    the check kind of every computed tensor that is not checked in full."""
    scale: dict[str, float] = {}
    for key, v in ref.items():
        fam = _family(key)
        if fam and v.size:
            scale[fam] = max(scale.get(fam, 0.0), float(np.max(np.abs(v))))
    tol: dict[str, tuple[float, float]] = {}
    checks: dict[str, tuple[str, str]] = {}
    for key, v in ref.items():
        fam = _family(key)
        if fam is None:
            tol[key] = (0.0, 0.0)
            continue
        rtol, atol_rel = tolerance_for(dtype, accumulation[key])
        own = float(np.max(np.abs(v))) if v.size else 0.0
        if rtol >= MAX_RTOL[dtype]:
            checks[key] = ("none", (
                f"ill-conditioned in {dtype}: a correct implementation needs rtol "
                f"{rtol:.3g} (effective accumulation length {accumulation[key]}), "
                f"above the {dtype} cap {MAX_RTOL[dtype]:g}; see the block's page, "
                "Tolerances"))
        elif v.size and own <= ROUNDOFF_ZERO * scale.get(fam, 0.0):
            checks[key] = ("zero", (
                f"analytically zero: the float64 reference holds only round-off "
                f"(max |value| {own:.3g}, below {ROUNDOFF_ZERO:g} of the largest "
                f"{fam}* tensor); compared against 0 on that tensor's scale"))
            own = scale[fam]
        tol[key] = (rtol, atol_rel * own)
    return tol, checks


def _family(key: str) -> str | None:
    for fam in _FAMILIES:
        if key.startswith(fam):
            return fam
    return None


def split_case(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], ...]:
    """(inputs, params, state) of a case's tensors, keyed by their block names."""
    def strip(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return strip("input."), strip("param."), strip("state.")
