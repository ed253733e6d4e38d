"""The generators of docs/ops.md and docs/cli.md (docs/_gen/hooks.py).

These run without mkdocs: they hold the ops' docstring contract (every
``*_forward`` has its ``*_backward``, both with ``Math:`` and ``Shapes:``)
and check that the generated pages cover every op and every CLI option.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    name = "refattn_docs_hooks"
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs/_gen/hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _public_ops() -> set[str]:
    """Op names from each ops module's __all__ (independently of the generator)."""
    from refattn import ops

    names = set()
    for info in pkgutil.iter_modules(ops.__path__):
        mod = importlib.import_module(f"refattn.ops.{info.name}")
        names |= {n[: -len("_forward")] for n in getattr(mod, "__all__", ())
                  if n.endswith("_forward")}
    return names


def test_every_op_honours_the_docstring_contract(hooks: ModuleType) -> None:
    pairs, problems = hooks.collect_ops()
    assert problems == []
    assert {p.name for p in pairs} == _public_ops()


def test_ops_page_has_a_row_and_a_section_per_op(hooks: ModuleType) -> None:
    pairs, _ = hooks.collect_ops()
    page = hooks.render_ops(pairs)
    for p in pairs:
        anchor = p.name  # other pages link to ops.md#<op>
        assert f'<a href="#{anchor}"><code>{p.name}</code></a>' in page
        assert f"### `{p.name}` {{ #{anchor} }}" in page
        assert f"`{p.name}_backward(" in page
    # the relu convention is quoted from the backward's docstring
    assert "relu&#x27;(0) = 0" in page or "relu'(0) = 0" in page


def test_docstring_parser_sections_qualifiers_and_free_text(hooks: ModuleType) -> None:
    doc = '''VJP of something.

    More words
    over two lines.

    Math (g = dout, per position):
        dx = g * 2
          continued
    Shapes:
        dx  like x
    A note after the sections.
    Convention:
        ties: the first wins.
    '''
    parsed = hooks.parse_docstring(doc)
    assert parsed.summary == "VJP of something."
    assert parsed.text == ["More words over two lines.", "A note after the sections."]
    math = parsed.sections["Math"]
    assert math.qualifier == "g = dout, per position"
    assert math.body == "dx = g * 2\n  continued"
    assert parsed.sections["Shapes"].body == "dx  like x"
    assert parsed.sections["Convention"].body == "ties: the first wins."


def test_contract_violations_are_reported(hooks: ModuleType, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "fakeops"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text(
        'def lonely_forward(x):\n    """No backward.\n\n    Math:\n        y = x\n'
        '    Shapes:\n        x  any\n    """\n\n\n'
        'def half_forward(x):\n    """Fine.\n\n    Math:\n        y = x\n'
        '    Shapes:\n        x  any\n    """\n\n\n'
        'def half_backward(dout, cache):\n    """No math here."""\n\n\n'
        'def orphan_backward(dout, cache):\n    """Math:\n        dx = dout\n    """\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    pairs, problems = hooks.collect_ops("fakeops")
    assert [p.name for p in pairs] == ["half"]
    assert "fakeops.bad.lonely_forward has no lonely_backward" in problems
    assert any("half_backward: docstring has no Math:" in p for p in problems)
    assert any("half_backward: docstring has no Shapes:" in p for p in problems)
    assert "fakeops.bad.orphan_backward has no matching _forward" in problems


def test_cli_page_covers_every_command_and_option(hooks: ModuleType) -> None:
    from refattn.cli import main

    page = hooks.render_cli()
    root = click.Context(main, info_name="refattn", **main.context_settings)
    for name, cmd in main.commands.items():
        assert f"## `refattn {name}` {{ #refattn-{name} }}" in page
        ctx = click.Context(cmd, info_name=name, parent=root)
        for param in cmd.get_params(ctx):
            if isinstance(param, click.Option):
                long = max(param.opts, key=len)
                assert f"`{long}`" in page, (name, long)
            else:
                assert f"`{param.make_metavar(ctx)}`" in page, (name, param.name)
    assert "`--debug`" in page  # the group's own options


def test_cli_page_shows_types_and_defaults(hooks: ModuleType) -> None:
    from refattn.cli import main

    page = hooks.render_cli()
    golden = page.split("## `refattn golden`")[1].split("\n## ")[0]
    dtype = main.commands["golden"].params
    opt = next(p for p in dtype if p.name == "dtype")
    choices = ", ".join(f"`{c}`" for c in opt.type.choices)
    assert f"| `--dtype` | one of {choices} | `{opt.default}` |" in golden
    assert "| `--force` | flag | off |" in golden

