"""Pictures: the finite-difference step-size curve of a block, and the
attention maps and gates a fixture case holds.

matplotlib is an optional extra (``pip install 'refattn[plot]'``).  It is
imported inside the drawing functions only, so this module imports without
it; :func:`require_matplotlib` raises :class:`PlotUnavailable` (an
``ImportError``) with the install hint.  Figures are built with the
object-oriented API (``matplotlib.figure.Figure``), never ``pyplot``: no GUI
backend and no global state are touched.

The numbers behind the step-size picture come from :func:`step_error_curve`,
which needs no matplotlib.  For a block, a fixed random direction ``d`` over
every input and trainable parameter (``d = max(1, |x|) * t`` as in
:mod:`refattn.gradcheck`) and a fixed cotangent ``c``:

    numeric(h)  = (L(x + h d) - L(x - h d)) / 2h,    L(x) = <c, f(x)>
    analytic    = <vjp(c), d>                          (float64 backward)
    error(h)    = |numeric(h) - analytic| / |analytic|

with ``f`` evaluated in the requested dtype (float32 inputs and parameters
for the float32 curve) and ``analytic`` always the float64 backward at the
same (dtype-representable) point, so the curve shows the error of the finite
difference alone: truncation ``O(h^2)`` for large ``h`` (slope 2 on a
log-log plot), round-off ``O(eps / h)`` for small ``h`` (slope -1), smallest
near ``h = cbrt(eps)``, the step refattn's gradcheck uses in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refattn import backend
from refattn.params import is_buffer

__all__ = [
    "INSTALL_HINT",
    "NothingToPlot",
    "PlotUnavailable",
    "StepCurve",
    "case_figure",
    "check_plottable",
    "default_steps",
    "draw_cbam",
    "draw_cgnl",
    "draw_class_maps",
    "draw_cross_layer",
    "draw_gc",
    "draw_non_local",
    "require_matplotlib",
    "step_error_curve",
    "step_error_figure",
    "write_case_plot",
    "write_step_error_plot",
]

INSTALL_HINT = "pip install 'refattn[plot]'"


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


class NothingToPlot(ValueError):
    """The case holds no attention map or gate to draw."""


def require_matplotlib() -> Any:
    """The matplotlib module, or PlotUnavailable with the install hint."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401 - the API the plots use
    except ImportError:
        raise PlotUnavailable(
            f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None
    return matplotlib


# ---------------------------------------------------------------------------
# the step-size curve (no matplotlib)


@dataclass(frozen=True)
class StepCurve:
    """Relative error of finite differences against the step size, one dtype."""

    dtype: str
    steps: np.ndarray  # h, decreasing
    central: np.ndarray  # |(L(x+hd) - L(x-hd))/2h - analytic| / |analytic|, NaN if 0
    one_sided: np.ndarray  # |(L(x+hd) - L(x))/h - analytic| / |analytic|, NaN if 0
    eps: float  # machine epsilon of dtype
    analytic: float  # <vjp(c), d>, float64

    @property
    def chosen(self) -> float:
        """cbrt(eps): the step that balances truncation and round-off."""
        return self.eps ** (1.0 / 3.0)

    @property
    def best(self) -> tuple[float, float]:
        """(h, error) at the smallest central-difference error."""
        i = int(np.nanargmin(self.central))
        return float(self.steps[i]), float(self.central[i])


def default_steps(per_decade: int = 4) -> np.ndarray:
    """h = 1e-1 ... 1e-14, ``per_decade`` points per decade, decreasing."""
    return 10.0 ** -np.linspace(1.0, 14.0, 13 * per_decade + 1)


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    t = rng.standard_normal(shape)
    n = float(np.linalg.norm(t))
    return t / n if n > 0 else t


def step_error_curve(spec: Any, cfg: Any, inputs: Mapping[str, Any],
                     params: Mapping[str, Any], state: Mapping[str, Any], *,
                     dtype: str = "float64", steps: Sequence[float] | None = None,
                     seed: int = 0) -> StepCurve:
    """The finite-difference error of BLOCK ``spec`` against the step size.

    Math:
        L(x) = <c, f(x)>, d = max(1, |x|) * t (t a unit direction per tensor)
        central(h)   = |(L(x + h d) - L(x - h d)) / 2h - <vjp(c), d>| / |<vjp(c), d>|
        one_sided(h) = |(L(x + h d) - L(x)) / h - <vjp(c), d>| / |<vjp(c), d>|
        f in `dtype` (inputs, parameters and state rounded to it, x + h d
        rounded too); vjp in float64 at the same rounded point.
    Shapes:
        inputs, params, state: host arrays keyed as the block's forward wants
        (buffers are held fixed, as in ``gradcheck_block``).
    """
    if dtype not in backend.FLOAT_DTYPES:
        raise ValueError(f"dtype: expected float32 or float64, got {dtype!r}")
    hs = default_steps() if steps is None else np.asarray(steps, dtype=np.float64)
    npdtype = np.dtype(dtype)

    def rounded(d: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: backend.to_host(v).astype(npdtype).astype(np.float64)
                for k, v in d.items()}

    point = {f"input.{k}": v for k, v in rounded(inputs).items()}
    point |= {f"param.{k}": v for k, v in rounded(params).items() if not is_buffer(k)}
    fixed = {k: v for k, v in rounded(params).items() if is_buffer(k)}
    st = rounded(state)

    def split(args: Mapping[str, np.ndarray], as_dtype: Any
              ) -> tuple[dict[str, np.ndarray], ...]:
        ins = {k[6:]: np.asarray(v, dtype=as_dtype) for k, v in args.items()
               if k.startswith("input.")}
        ps = {k[6:]: np.asarray(v, dtype=as_dtype) for k, v in args.items()
              if k.startswith("param.")}
        ps |= {k: np.asarray(v, dtype=as_dtype) for k, v in fixed.items()}
        return ins, ps, {k: np.asarray(v, dtype=as_dtype) for k, v in st.items()}

    rng = backend.host_rng(seed)
    direction = {k: np.maximum(1.0, np.abs(v)) * _unit(rng, v.shape)
                 for k, v in point.items()}

    # float64 reference: the cotangent, and the analytic directional derivative
    outputs, cache = spec.forward(*split(point, np.float64), cfg)
    out64 = backend.to_host(outputs["out"])
    c = rng.standard_normal(out64.shape)
    dinputs, dparams = spec.backward({"out": c}, cache)
    grads = {f"input.{k}": v for k, v in dinputs.items()}
    grads |= {f"param.{k}": v for k, v in dparams.items()}
    analytic = float(sum(np.sum(backend.to_host(grads[k]) * d)
                         for k, d in direction.items()))
    denom = abs(analytic) if analytic != 0.0 else 1.0

    def loss(h: float) -> float:
        moved = {k: (v + h * direction[k]).astype(npdtype) for k, v in point.items()}
        out = spec.forward(*split(moved, npdtype), cfg)[0]["out"]
        return float(np.sum(c * backend.to_host(out).astype(np.float64)))

    l0 = loss(0.0)
    central, one_sided = [], []
    for h in hs:
        lp, lm = loss(float(h)), loss(float(-h))
        central.append(abs((lp - lm) / (2 * h) - analytic) / denom)
        one_sided.append(abs((lp - l0) / h - analytic) / denom)
    # an exact zero (possible for a linear block) cannot go on a log axis: NaN
    return StepCurve(
        dtype=dtype,
        steps=hs,
        central=np.where(np.asarray(central) > 0, central, np.nan),
        one_sided=np.where(np.asarray(one_sided) > 0, one_sided, np.nan),
        eps=float(np.finfo(npdtype).eps),
        analytic=analytic,
    )


# ---------------------------------------------------------------------------
# the step-size figure


def _new_figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


SOFTWARE = "refattn"
"""The PNG ``Software`` text of every plot refattn writes: the mark by which
``--plot`` recognizes a file it may replace (``cli.plot_options``)."""


def _save(fig: Any, path: str | Path) -> Path:
    from refattn import __version__

    path = Path(path)
    fig.savefig(path, format="png", metadata={"Software": f"{SOFTWARE} {__version__}"})
    return path


def _fit(hs: np.ndarray, err: np.ndarray, keep: np.ndarray, slope: float
         ) -> float | None:
    """Coefficient a of err ~ a h^slope over ``keep``, when the points there
    really fall on such a line (fitted slope within 0.5); else None."""
    keep = keep & np.isfinite(err)
    if keep.sum() < 3:
        return None
    fitted = float(np.polyfit(np.log(hs[keep]), np.log(err[keep]), 1)[0])
    if abs(fitted - slope) > 0.5:
        return None
    return float(np.exp(np.median(np.log(err[keep]) - slope * np.log(hs[keep]))))


def _guides(curve: StepCurve) -> tuple[float | None, float | None]:
    """A of A h^2 (truncation, for h well above cbrt(eps)) and B of B eps / h
    (round-off, well below it and before the error saturates at 1); None
    where the curve shows no such regime (a linear block has no truncation)."""
    hs, err, h0 = curve.steps, curve.central, curve.chosen
    a = _fit(hs, err, (hs >= 10 * h0) & (hs <= 3e-2), 2.0)
    b = _fit(hs, err, (hs <= h0 / 10) & (err < 1e-1), -1.0)
    return a, None if b is None else b / curve.eps


def _step_panel(ax: Any, curve: StepCurve, title: str, a: float | None) -> None:
    """One dtype's curve; ``a`` is the truncation coefficient (fitted where
    truncation shows best, in float64: it belongs to the function, not the
    dtype)."""
    hs = curve.steps
    ax.loglog(hs, curve.one_sided, color="0.7", lw=1.0,
              label="one-sided difference (slopes 1, -1)")
    ax.loglog(hs, curve.central, "o-", color="C0", ms=3, lw=1.5,
              label="central difference")
    b = _guides(curve)[1]
    if a is not None:
        ax.loglog(hs, a * hs**2, "--", color="C3", lw=1,
                  label="A h^2: truncation (slope 2, A fitted in float64)")
    if b is not None:
        ax.loglog(hs, b * curve.eps / hs, ":", color="C2", lw=1.5,
                  label="B eps / h: round-off (slope -1)")
    ax.axvline(curve.chosen, color="k", lw=1, alpha=0.6)
    ax.annotate(f"h = cbrt(eps) = {curve.chosen:.1e}", xy=(curve.chosen, 0.97),
                xycoords=("data", "axes fraction"), xytext=(4, 0),
                textcoords="offset points", fontsize=8, rotation=90, va="top")
    h_best, e_best = curve.best
    ax.set_xlabel("step h (x moves by h * max(1, |x|) * t, t a unit direction)")
    ax.set_title(f"{curve.dtype} finite differences: {title}\n"
                 f"eps = {curve.eps:.2g}, smallest error {e_best:.1e} at "
                 f"h = {h_best:.1e}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)


def step_error_figure(rows: Sequence[tuple[str, StepCurve, StepCurve]]) -> Any:
    """One row per case: the float64 and the float32 curve side by side."""
    fig = _new_figure(11.0, 4.2 * len(rows))
    axes = fig.subplots(len(rows), 2, squeeze=False, sharey=True)
    lowest = 1e-3
    for (label, c64, c32), (a64, a32) in zip(rows, axes, strict=True):
        a = _guides(c64)[0]
        if a is None:
            a = _guides(c32)[0]
        _step_panel(a64, c64, label, a)
        _step_panel(a32, c32, label, a)
        a64.set_ylabel("|numeric - analytic| / |analytic|")
        lowest = min(lowest, *(float(np.nanmin(c.central)) for c in (c64, c32)))
    axes[0][0].set_ylim(lowest / 5, 10.0)
    # one legend for every line of every panel (a guide may show in one dtype
    # only), on the float32 panel, which is empty down there
    entries: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(text, handle)
    axes[0][1].legend(list(entries.values()), list(entries), fontsize=8,
                      loc="lower left")
    fig.suptitle("finite differences against the step size (analytic = float64 "
                 "backward; one fixed random direction)", fontsize=10)
    return fig


def write_step_error_plot(path: str | Path,
                          rows: Sequence[tuple[str, StepCurve, StepCurve]]) -> Path:
    return _save(step_error_figure(rows), path)


# ---------------------------------------------------------------------------
# attention maps and gates of a case


def _spatial(manifest: Mapping[str, Any], name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in manifest["input_shapes"][name][2:])


def _grid(values: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    """A vector over positions as a 2-D image: (W,) -> (1, W); (H, W); and
    (T, H, W) -> the T slices side by side, separated by a blank column."""
    v = np.asarray(values, dtype=np.float64)
    if len(spatial) == 1:
        return v.reshape(1, spatial[0])
    if len(spatial) == 2:
        return v.reshape(spatial)
    t, h, w = spatial
    cube = v.reshape(t, h, w)
    gap = np.full((h, 1), np.nan)
    return np.concatenate([m for i in range(t)
                           for m in ((cube[i],) if i == 0 else (gap, cube[i]))], axis=1)


def _grid_xy(index: int, spatial: tuple[int, ...]) -> tuple[float, float]:
    """(column, row) of a flat position in the image ``_grid`` draws."""
    if len(spatial) == 1:
        return float(index), 0.0
    if len(spatial) == 2:
        r, c = divmod(index, spatial[1])
        return float(c), float(r)
    t, h, w = spatial
    ti, rest = divmod(index, h * w)
    r, c = divmod(rest, w)
    return float(ti * (w + 1) + c), float(r)


def _scaled_xy(index: int, src: tuple[int, ...], dst: tuple[int, ...],
               stride: tuple[int, ...] | None = None) -> tuple[float, float]:
    """Where position ``index`` of grid ``src`` lies on grid ``dst``, in
    ``_grid`` image coordinates of ``dst``: through a pooling ``stride``
    (cell j of dst covers src cells [s j, s j + s)), or else assuming both
    grids span the same field of view."""
    coords = np.unravel_index(index, src)
    if stride is None:
        stride = tuple(s / d for s, d in zip(src, dst, strict=True))
    rel = [(c + 0.5) / k - 0.5 for c, k in zip(coords, stride, strict=True)]
    if len(dst) == 1:
        return rel[0], 0.0
    if len(dst) == 2:
        return rel[1], rel[0]
    t = min(max(round(rel[0]), 0), dst[0] - 1)
    return t * (dst[2] + 1) + rel[2], rel[1]


def _queries(spatial: tuple[int, ...], count: int = 4) -> list[int]:
    """A few query positions spread over the grid (quartile points)."""
    picks = [sorted({s // 4, (3 * s) // 4}) for s in spatial]
    if len(spatial) == 3:
        picks[0] = [spatial[0] // 2]
    flat = sorted({int(np.ravel_multi_index(ix, spatial))
                   for ix in np.array(np.meshgrid(*picks, indexing="ij")).reshape(
                       len(spatial), -1).T})
    return flat[:count]


def _image(ax: Any, img: np.ndarray, *, cmap: str = "viridis",
           vmin: float | None = None, vmax: float | None = None) -> Any:
    im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                   aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _mark(ax: Any, xy: tuple[float, float], label: str, *,
          hollow: bool = False) -> None:
    if hollow:
        ax.plot(*xy, marker="x", ms=9, mew=2.2, color="w")
        ax.plot(*xy, marker="x", ms=8, mew=1.2, color="C3")
    else:
        ax.plot(*xy, marker="o", ms=11, mfc="C3", mec="w", mew=1.2)
        ax.text(*xy, label, color="w", fontsize=7, ha="center", va="center",
                fontweight="bold")


def _draw_queries_and_rows(subfig: Any, x: np.ndarray, q_spatial: tuple[int, ...],
                           attention: np.ndarray, k_spatial: tuple[int, ...],
                           title: str, query_name: str,
                           stride: tuple[int, ...] | None = None) -> None:
    """Sample 0: the query grid (channel mean of the query input) with a few
    query positions, then each one's attention row over the key grid."""
    queries = _queries(q_spatial)
    axes = subfig.subplots(1, len(queries) + 1, squeeze=False)[0]
    _image(axes[0], _grid(x[0].mean(axis=0).ravel(), q_spatial), cmap="gray")
    for k, i in enumerate(queries):
        _mark(axes[0], _grid_xy(i, q_spatial), str(k + 1))
    slices = "\nT slices side by side" if len(q_spatial) == 3 else ""
    axes[0].set_title(f"query grid {q_spatial}\nchannel mean of {query_name}{slices}",
                      fontsize=8)
    rows = attention[0][queries]  # (queries, Lk)
    lo, hi = float(np.min(rows)), float(np.max(rows))
    im = None
    for k, (ax, i) in enumerate(zip(axes[1:], queries, strict=True)):
        im = _image(ax, _grid(rows[k], k_spatial), vmin=lo, vmax=hi)
        _mark(ax, _scaled_xy(i, q_spatial, k_spatial, stride), "", hollow=True)
        ax.set_title(f"query {k + 1}: attention over\nkey grid {k_spatial}",
                     fontsize=8)
    if im is not None:
        subfig.colorbar(im, ax=list(axes[1:]), shrink=0.8, label="attention weight")
    subfig.suptitle(title, fontsize=9)


def draw_non_local(fig: Any, case: Any) -> None:
    from refattn.blocks.non_local import POOL_KERNELS

    m, t = case.manifest, case.tensors
    q_spatial = _spatial(m, "x")
    k_spatial, stride = q_spatial, None
    if m["config"].get("sub_sample"):
        stride = POOL_KERNELS[len(q_spatial)]
        k_spatial = tuple(s // k for s, k in zip(q_spatial, stride, strict=True))
    att = t["aux.attention"]
    if math.prod(k_spatial) != att.shape[-1]:  # not a layout this module knows
        k_spatial, stride = (int(att.shape[-1]),), None
        q_spatial = (math.prod(q_spatial),)
    mode = m["config"].get("mode")
    _draw_queries_and_rows(
        fig, t["input.x"], q_spatial, att, k_spatial,
        f"non-local ({mode}): rows of aux.attention (N, Lq, Lk), sample 0; "
        "x = the query's own position on the key grid", "x", stride,
    )


def _kv_names(case: Any) -> list[str]:
    names = [k for k in case.manifest["inputs"] if k.startswith("x_kv")]
    return sorted(names, key=lambda k: int(k.split(".")[1]) if "." in k else 0)


def draw_cross_layer(fig: Any, case: Any) -> None:
    m, t = case.manifest, case.tensors
    q_spatial = _spatial(m, "x_q")
    layers = _kv_names(case)
    subfigs = fig.subfigures(len(layers), 1, squeeze=False)[:, 0]
    for sub, (idx, name) in zip(subfigs, enumerate(layers), strict=True):
        _draw_queries_and_rows(
            sub, t["input.x_q"], q_spatial, t[f"aux.attention.{idx}"],
            _spatial(m, name),
            f"cross-layer: aux.attention.{idx} (queries from x_q, keys from {name}), "
            "sample 0; x = the query's position scaled to the key grid", "x_q",
        )


def draw_cbam(fig: Any, case: Any) -> None:
    t = case.tensors
    parts = [p for p in ("channel", "spatial") if f"aux.{p}_gate" in t]
    ratios = [1.0 if p == "channel" else 1.5 for p in parts]
    subfigs = fig.subfigures(len(parts), 1, squeeze=False, height_ratios=ratios)[:, 0]
    for sub, part in zip(subfigs, parts, strict=True):
        if part == "channel":
            gate = t["aux.channel_gate"]  # (N, C)
            ax = sub.subplots()
            im = ax.imshow(gate, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                           interpolation="nearest")
            ax.set_xlabel("channel c")
            ax.set_ylabel("sample n")
            ax.set_yticks(range(gate.shape[0]))
            sub.colorbar(im, ax=ax, label="gate")
            sub.suptitle("channel gate aux.channel_gate (N, C): "
                         "x1 = x * gate[:, :, None, None]", fontsize=9)
            continue
        gate = t["aux.spatial_gate"]  # (N, 1, H, W)
        desc = t.get("aux.spatial_descriptor")  # (N, 2, H, W)
        order = case.manifest["config"].get("channel_pool_order", "max_mean")
        names = ["max over C", "mean over C"]
        if order == "mean_max":
            names.reverse()
        shown = min(int(gate.shape[0]), 4)
        per = 3 if desc is not None else 1
        axes = sub.subplots(1, per * shown, squeeze=False)[0]
        gates = []
        for i in range(shown):
            if desc is not None:
                for j in range(2):
                    _image(axes[per * i + j], desc[i, j], cmap="magma")
                    axes[per * i + j].set_title(f"n={i}: m[{j}]\n{names[j]}",
                                                fontsize=8)
            ax = axes[per * i + per - 1]
            im = _image(ax, gate[i, 0], vmin=0.0, vmax=1.0)
            ax.set_title(f"n={i}: spatial\ngate", fontsize=8)
            gates.append(ax)
        sub.colorbar(im, ax=gates, shrink=0.8, label="gate")
        sub.suptitle("spatial gate aux.spatial_gate (N, 1, H, W) = sigmoid(conv(m)), "
                     "m = aux.spatial_descriptor (N, 2, H, W); out = x1 * gate",
                     fontsize=9)


def draw_cgnl(fig: Any, case: Any) -> None:
    s = case.tensors["aux.s"]  # (N, G) dot | (N, G, Q+1) gaussian
    cfg = case.manifest["config"]
    moments = s[..., None] if s.ndim == 2 else s
    n, g, q1 = moments.shape
    axes = fig.subplots(1, q1, squeeze=False)[0]
    width = 0.8 / n
    for q, ax in enumerate(axes):
        for i in range(n):
            ax.bar(np.arange(g) + (i - (n - 1) / 2) * width, moments[i, :, q], width,
                   label=f"sample {i}")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(g))
        ax.set_xlabel("group k")
        ax.set_title("s (dot kernel)" if s.ndim == 2 else f"s_{q} (moment q = {q})",
                     fontsize=9)
    axes[0].set_ylabel("per-group scalar")
    axes[0].legend(fontsize=8)
    if s.ndim == 2:
        what = "aux.s, one scalar per (sample, group); y = s * t in each group"
    else:
        what = (f"aux.s, {q1} moments s_q per (sample, group); "
                "y = e_t * sum_q alpha_q s_q t^q in each group")
    fig.suptitle(f"CGNL ({cfg.get('kernel')} kernel, groups {cfg.get('groups')}, "
                 f"use_scale {cfg.get('use_scale')}): {what}", fontsize=9)


def draw_class_maps(fig: Any, case: Any) -> None:
    maps = case.tensors["aux.class_maps"][0]  # (K, H, W), sample 0
    logits = case.tensors["output.out"][0]
    k = maps.shape[0]
    cols = min(k, 5)
    axes = fig.subplots(math.ceil(k / cols), cols, squeeze=False)
    lo, hi = float(maps.min()), float(maps.max())
    im = None
    for j, ax in enumerate(axes.ravel()):
        if j >= k:
            ax.set_axis_off()
            continue
        im = _image(ax, maps[j], vmin=lo, vmax=hi)
        ax.set_title(f"class {j}: logit {logits[j]:.3g}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=list(axes.ravel()), shrink=0.8)
    fig.suptitle("NIN head: aux.class_maps, sample 0 (each logit is its map's mean)",
                 fontsize=9)


def _painters() -> dict[str, tuple[Any, tuple[float, float]]]:
    """Block -> (painter, figure size), from the registry (``BlockSpec.figure``)."""
    from refattn.blocks.registry import BLOCKS

    return {name: (globals()[spec.figure[0]], spec.figure[1])
            for name, spec in BLOCKS.items() if spec.figure is not None}


def check_plottable(case: Any) -> None:
    """NothingToPlot (with a one-line reason) unless ``case_figure`` can draw it."""
    block = case.manifest["block"]
    painters = _painters()
    if block not in painters:
        raise NothingToPlot(
            f"--plot: a {block} case has no attention maps or gates (aux.* tensors) "
            f"to draw; blocks with pictures: {', '.join(painters)}"
        )


def case_figure(case: Any) -> Any:
    """The attention maps and gates of a verified case (``read_case``)."""
    check_plottable(case)
    block = case.manifest["block"]
    paint, (width, height) = _painters()[block]
    if block == "cross_layer":
        height *= len(_kv_names(case))
    fig = _new_figure(width, height)
    paint(fig.subfigures(1, 1), case)  # the painter's own titles stay below the header
    m = case.manifest
    fig.suptitle(f"{block} / {m['case_id']}: preset {m['preset'] or '-'}, "
                 f"{m['dtype']}, seed {m['seed']}", fontsize=10, fontweight="bold")
    return fig


def write_case_plot(path: str | Path, case: Any) -> Path:
    return _save(case_figure(case), path)


def draw_gc(fig: Any, case: Any) -> None:
    """GC block: per sample (at most 3) the channel mean of x and its attention
    map over the positions (pooling 'att'), then the channel_mul gate (N, C)."""
    t, cfg = case.tensors, case.manifest["config"]
    x, att, gate = t["input.x"], t.get("aux.attention"), t.get("aux.channel_mul")
    rows = [1.0] + ([0.6] if gate is not None else [])
    subfigs = fig.subfigures(len(rows), 1, squeeze=False, height_ratios=rows)[:, 0]
    shown = min(int(x.shape[0]), 3)
    per = 2 if att is not None else 1
    axes = subfigs[0].subplots(1, per * shown, squeeze=False)[0]
    maps, im = [], None
    for i in range(shown):
        _image(axes[per * i], x[i].mean(axis=0), cmap="gray")
        axes[per * i].set_title(f"n={i}: channel\nmean of x", fontsize=8)
        if att is not None:
            ax = axes[per * i + 1]
            im = _image(ax, att[i, 0], vmin=0.0, vmax=float(att[:shown].max()))
            ax.set_title(f"n={i}: attention\n(sums to 1)", fontsize=8)
            maps.append(ax)
    if im is not None:
        subfigs[0].colorbar(im, ax=maps, shrink=0.8, label="attention weight")
    pooling = ("aux.attention (N, 1, H, W): softmax over the H*W positions; "
               "context = sum of x weighted by it" if att is not None else
               "pooling 'avg': the context is the mean of x (no attention map)")
    subfigs[0].suptitle(f"GC block ({cfg.get('pooling_type')}, "
                        f"{' + '.join(cfg.get('fusion_types', []))}): {pooling}",
                        fontsize=9)
    if gate is not None:
        ax = subfigs[1].subplots()
        img = ax.imshow(gate[:, :, 0, 0], cmap="viridis", vmin=0.0, vmax=1.0,
                        aspect="auto", interpolation="nearest")
        ax.set_xlabel("channel c")
        ax.set_ylabel("sample n")
        ax.set_yticks(range(gate.shape[0]))
        subfigs[1].colorbar(img, ax=ax, label="gate")
        subfigs[1].suptitle("aux.channel_mul (N, C, 1, 1) = sigmoid(channel_mul "
                            "transform of the context); out = x * gate (+ add term)",
                            fontsize=9)
