"""Worked examples: a tiny case of each block, with the numbers of every step.

A block page holds a marker line ``<!-- worked-example: NAME -->`` (NAME a
key of ``CASES``); the ``on_page_markdown`` hook replaces it with the
markdown of ``worked_example(NAME)``, computed at build time:

1. the case's Python (shown on the page) is executed: it draws a tiny case
   with ``refattn.blocks.registry.draw_case``, rounds it to one decimal so
   that a reader can redo it by hand, and runs the block forward and backward
   with ``run_block``;
2. while it runs, the functions named in the case are traced
   (``trace_steps``): every local array a function assigns is recorded under
   the numbered step comment (``# 3. ...``) whose lines assigned it;
3. each step is printed with its code comment as label, the label tagged
   with the function and the comment it cites (``data-code``,
   ``data-step``), which ``tests/docs/test_rendered.py`` resolves.

So the numbers are the code's own intermediates, under the code's own step
numbers; nothing is pasted.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np

MIN_KINK_MARGIN = 1e-3
# a numbered step comment: "# 3. excite: gate x by σ of the summed logits"
STEP_COMMENT = re.compile(r"^\s*#\s*(?P<num>\d+)\.\s+(?P<text>.+?)\s*$")


def resolve(dotted: str) -> Callable[..., Any]:
    """The function named by a dotted path, e.g.
    ``refattn.blocks.cbam.channel_gate_backward``."""
    module, _, name = dotted.rpartition(".")
    if not module:
        raise ValueError(f"data-code: expected module.function, got {dotted!r}")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"data-code: cannot import {dotted!r}: {err}") from None
    if not callable(obj):
        raise ValueError(f"data-code: {dotted!r} is not a function")
    return obj


def code_steps(fn: Callable[..., Any]) -> list[tuple[int, int, str]]:
    """The numbered step comments of a function's source, in source order:
    (step number, absolute line number, comment text of that line)."""
    lines, first = inspect.getsourcelines(fn)
    out = []
    for offset, line in enumerate(lines):
        m = STEP_COMMENT.match(line)
        if m:
            out.append((int(m.group("num")), first + offset, m.group("text")))
    return out


def step_number(fn: Callable[..., Any], key: str) -> int:
    """The number of the step comment of `fn` whose text starts with `key`
    (case-insensitive).  Raises ValueError when none or several numbers do."""
    numbers = {n for n, _, text in code_steps(fn)
               if text.lower().startswith(key.lower())}
    if len(numbers) != 1:
        found = "no step comment" if not numbers else f"steps {sorted(numbers)}"
        raise ValueError(f"data-step {key!r}: {found} of {fn.__qualname__} "
                         "starts with it")
    return numbers.pop()


# ---------------------------------------------------------------------------
# tracing


@dataclass
class StepValues:
    """What one numbered step of one call assigned."""

    function: str  # dotted name
    number: int
    comment: str
    values: dict[str, Any] = field(default_factory=dict)  # name -> host copy


def _shown(name: str, value: Any) -> bool:
    if name.startswith("_"):
        return False
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f"
    return isinstance(value, float)


class _Tracer:
    def __init__(self, functions: list[Callable[..., Any]]) -> None:
        self.by_code: dict[Any, tuple[str, list[tuple[int, int, str]]]] = {}
        for fn in functions:
            dotted = f"{fn.__module__}.{fn.__qualname__}"
            self.by_code[fn.__code__] = (dotted, code_steps(fn))
        self.records: list[StepValues] = []

    def global_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "call" or frame.f_code not in self.by_code:
            return None
        dotted, steps = self.by_code[frame.f_code]
        bound: dict[str, tuple[Any, int | None]] = {  # name -> (object, its step)
            name: (value, None) for name, value in frame.f_locals.items()
        }
        current: dict[int, StepValues] = {}
        prev_line = frame.f_lineno

        def step_of(line: int) -> tuple[int, str] | None:
            found = None
            for num, at, text in steps:  # source order; the last one above wins
                if at <= line:
                    found = (num, text)
            return found

        def record(step: tuple[int, str], name: str, value: Any) -> None:
            if step[0] not in current:
                current[step[0]] = StepValues(dotted, step[0], step[1])
                self.records.append(current[step[0]])
            current[step[0]].values[name] = np.array(value, copy=True)

        def local_trace(frame: FrameType, event: str, arg: Any) -> Any:
            nonlocal prev_line
            if event in ("line", "return"):
                step = step_of(prev_line)
                for name, value in frame.f_locals.items():
                    old, at = bound.get(name, (_MISSING, None))
                    if old is not value:  # (re)bound by the line just run
                        bound[name] = (value, None if step is None else step[0])
                        if step is not None and _shown(name, value):
                            record(step, name, value)
                    elif (step is not None and at == step[0] and _shown(name, value)
                          and not np.array_equal(current[at].values[name], value)):
                        record(step, name, value)  # updated in place, same step
                prev_line = frame.f_lineno
            return local_trace

        return local_trace


_MISSING = object()


def trace_steps(functions: list[Callable[..., Any]],
                run: Callable[[], Any]) -> tuple[Any, list[StepValues]]:
    """Run `run()` and record, for every call of one of `functions`, the
    float arrays and floats each numbered step assigned (in call order, then
    step order of execution)."""
    tracer = _Tracer(functions)
    old = sys.gettrace()
    sys.settrace(tracer.global_trace)
    try:
        result = run()
    finally:
        sys.settrace(old)
    return result, tracer.records


# ---------------------------------------------------------------------------
# the cases


def _case_code(block: str, preset: str | None, overrides: str,
               shapes: str, seed: int, input_scale: int) -> str:
    preset_arg = "" if preset is None else f"{preset!r}"
    args = ", ".join(a for a in (preset_arg, overrides) if a)
    scaled = "v" if input_scale == 1 else f"{input_scale} * v"
    return textwrap.dedent(f"""\
        import numpy as np
        from refattn.blocks.registry import BLOCKS, draw_case, run_block

        spec = BLOCKS[{block!r}]
        cfg = spec.config({args})
        inputs, params, state = draw_case(spec, cfg, {shapes}, seed={seed})
        # few decimals, so that every step can be redone by hand
        inputs = {{k: np.round({scaled}, 1) for k, v in inputs.items()}}
        params = {{k: np.round(v, 2) for k, v in params.items()}}
        state = {{k: np.round(v, 2) for k, v in state.items()}}
        out_shape = spec.forward(inputs, params, state, cfg)[0]["out"].shape
        dout = np.round(np.random.default_rng({seed + 7}).standard_normal(out_shape), 1)
        outputs, dinputs, dparams = run_block(spec, cfg, inputs, params, state, dout)
        """)


@dataclass(frozen=True)
class Case:
    block: str  # registry name
    preset: str | None
    overrides: str  # keyword arguments of spec.config, as source
    shapes: str  # the shapes dict, as source
    seed: int
    functions: tuple[str, ...]  # dotted names of the traced functions
    input_scale: int = 1  # inputs ~ N(0, scale²): sharper attention maps

    @property
    def code(self) -> str:
        return _case_code(self.block, self.preset, self.overrides, self.shapes,
                          self.seed, self.input_scale)


CASES: dict[str, Case] = {
    "conv1x1": Case(
        "conv1x1", None, "out_channels=2", '{"x": (1, 2, 2, 2)}', 0,
        ("refattn.blocks.conv1x1.forward", "refattn.blocks.conv1x1.backward"),
    ),
    "gap": Case(
        "gap", None, "", '{"x": (1, 2, 2, 2)}', 0,
        ("refattn.blocks.gap.forward", "refattn.blocks.gap.backward"),
    ),
    "nin_head": Case(
        "nin_head", None,
        "kernel_size=3, padding=1, channels=(2, 2, 2)", '{"x": (1, 2, 2, 2)}', 0,
        ("refattn.blocks.mlpconv._stack_forward",
         "refattn.blocks.mlpconv.nin_head_forward",
         "refattn.blocks.mlpconv.nin_head_backward",
         "refattn.blocks.mlpconv._stack_backward"),
    ),
    "cbam": Case(
        "cbam", "jongchan", "reduction=2, spatial_kernel=3",
        '{"x": (1, 2, 2, 2)}', 0,
        ("refattn.blocks.cbam.channel_gate_forward",
         "refattn.blocks.cbam.spatial_gate_forward",
         "refattn.blocks.cbam.spatial_gate_backward",
         "refattn.blocks.cbam.channel_gate_backward"),
    ),
    "non_local": Case(
        "non_local", "alexhex7", "",
        '{"x": (1, 2, 2, 4)}', 9,
        ("refattn.blocks.non_local.forward", "refattn.blocks.non_local.backward"),
        input_scale=3,
    ),
    "cgnl": Case(
        "cgnl", None, "planes=2, groups=1", '{"x": (1, 2, 2, 2)}', 0,
        ("refattn.blocks.cgnl.forward", "refattn.blocks.cgnl.backward"),
    ),
    "cross_layer": Case(
        "cross_layer", None, "planes=2",
        '{"x_q": (1, 2, 2, 2), "x_kv": (1, 2, 2, 2)}', 0,
        ("refattn.blocks.cross_layer.forward", "refattn.blocks.cross_layer.backward"),
    ),
    "gc": Case(
        "gc", "mmcv", "planes=3, fusion_types=('channel_add', 'channel_mul')",
        '{"x": (1, 4, 2, 2)}', 0,
        ("refattn.blocks.gc.forward", "refattn.blocks.gc.backward"),
    ),
}


def run_case(case: Case) -> tuple[dict[str, Any], list[StepValues]]:
    """Execute the case's code under the tracer: (its namespace, the steps)."""
    functions = [resolve(name) for name in case.functions]
    namespace: dict[str, Any] = {"__name__": "__worked_example__"}
    _, records = trace_steps(functions, lambda: exec(case.code, namespace))  # noqa: S102
    spec, cfg = namespace["spec"], namespace["cfg"]
    _, cache = spec.forward(namespace["inputs"], namespace["params"],
                            namespace["state"], cfg)
    margin = spec.kink_margin(cache)
    if not margin > MIN_KINK_MARGIN:
        raise ValueError(f"worked-example {case.block}: the rounded case is "
                         f"{margin:.2g} from a kink or tie; choose another seed")
    # the first forward call only measured the output shape: keep the last
    return namespace, _last_call_of_each(records)


