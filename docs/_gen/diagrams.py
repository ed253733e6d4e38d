"""The pictures of the documentation, drawn with matplotlib.

    python docs/_gen/diagrams.py                # data-flow diagrams only
    python docs/_gen/diagrams.py --pictures     # also the gradcheck and show images

writes into ``docs/img/``:

``dataflow-<block>.png``
    boxes and arrows: the forward's steps of each block in the order (and
    with the step numbers) of its ``forward``, tensors with their shapes,
    parameters beside the step that uses them.
``gradcheck-<block>.png`` (``--pictures``)
    what ``refattn gradcheck --block B --plot FILE`` draws, for cgnl and cbam.
``show-<block>.png`` (``--pictures``)
    what ``refattn show CASE --plot FILE`` draws, for cbam, non_local,
    cross_layer, cgnl and gc cases at the shapes listed in ``SHOW_CASES``.

Needs the ``plot`` extra (``pip install 'refattn[plot]'``).  The images are
committed; rerun this after changing a block's structure or the plots.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "docs" / "img"

# ---------------------------------------------------------------------------
# a small box-and-arrow language


@dataclass(frozen=True)
class Node:
    key: str
    label: str
    col: float
    row: float
    kind: str = "op"  # "op" (a step), "tensor" (data, with its shape), "param"


@dataclass
class Diagram:
    name: str
    title: str
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    # the backward: dashed arrows against a chain of the forward (later to earlier)
    backs: list[tuple[str, str, str]] = field(default_factory=list)

    def op(self, key: str, label: str, col: float, row: float) -> None:
        self.nodes.append(Node(key, label, col, row, "op"))

    def tensor(self, key: str, label: str, col: float, row: float) -> None:
        self.nodes.append(Node(key, label, col, row, "tensor"))

    def param(self, key: str, label: str, col: float, row: float) -> None:
        self.nodes.append(Node(key, label, col, row, "param"))

    def flow(self, *keys: str, label: str = "") -> None:
        """Arrows along a chain of nodes (the label goes on the first arrow)."""
        for i, (a, b) in enumerate(zip(keys, keys[1:])):
            self.edges.append((a, b, label if i == 0 else "", "", 0.0))

    def edge(self, a: str, b: str, label: str = "") -> None:
        self.edges.append((a, b, label, "", 0.0))

    def back(self, *keys: str, label: str = "") -> None:
        """Backward arrows along a forward chain, from its end to its start
        (``keys`` in forward order; the label goes on the last arrow)."""
        pairs = list(zip(keys, keys[1:]))
        for i, (a, b) in enumerate(reversed(pairs)):
            self.backs.append((b, a, label if i == 0 else ""))

    def skip(self, a: str, b: str, label: str = "", *, side: str = "under",
             rows: float = 0.8) -> None:
        """A skip connection along a row, drawn as a bracket ``rows`` grid
        rows over or under it."""
        self.edges.append((a, b, label, side, rows))


STYLE = {
    "op": {"fc": "white", "ec": "0.35", "lw": 1.2, "size": 8.5, "style": "square"},
    "tensor": {"fc": "#dcebf7", "ec": "#3b75af", "lw": 1.2, "size": 8.5,
               "style": "round"},
    "param": {"fc": "#fff4d6", "ec": "#c8a23c", "lw": 0.9, "size": 7.5,
              "style": "round"},
}
DX, DY = 2.25, 1.25  # grid spacing (data units)
BACK_COLOR = "#b5332e"


def draw(diagram: Diagram, path: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    cols = [n.col for n in diagram.nodes]
    row_of = {n.key: n.row for n in diagram.nodes}
    rows = list(row_of.values())
    # brackets of skip connections reach beyond their rows
    for a, _, _, side, r in diagram.edges:
        if side:
            rows.append(row_of[a] + (r + 0.15) * (-1 if side == "over" else 1))
    top, bottom = min(rows) - 0.4, max(rows) + 0.45
    width = (max(cols) - min(cols) + 1) * DX
    height = (bottom - top) * DY + 0.45
    fig = Figure(figsize=(width, height * 0.95), dpi=120)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(min(cols) * DX - DX / 2, max(cols) * DX + DX / 2)
    ax.set_ylim(-bottom * DY, -top * DY + 0.45)
    ax.set_axis_off()
    boxes = {}
    for n in diagram.nodes:
        st = STYLE[n.kind]
        x, y = n.col * DX, -n.row * DY
        lines = n.label.split("\n")
        w = max(0.85, 0.075 * max(len(s) for s in lines) * st["size"] / 8.5 + 0.25)
        w = min(w, DX * 0.92)
        h = 0.2 + 0.19 * len(lines)
        pad = 0.06
        box = FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                             boxstyle=f"{st['style']},pad={pad}", fc=st["fc"],
                             ec=st["ec"], lw=st["lw"], zorder=2)
        ax.add_patch(box)
        ax.text(x, y, n.label, ha="center", va="center", fontsize=st["size"],
                zorder=3, style="italic" if n.kind == "param" else "normal")
        boxes[n.key] = box
    positions = {n.key: (n.col * DX, -n.row * DY) for n in diagram.nodes}
    for a, b, label, side, reach in diagram.edges:
        pa, pb = positions[a], positions[b]
        mid = ((pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2 + 0.12)
        if side:
            # a bracket `reach` grid rows above or below the row
            arm = reach * DY / max(abs(pb[0] - pa[0]), 1e-9)
            flip = (side == "over") == (pb[0] > pa[0])
            style = f"bar,fraction={-arm if flip else arm}"
            mid = (mid[0], pa[1] + (reach * DY if side == "over" else -reach * DY))
        elif pa[1] == pb[1] or pa[0] == pb[0]:
            style = "arc3,rad=0.0"
        else:
            style = f"arc3,rad={0.15 if pb[1] < pa[1] else -0.15}"
        ax.annotate("", xy=pb, xytext=pa, zorder=1,
                    arrowprops={"arrowstyle": "-|>", "color": "0.25", "lw": 1.0,
                                "patchA": boxes[a], "patchB": boxes[b],
                                "shrinkA": 3, "shrinkB": 3, "connectionstyle": style})
        if label:
            ax.text(*mid, label, ha="center", va="center" if side else "bottom",
                    fontsize=7, color="0.3",
                    zorder=4, bbox={"fc": "white", "ec": "none", "pad": 0.5})
    for a, b, label in diagram.backs:
        pa, pb = positions[a], positions[b]
        ax.annotate("", xy=pb, xytext=pa, zorder=1,
                    arrowprops={"arrowstyle": "-|>", "color": BACK_COLOR, "lw": 1.0,
                                "linestyle": (0, (4, 2)), "patchA": boxes[a],
                                "patchB": boxes[b], "shrinkA": 3, "shrinkB": 3,
                                "connectionstyle": "arc3,rad=0.35"})
        if label:
            mid = ((pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2 - 0.32)
            ax.text(*mid, label, ha="center", va="top", fontsize=7, color=BACK_COLOR,
                    zorder=4, bbox={"fc": "white", "ec": "none", "pad": 0.5})
    ax.text(min(cols) * DX - DX / 2 + 0.1, -top * DY + 0.25,
            diagram.title, ha="left", va="center", fontsize=10, fontweight="bold")
    if diagram.backs:
        ax.text(max(cols) * DX + DX / 2 - 0.1, -top * DY + 0.25,
                "solid: forward    dashed: backward (the VJPs, in reverse)",
                ha="right", va="center", fontsize=8, color=BACK_COLOR)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------
# the blocks (numbers = the step numbers of each block's forward)


def conv1x1() -> Diagram:
    d = Diagram("conv1x1", "conv1x1: a per-position linear layer (1x1 convolution)")
    d.tensor("x", "x\n(N, C, H, W)", 0, 1)
    d.op("mix", "1. pad, keep every s-th\nposition, mix channels:\n"
         "y = W x + b (per group)", 1, 1)
    d.param("w", "weight (O, C/G, 1, 1)\nbias (O,)", 1, 0)
    d.tensor("y", "out\n(N, O, Ho, Wo)", 2, 1)
    d.flow("x", "mix", "y")
    d.flow("w", "mix")
    d.back("x", "mix", "y", label="1. dx = W^T dy")
    return d


def gap() -> Diagram:
    d = Diagram("gap", "gap: global average pooling")
    d.tensor("x", "x\n(N, C, H, W)", 0, 0)
    d.op("mean", "1. mean over\nall positions", 1, 0)
    d.tensor("y", "out (N, C)\nor (N, C, 1, 1)", 2, 0)
    d.flow("x", "mean", "y")
    d.back("x", "mean", "y", label="1. dx = dy / L")
    return d


def mlpconv() -> Diagram:
    d = Diagram("mlpconv", "mlpconv (NIN): k x k conv, then 1x1 convs, each + ReLU; "
                "nin_head adds GAP")
    d.tensor("x", "x\n(N, Cin, H, W)", 0, 1)
    d.op("c0", "1. conv k x k\n(stride, padding,\ndilation, groups)\n+ ReLU", 1, 1)
    d.param("p0", "convs.0.weight\n(C0, Cin/G, k, k)\nconvs.0.bias", 1, 0)
    d.op("c1", "2. 1x1 conv\n(cccp) + ReLU", 2, 1)
    d.param("p1", "convs.1.weight\n(C1, C0, 1, 1)\nconvs.1.bias", 2, 0)
    d.op("more", "2. ... 1x1 conv\n+ ReLU (relu_last\non the last)", 3, 1)
    d.tensor("y", "out (mlpconv)\n(N, C_L, Ho, Wo)", 4, 1)
    d.op("gap", "3. nin_head:\nGAP of each\nclass map", 4, 2)
    d.tensor("logits", "logits\n(N, classes)", 3, 2)
    d.flow("x", "c0", "c1", "more", "y", "gap", "logits")
    d.flow("p0", "c0")
    d.flow("p1", "c1")
    d.back("x", "c0", "c1", "more", "y", label="2., 1.")
    d.back("y", "gap", "logits", label="3.")
    return d


def cbam() -> Diagram:
    d = Diagram("cbam", "CBAM: channel gate (top), then spatial gate (bottom); "
                "no residual inside the block")
    # channel gate
    d.tensor("x", "x\n(N, C, H, W)", 0, 1)
    d.op("avg", "1. squeeze:\navg pool over H, W", 1, 0)
    d.op("max", "1. squeeze:\nmax pool over H, W", 1, 2)
    d.op("mlpa", "2. shared MLP:\nfc1, ReLU, fc2", 2, 0)
    d.op("mlpm", "2. shared MLP\n(the same weights)", 2, 2)
    d.param("mlp", "mlp.fc1.weight (Cr, C)\nmlp.fc2.weight (C, Cr)\n(+ biases)", 2, 1)
    d.op("sum", "3. excite: sum\nthe logits, sigmoid", 3, 1)
    d.tensor("a", "aux.channel_gate\na (N, C)", 4, 1)
    d.op("g1", "3. x1 = x * a", 5, 1)
    d.flow("x", "avg", "mlpa", "sum")
    d.flow("x", "max", "mlpm", "sum")
    d.flow("mlp", "mlpa")
    d.flow("mlp", "mlpm")
    d.flow("sum", "a", "g1")
    d.skip("x", "g1", "x", side="over", rows=1.7)
    # spatial gate
    d.tensor("x1", "x1 (channel-gated)\n(N, C, H, W)", 0, 4)
    d.op("cp", "1. compress: max and\nmean over C (order:\nchannel_pool_order)",
         1, 4)
    d.tensor("m", "aux.spatial_descriptor\nm (N, 2, H, W)", 2, 4)
    d.op("conv", "2. conv k x k to one\nmap, padding (k-1)/2", 3, 4)
    d.param("sp", "spatial.conv.weight\n(1, 2, k, k)", 3, 3)
    d.op("bn", "3. BN (jongchan)\n4. ReLU (off)\n5. sigmoid", 4, 4)
    d.tensor("s", "aux.spatial_gate\n(N, 1, H, W)", 5, 4)
    d.op("g2", "5. out = x1 * gate", 6, 4)
    d.tensor("out", "out\n(N, C, H, W)", 6, 3)
    d.flow("x1", "cp", "m", "conv", "bn", "s", "g2", "out")
    d.flow("sp", "conv")
    d.skip("x1", "g2", "x1", side="under")
    # the backward: spatial gate 5..1, then channel gate 3..1; dx1 and dx each
    # sum the gate path and the pool paths
    d.back("x1", "cp", "m", "conv", "bn", "s", "g2", label="5. to 1.")
    d.back("x", "avg", "mlpa", "sum", "a", "g1", label="3. to 1.")
    d.back("x", "max", "mlpm", "sum")
    return d


def non_local() -> Diagram:
    d = Diagram("non_local", "non-local block (embedded Gaussian shown; "
                "P = the optional max-pool sub-sampling)")
    d.tensor("x", "x\n(N, C, *S)", 0, 1)
    d.op("theta", "1. theta: 1x1 conv\nC -> Ci", 1, 0)
    later = "(before_proj: P,\nthen 3. the conv)"
    d.op("phi", f"1. phi: 1x1 conv\n2. max-pool P\n{later}", 1, 1)
    d.op("g", f"1. g: 1x1 conv\n2. max-pool P\n{later}", 1, 2.2)
    d.op("f", "4. f = theta^T phi\n(/ sqrt(Ci) with\nuse_scale)", 2, 0.5)
    d.op("sm", "5. softmax over\nthe keys (last axis)", 3, 0.5)
    d.tensor("A", "aux.attention\nA (N, Lq, Lk)", 4, 0.5)
    d.op("y", "6. Y = A G^T,\ntransposed to\n(N, Ci, Lq)", 4, 2.2)
    d.op("W", "7. W: 1x1 conv\nCi -> C", 5, 2.2)
    d.op("bn", "8. BN (W_bn)", 6, 2.2)
    d.op("res", "9. out = . + x", 6, 3.4)
    d.tensor("z", "out\n(N, C, *S)", 5, 3.4)
    d.flow("x", "theta", "f")
    d.flow("x", "phi", "f")
    d.flow("g", "y")
    d.flow("x", "g")
    d.flow("f", "sm", "A", "y", "W", "bn", "res", "z")
    d.tensor("x2", "x (residual)", 0, 3.4)
    d.skip("x2", "res", side="under")
    d.back("A", "y", "W", "bn", "res", label="9. to 6.")
    d.back("x", "theta", "f", "sm", "A", label="5. to 1.")
    d.back("x", "phi", "f")
    d.back("x", "g", "y")
    return d


def cgnl() -> Diagram:
    d = Diagram("cgnl", "CGNL (dot kernel): one scalar s per (sample, group)")
    d.tensor("x", "x\n(N, C, *S)", 0, 1)
    d.op("proj", "1. t, p, g:\n1x1 convs C -> P\n(one matmul)", 1, 1)
    d.param("w", "t.weight, p.weight,\ng.weight (P, C, 1, 1)", 1, 0)
    d.op("split", "2. split P into G\ngroups of M =\n(P/G) * |S| values", 2, 1)
    d.op("s", "3. s = c * sum_M p g\n(c = 1/sqrt(M)\nwith use_scale)", 3, 0)
    d.tensor("aux", "aux.s\n(N, G)", 4, 0)
    d.op("y", "3. y = s * t\n(aux.y)", 4, 1)
    d.op("z", "4. z: grouped 1x1\nconv P -> C\n(G groups)", 5, 1)
    d.op("gn", "5. GroupNorm\n(G groups)", 6, 1)
    d.op("res", "6. out = . + x", 6, 2.2)
    d.tensor("out", "out\n(N, C, *S)", 5, 2.2)
    d.flow("x", "proj", "split", "s", "aux", "y", "z", "gn", "res", "out")
    d.flow("w", "proj")
    d.edge("split", "y", "t")
    d.tensor("x2", "x (residual)", 0, 2.2)
    d.skip("x2", "res", side="under")
    d.back("x", "proj", "split", "s", "aux", "y", "z", "gn", "res", label="6. to 1.")
    return d


def cross_layer() -> Diagram:
    d = Diagram("cross_layer", "cross-layer non-local: queries from x_q, keys and "
                "values from each layer x_kv.m")
    d.tensor("xq", "x_q\n(N, Cq, Hq, Wq)", 0, 0)
    d.tensor("xkv", "x_kv.m\n(N, Ck_m, Hk, Wk)", 0, 2)
    d.op("theta", "1. theta: 1x1 conv\nCq -> P (shared)", 1, 0)
    d.op("phi", "2. kv{m}.phi:\n1x1 conv Ck_m -> P", 1, 1.5)
    d.op("g", "2. kv{m}.g:\n1x1 conv Ck_m -> P", 1, 2.5)
    d.op("f", "3. Q K_m\n(/ sqrt(P) with\nuse_scale)", 2, 0.75)
    d.op("sm", "4. softmax over\nthe key positions", 3, 0.75)
    d.tensor("A", "aux.attention.m\n(N, HqWq, HkWk)", 4, 0.75)
    d.op("y", "5. Y = A V\n6. transpose,\nreshape", 4, 2.5)
    d.op("W", "7. W: 1x1 conv\nP -> Cq (shared)", 5, 2.5)
    d.op("bn", "8. kv{m}.bn", 6, 2.5)
    d.op("sum", "9. sum over the\nlayers m, + x_q", 6, 1.25)
    d.tensor("out", "out\n(N, Cq, Hq, Wq)", 6, 0)
    d.flow("xq", "theta", "f")
    d.flow("xkv", "phi", "f")
    d.flow("xkv", "g", "y")
    d.flow("f", "sm", "A", "y", "W", "bn", "sum", "out")
    d.skip("xq", "out", "x_q (residual)", side="over")
    d.back("xq", "theta", "f", "sm", "A", "y", "W", "bn", "sum", label="9. to 1.")
    d.back("xkv", "phi", "f")
    d.back("xkv", "g", "y")
    return d


def gc() -> Diagram:
    d = Diagram("gc", "global context block: one context vector per sample, "
                "transformed and broadcast over H, W (mmcv ContextBlock)")
    d.tensor("x", "x\n(N, C, H, W)", 0, 2)
    d.param("wk", "conv_mask.weight\n(1, C, 1, 1), .bias", 1, 0)
    d.op("mask", "1. conv_mask:\n1x1 conv C -> 1", 1, 1)
    d.op("sm", "2. softmax over\nthe H*W positions", 2, 1)
    d.tensor("A", "aux.attention\n(N, 1, H, W)", 3, 1)
    d.op("ctx", "3. context\nc = x A^T (N, C)\n(avg: mean of x)", 3, 2)
    d.op("mul", "4. channel_mul:\nconv1, LN, ReLU,\nconv2", 4, 1)
    d.tensor("x2", "x", 5, 0)
    d.op("gate", "5. x * sigmoid(.)", 5, 1)
    d.op("add", "6. channel_add:\nconv1, LN, ReLU,\nconv2", 4, 3)
    d.param("tp", "<b>.conv1 (P, C, 1, 1)\n<b>.ln (P, 1, 1)\n"
            "<b>.conv2 (C, P, 1, 1)", 5, 3)
    d.op("plus", "7. . + channel_add\n(broadcast over H, W)", 6, 2)
    d.tensor("out", "out\n(N, C, H, W)", 6, 3)
    d.flow("x", "mask", "sm", "A", "ctx")
    d.flow("wk", "mask")
    d.flow("x", "ctx")
    d.flow("ctx", "mul", "gate", "plus", "out")
    d.flow("x2", "gate")
    d.flow("ctx", "add", "plus")
    d.flow("tp", "add")
    d.back("x", "mask", "sm", "A", "ctx", "mul", "gate", "plus", label="7. to 1.")
    d.back("x", "ctx", "add", "plus")
    return d


def diagrams() -> dict[str, Callable[[], Diagram]]:
    """Block name -> its drawing function here, as the registry names it
    (``BlockSpec.diagram``)."""
    from refattn.blocks.registry import BLOCKS

    return {name: globals()[spec.diagram] for name, spec in BLOCKS.items()
            if spec.diagram is not None}

# ---------------------------------------------------------------------------
# the gradcheck and show pictures

GRADCHECK_BLOCKS = {"cgnl": None, "cbam": "seed"}  # block: preset
SHOW_CASES = {  # block: (preset, overrides, shapes)
    "cbam": ("jongchan", {"spatial_bn": "eval"}, {"x": (2, 32, 9, 12)}),
    "non_local": ("alexhex7", {"bn": "eval"}, {"x": (2, 8, 10, 12)}),
    "cross_layer": ("cnl", {"bn": "eval", "planes": 8},
                    {"x_q": (2, 16, 6, 6), "x_kv.0": (2, 8, 12, 12),
                     "x_kv.1": (2, 12, 9, 9)}),
    "cgnl": ("yue_gaussian", {"gamma": 0.1}, {"x": (2, 16, 6, 7)}),
    "gc": ("mmcv", {"fusion_types": ("channel_add", "channel_mul")},
           {"x": (2, 16, 9, 12)}),
}


def pictures(out: Path) -> list[Path]:
    from refattn.blocks.registry import BLOCKS
    from refattn.blocks.spec import config_from_dict
    from refattn.golden.format import read_case, write_case
    from refattn.golden.generate import expand_requests, generate_case, split_case
    from refattn.plot import step_error_curve, write_case_plot, write_step_error_plot

    written = []
    for block, preset in GRADCHECK_BLOCKS.items():
        spec = BLOCKS[block]
        rows = []
        for req, cfg in expand_requests(block, preset, {}):
            case = generate_case(req, cfg)
            resolved = config_from_dict(spec.config_cls, case.manifest["config"])
            args = split_case(case.tensors)
            rows.append((f"{block}/{case.case_id}", *(
                step_error_curve(spec, resolved, *args, dtype=dt)
                for dt in ("float64", "float32"))))
        written.append(write_step_error_plot(out / f"gradcheck-{block}.png", rows))
    with tempfile.TemporaryDirectory() as tmp:
        for block, (preset, overrides, shapes) in SHOW_CASES.items():
            ((req, cfg),) = expand_requests(block, preset, overrides, shapes=shapes)
            case = generate_case(req, cfg)
            path = write_case(Path(tmp), block, case.case_id, case.tensors,
                              case.manifest, tolerances=case.tolerances,
                              accumulation=case.accumulation)
            written.append(write_case_plot(out / f"show-{block}.png", read_case(path)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=IMG)
    parser.add_argument("--pictures", action="store_true",
                        help="also the gradcheck-*.png and show-*.png images")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [draw(f(), args.out / f"dataflow-{name}.png")
               for name, f in diagrams().items()]
    if args.pictures:
        written += pictures(args.out)
    for p in written:
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
