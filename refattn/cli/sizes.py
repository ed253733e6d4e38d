"""Size checks of ``refattn golden`` and ``refattn gradcheck``, made before
any case is drawn: what will not fit is refused (exit 2) with a message
naming the option that asked for it, instead of a kernel OOM kill, minutes
of hopeless redraws, or a raw NumPy message.

* ``check_requests``: a default input shape that a ``--set`` value blew up
  (``--set reduction=100000`` makes CBAM's default input 200,000 channels
  wide) is refused, naming the ``--set`` key; and a case whose estimated
  peak memory (``golden.resources.case_bytes``) exceeds the memory
  available to this process, cgroup and rlimits included
  (``golden.resources.available_bytes``), is refused, naming the largest
  tensor and the option it comes from.
* ``full_mode_cost``: the number of evaluations ``gradcheck --mode full``
  makes and its estimated time, refused above ``--max-evals``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from refattn.cli.common import BadInput
from refattn.golden.files import shown
from refattn.golden.resources import Available, available_bytes, case_bytes, gib

DEFAULT_SHAPE_ELEMENTS = 100_000
"""The most input elements a block's default fixture shapes may reach when a
--set value scales them (the presets' own defaults hold at most ~1,000)."""

DEFAULT_MAX_EVALS = 20_000
"""``gradcheck --mode full`` refuses more evaluations unless --max-evals says so."""


def check_requests(requests: Iterable[tuple[Any, Any]], *,
                   available: Available | None = None) -> None:
    """Refuse the first request that cannot be generated here (see the module
    docstring); `available` overrides the measured memory (tests)."""
    from refattn.golden.generate import case_shapes

    memory = available if available is not None else available_bytes()
    for req, cfg in requests:
        _check_default_shapes(req, cfg)
        shapes, _, params = case_shapes(req, cfg)
        need = case_bytes(req.block, shapes, params)
        if memory is not None and need > memory.bytes:
            raise BadInput(
                f"{req.block}: the case needs about {gib(need)} of memory (largest "
                f"tensor: {_largest(req, shapes, params)}), but about "
                f"{gib(memory.bytes)} is available ({memory.source}); "
                f"{_hint(req)}")


def _elements(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _check_default_shapes(req: Any, cfg: Any) -> None:
    """A default shape grown past ``DEFAULT_SHAPE_ELEMENTS`` by --set values."""
    from refattn.blocks.registry import BLOCKS

    spec = BLOCKS[req.block]
    given = {k.split(".")[0] for k in (req.shapes or {})}
    defaults = {k: tuple(s) for k, s in spec.fixture_shapes(cfg).items()
                if k.split(".")[0] not in given}
    if _elements(defaults) <= DEFAULT_SHAPE_ELEMENTS or not req.overrides:
        return
    baseline = _elements(spec.fixture_shapes(spec.config(req.preset)))
    culprits = [f"{k}={shown(v)}" for k, v in req.overrides.items()
                if _grows(spec, req.preset, k, v, baseline)]
    named = ", ".join(culprits or [f"{k}={shown(v)}" for k, v in req.overrides.items()])
    grown = ", ".join(f"{k}={shown(list(s))}" for k, s in defaults.items())
    raise BadInput(
        f"--set {named}: {req.block}'s default input shape grows with it to {grown} "
        f"({_elements(defaults):,} elements; a default fixture shape holds at most "
        f"{DEFAULT_SHAPE_ELEMENTS:,}, and drawing such a case cannot keep its margin "
        "from every kink); give the shape with --shape, or a smaller value")


def _grows(spec: Any, preset: str | None, key: str, value: Any, baseline: int) -> bool:
    try:
        alone = spec.fixture_shapes(spec.config(preset, **{key: value}))
    except (TypeError, ValueError):
        return False
    return _elements(alone) > baseline


def _largest(req: Any, shapes: Mapping[str, tuple[int, ...]],
             params: Mapping[str, tuple[int, ...]]) -> str:
    sized = [(math.prod(s), f"input {k} {shown(list(s))}") for k, s in shapes.items()]
    sized += [(math.prod(s), f"parameter {k} {shown(list(s))}") for k, s in params.items()]
    n, what = max(sized)
    given = {k.split(".")[0] for k in (req.shapes or {})}
    source = ""
    if what.startswith("input "):
        name = what.split()[1]
        source = (" from --shape" if name.split(".")[0] in given
                  else " by default" + (" for the --set values" if req.overrides else ""))
    elif req.overrides:
        source = " from the --set values"
    return f"{what}{source}, {n:,} elements"


def _hint(req: Any) -> str:
    if req.shapes and req.overrides:
        return "use smaller --shape or --set values"
    if req.shapes:
        return "use smaller --shape values"
    if req.overrides:
        return "use smaller --set values, or give a small --shape"
    return "give smaller --shape values"


def full_mode_cost(spec: Any, cfg: Any, inputs: Mapping[str, Any],
                   params: Mapping[str, Any], state: Mapping[str, Any]
                   ) -> tuple[int, int, float]:
    """(evaluations, elements, estimated seconds) of ``gradcheck --mode full``:
    two forward evaluations per element of every input and trainable
    parameter, plus one at the point; timed from one forward here."""
    from refattn.params import is_buffer

    elements = sum(int(v.size) for v in inputs.values())
    elements += sum(int(v.size) for k, v in params.items() if not is_buffer(k))
    start = time.perf_counter()
    spec.forward(inputs, params, state, cfg)
    seconds = time.perf_counter() - start
    evaluations = 2 * elements + 1
    return evaluations, elements, evaluations * seconds


def check_full_mode(case: str, cost: tuple[int, int, float], max_evals: int) -> str:
    """The cost statement of a full-mode check, or ``BadInput`` above the limit."""
    evaluations, elements, seconds = cost
    statement = (f"{evaluations:,} evaluations (2 per element of {elements:,} "
                 f"elements, and 1), about {_duration(seconds)}")
    if evaluations > max_evals:
        raise BadInput(
            f"--mode full: {case} needs {statement}, more than --max-evals "
            f"{max_evals:,}; raise --max-evals to run it, or use --mode fast")
    return f"gradcheck --mode full: {case}: {statement}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"