def _last_call_of_each(records: list[StepValues]) -> list[StepValues]:
    """Keep, for each function, the records of its last call (a call starts
    where a step number repeats)."""
    calls: dict[str, list[list[StepValues]]] = {}
    order: list[str] = []
    for record in records:
        if record.function not in calls:
            calls[record.function] = [[]]
            order.append(record.function)
        current = calls[record.function][-1]
        if any(r.number == record.number for r in current):
            calls[record.function].append([record])
        else:
            current.append(record)
    return [r for name in order for r in calls[name][-1]]


# ---------------------------------------------------------------------------
# markdown


def _array_text(name: str, value: Any) -> str:
    arr = np.asarray(value)
    body = np.array2string(arr, precision=4, suppress_small=True, max_line_width=76,
                           floatmode="maxprec")
    head = f"{name} {tuple(arr.shape)}" if arr.ndim else name
    return f"{head} =\n{textwrap.indent(body, '  ')}"


def _values_block(values: dict[str, Any]) -> list[str]:
    return ["```text", *"\n".join(_array_text(k, v) for k, v in values.items())
            .splitlines(), "```", ""]


def step_label(function: str, number: int, comment: str) -> list[str]:
    """A numbered step label that cites its code comment (checked by the
    rendered-page test)."""
    title = re.split(r"[:;]", comment, maxsplit=1)[0].strip()
    key = title.split('"')[0].rstrip()  # a prefix of the comment, quote-free
    short = function.rsplit(".", 1)[1]
    return [f"**{number}. {title}** (`{short}`)",
            f'{{: .refattn-step data-code="{function}" data-step="{key}" }}', ""]


def worked_example(name: str) -> str:
    """The markdown of the worked example ``CASES[name]``."""
    if name not in CASES:
        raise ValueError(f"worked-example: unknown case {name!r} "
                         f"(cases: {', '.join(CASES)})")
    case = CASES[name]
    ns, records = run_case(case)
    out = [
        "The case, as Python (run it to get the same numbers; every value "
        "below comes from running exactly this during the build of this page):",
        "",
        "```python",
        *case.code.rstrip().splitlines(),
        "```",
        "",
        "Inputs, parameters, running statistics and the cotangent `dout`:",
        "",
        *_values_block({f"inputs[{k!r}]": v for k, v in ns["inputs"].items()}
                       | {f"params[{k!r}]": v for k, v in ns["params"].items()}
                       | {f"state[{k!r}]": v for k, v in ns["state"].items()}
                       | {"dout": ns["dout"]}),
        "Each step below lists the arrays the code assigns under that step's "
        "comment, named as in the code.",
        "",
    ]
    for record in records:
        out += step_label(record.function, record.number, record.comment)
        out += _values_block(record.values)
    out += [
        "What `run_block` returns, to compare with the last steps:",
        "",
        *_values_block({f"outputs[{k!r}]": v for k, v in ns["outputs"].items()}
                       | {f"dinputs[{k!r}]": v for k, v in ns["dinputs"].items()}
                       | {f"dparams[{k!r}]": v for k, v in ns["dparams"].items()}),
    ]
    return "\n".join(out)


MARKER = re.compile(r"^<!--\s*worked-example:\s*(?P<name>[\w-]+)\s*-->\s*$", re.M)


def expand_markers(markdown: str) -> str:
    """Replace every worked-example marker line with its example."""
    return MARKER.sub(lambda m: worked_example(m.group("name")), markdown)
