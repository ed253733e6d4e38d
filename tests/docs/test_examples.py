"""Every example in the documentation runs, so the docs cannot rot.

Collected from ``README.md`` and ``docs/**/*.md`` (not ``docs/_gen``):

* every fenced ``python`` (or ``py``) block;
* every fenced ``bash`` / ``sh`` / ``shell`` / ``console`` block in which a
  command starts with ``refattn`` (after optional ``VAR=value`` assignments).
  All commands of such a block must then start with ``refattn``: a block that
  mixes in other commands fails and must be split or marked ``skip``.

Each page runs top to bottom in a fresh temporary working directory of its
own: its python blocks share one namespace, in page order, and its bash
blocks run there too (so a page can write a fixture with ``refattn golden``
and read it in the next python block).  The repository's committed
``golden/`` fixture set, when present, is visible there as ``./golden``
(a link: examples read it, never write into it).  Bash commands run one by one through
``bash`` as a user would type them, with the environment's ``refattn`` first
on ``PATH``; each must exit 0.

Directives are HTML comments on the line(s) right above a fence (blank lines
allowed in between); they do not show on the rendered page:

``<!-- skip: reason -->``
    Never run this block (pseudo-code, a fragment, needs a GPU...).
``<!-- exit: N -->``
    The last command of this bash block must exit with status N (the
    others with 0).
``<!-- raises: ValueError -->``
    This python block must raise that exception (or a subclass).
``<!-- requires: torch, matplotlib -->``
    Skip unless these modules are importable; a module ``m`` is required
    (a failure, not a skip) when ``REFATTN_REQUIRE_<M>=1``, as CI sets for
    torch, jax, flax and keras.
``<!-- slow -->``
    Mark the example ``slow`` (``-m "not slow"`` deselects it; it still runs
    when a later example of its page needs the page's state).

Several directives can share one comment, separated by ``;``.  Blocks in
other languages (``text``, ``json``, ``pycon``...) are never run.  The
convention is documented for writers in docs/getting-started.md.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session"}
DIRECTIVES = {"skip", "exit", "raises", "requires", "slow"}
COMMAND_TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_COMMENT = re.compile(r"^\s*<!--(?P<body>.*?)-->\s*$")
_ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


# ---------------------------------------------------------------------------
# collection


class DirectiveError(ValueError):
    """A malformed directive comment (reported as a failing example)."""


@dataclass
class Example:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the first line of code in the page
    lang: str  # "python" or "bash"
    code: str
    directives: dict[str, str] = field(default_factory=dict)
    error: str = ""  # a problem found while collecting, reported by the test

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.lang}"


def _parse_directives(comments: list[str]) -> tuple[dict[str, str], str]:
    out: dict[str, str] = {}
    for body in comments:
        for item in body.split(";"):
            item = item.strip()
            if not item:
                continue
            key, _, value = item.partition(":")
            key = key.strip().lower()
            if key not in DIRECTIVES:
                # an ordinary HTML comment, not a directive: ignore it whole
                break
            out[key] = value.strip()
    if "exit" in out and not re.fullmatch(r"\d+", out["exit"]):
        return out, f"<!-- exit: {out['exit']} -->: expected an integer exit status"
    if "skip" in out and not out["skip"]:
        return out, "<!-- skip: -->: give the reason the block is not run"
    return out, ""


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: ``$ `` prompts stripped (then lines
    without a prompt are output), backslash continuations joined, comment
    lines and blank lines dropped.  Trailing ``# comments`` are left to bash."""
    lines = code.splitlines()
    prompted = any(line.lstrip().startswith("$ ") for line in lines)
    commands: list[str] = []
    pending = ""
    for raw in lines:
        line = raw.rstrip()
        if prompted and not pending:
            if not line.lstrip().startswith("$ "):
                continue  # output shown after a prompt
            line = line.lstrip()[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    if pending.strip():
        commands.append(pending.strip())
    return commands


def program_of(command: str) -> str:
    """The program a command runs, after leading VAR=value assignments."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return ""
    while words and _ENV_ASSIGN.match(words[0]):
        words.pop(0)
    return words[0] if words else ""


def collect_page(text: str, page: str) -> list[Example]:
    """The runnable examples of one markdown page, in order."""
    lines = text.splitlines()
    examples: list[Example] = []
    comments: list[str] = []  # directive candidates above the next fence
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if not m:
            c = _COMMENT.match(line)
            if c:
                comments.append(c.group("body"))
            elif line.strip():
                comments = []
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        info = m.group("info").strip()
        lang = info.split()[0].strip("{}.").lower() if info else ""
        body: list[str] = []
        j = i + 1
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        while j < len(lines) and not close.match(lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent)
                        else lines[j].lstrip())
            j += 1
        directives, error = _parse_directives(comments)
        comments = []
        code = textwrap.dedent("\n".join(body))
        if lang in PYTHON_LANGS:
            examples.append(Example(page, i + 2, "python", code, directives, error))
        elif lang in SHELL_LANGS:
            cmds = shell_commands(code)
            progs = [program_of(c) for c in cmds]
            if "refattn" in progs:
                others = [c for c, p in zip(cmds, progs) if p != "refattn"]
                if others and not error and "skip" not in directives:
                    error = (
                        f"this shell block runs refattn but also {others[0]!r}: "
                        "split it, or mark it <!-- skip: reason -->"
                    )
                examples.append(Example(page, i + 2, "bash", code, directives, error))
        i = j + 1
    return examples


def doc_pages(root: Path = ROOT) -> list[Path]:
    pages = [root / "README.md"] if (root / "README.md").exists() else []
    docs = root / "docs"
    if docs.is_dir():
        pages += sorted(p for p in docs.rglob("*.md")
                        if "_gen" not in p.relative_to(docs).parts)
    return pages


def collect_all(root: Path = ROOT) -> list[Example]:
    out: list[Example] = []
    for path in doc_pages(root):
        rel = path.relative_to(root).as_posix()
        out += collect_page(path.read_text(encoding="utf-8"), rel)
    return out


# ---------------------------------------------------------------------------
# running


class ExampleFailed(AssertionError):
    pass


def _missing_modules(ex: Example) -> list[str]:
    wanted = ex.directives.get("requires", "").split(",")
    names = [n.strip() for n in wanted if n.strip()]
    return [n for n in names if not _importable(n)]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent of a dotted name is missing
        return False


def required_but_missing(missing: list[str]) -> list[str]:
    """The ``REFATTN_REQUIRE_<M>`` variables set to 1 for missing modules ``m``
    (a dotted name is required through its top-level package)."""
    names = [f"REFATTN_REQUIRE_{m.split('.')[0].upper()}" for m in missing]
    return [n for n in names if os.environ.get(n) == "1"]


def _refattn_command_env() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("COLUMNS", "100")
    return env


def run_shell(ex: Example, cwd: Path) -> None:
    cmds = shell_commands(ex.code)
    want_last = int(ex.directives.get("exit", "0"))
    env = _refattn_command_env()
    for k, cmd in enumerate(cmds):
        want = want_last if k == len(cmds) - 1 else 0
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, env=env, check=False,
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        )
        if proc.returncode != want:
            raise ExampleFailed(
                f"{ex.page}:{ex.line}: `{cmd}` exited {proc.returncode}, expected "
                f"{want}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n"
                f"{proc.stderr[-4000:]}"
            )


def run_python(ex: Example, namespace: dict, cwd: Path) -> None:
    # pad so that tracebacks and linecache point at the markdown file's lines
    source = "\n" * (ex.line - 1) + ex.code
    code = compile(source, str(ROOT / ex.page), "exec")
    expected = ex.directives.get("raises")
    old = Path.cwd()
    os.chdir(cwd)
    try:
        exec(code, namespace)  # noqa: S102 - running the docs is the point
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - SystemExit too, with its traceback
        if expected and any(c.__name__ == expected for c in type(err).__mro__):
            return
        raise ExampleFailed(
            f"{ex.page}:{ex.line}: the python example raised\n"
            + "".join(traceback.format_exception(err))
        ) from None
    finally:
        os.chdir(old)
    if expected:
        raise ExampleFailed(f"{ex.page}:{ex.line}: expected {expected} to be raised")


@dataclass
class PageRun:
    """The state a page's examples share while they run in order."""

    cwd: Path
    namespace: dict = field(default_factory=dict)
    done: int = 0  # how many of the page's examples have been run or skipped
    failed_at: int | None = None  # line of the first failed example


def run_example(examples: list[Example], index: int, state: PageRun) -> None:
    """Run the page's examples up to ``index`` (earlier ones first, once)."""
    while state.done <= index:
        k = state.done
        ex = examples[k]
        state.done += 1
        if state.failed_at is not None:
            if k == index:
                pytest.skip(f"not run: the example at line {state.failed_at} of "
                            f"{ex.page} failed")
            continue
        if "skip" in ex.directives:
            if k == index:
                pytest.skip(ex.directives["skip"])
            continue
        missing = _missing_modules(ex)
        if missing:
            required = required_but_missing(missing)
            if required:
                state.failed_at = ex.line
                pytest.fail(f"{required[0]}=1 but {required[0][16:].lower()} is not "
                            "importable")
            if k == index:
                pytest.skip(f"needs {', '.join(missing)}")
            continue
        try:
            if ex.error:
                raise ExampleFailed(f"{ex.page}:{ex.line}: {ex.error}")
            if ex.lang == "python":
                run_python(ex, state.namespace, state.cwd)
            else:
                run_shell(ex, state.cwd)
        except (Exception, pytest.fail.Exception):
            state.failed_at = ex.line
            if k == index:
                raise
            pytest.skip(f"not run: the example at line {ex.line} of {ex.page} failed")


# ---------------------------------------------------------------------------
# the tests

EXAMPLES = collect_all()
BY_PAGE: dict[str, list[Example]] = {}
for _ex in EXAMPLES:
    BY_PAGE.setdefault(_ex.page, []).append(_ex)


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PageRun]:
    runs: dict[str, PageRun] = {}
    for page in BY_PAGE:
        name = re.sub(r"[^A-Za-z0-9]+", "-", page).strip("-")
        cwd = tmp_path_factory.mktemp(f"docs-{name}")
        if (ROOT / "golden").is_dir():
            (cwd / "golden").symlink_to(ROOT / "golden", target_is_directory=True)
        runs[page] = PageRun(cwd, {"__name__": "__docs_example__"})
    return runs


@pytest.mark.parametrize(
    "example",
    [pytest.param(e, id=e.id, marks=[pytest.mark.slow] if "slow" in e.directives
                  else []) for e in EXAMPLES],
)
def test_doc_example(example: Example, page_runs: dict[str, PageRun]) -> None:
    examples = BY_PAGE[example.page]
    run_example(examples, examples.index(example), page_runs[example.page])


def test_examples_were_found() -> None:
    # the README's tour and the getting-started page must always be covered
    pages = set(BY_PAGE)
    assert "README.md" in pages
    assert "docs/getting-started.md" in pages
    assert any(e.lang == "bash" for e in EXAMPLES)


# -- the collector and runner themselves ------------------------------------

SAMPLE = '''\
# A page

```python
x = 1
```

<!-- skip: pseudo-code -->

```python
this is not python
```

!!! note

    ```python
    y = x + 1
    ```

<!-- a plain comment, not a directive -->
```bash
refattn list  # trailing comment
refattn --version \\
    --help
```

```bash
pip install refattn
```

<!-- exit: 2 ; requires: numpy -->
```console
$ refattn golden --block nope
Error: block: unknown block 'nope'
```

```bash
refattn list && ls
refattn list
cd /tmp
```

```text
refattn list
```
'''


def test_collector_finds_blocks_directives_and_lines() -> None:
    got = collect_page(SAMPLE, "sample.md")
    assert [(e.line, e.lang) for e in got] == [
        (4, "python"), (10, "python"), (16, "python"), (21, "bash"), (32, "bash"),
        (37, "bash"),
    ]
    assert got[0].code == "x = 1"
    assert got[1].directives == {"skip": "pseudo-code"}
    assert got[2].code == "y = x + 1"  # dedented out of the admonition
    assert got[3].directives == {}
    assert shell_commands(got[3].code) == [
        "refattn list  # trailing comment", "refattn --version      --help"
    ]
    assert got[4].directives == {"exit": "2", "requires": "numpy"}
    assert shell_commands(got[4].code) == ["refattn golden --block nope"]
    assert got[5].error.startswith("this shell block runs refattn but also 'cd /tmp'")
    assert all(not e.error for e in got[:5])


def test_bad_directive_is_an_error() -> None:
    (ex,) = collect_page("<!-- exit: one -->\n```bash\nrefattn list\n```\n", "p.md")
    assert "expected an integer" in ex.error
    (ex,) = collect_page("<!-- skip: -->\n```python\npass\n```\n", "p.md")
    assert "give the reason" in ex.error
    (ex,) = collect_page("<!-- slow -->\n```python\npass\n```\n", "p.md")
    assert ex.directives == {"slow": ""} and not ex.error


def test_directives_only_bind_to_the_next_fence() -> None:
    text = "<!-- skip: x -->\n\nSome prose.\n\n```python\npass\n```\n"
    (ex,) = collect_page(text, "p.md")
    assert ex.directives == {}


def test_runner_shares_state_in_order_and_reports_failures(tmp_path: Path) -> None:
    page = [
        Example("p.md", 2, "python", "a = 2"),
        Example("p.md", 6, "python", "assert a == 2\nb = a + 1"),
        Example("p.md", 10, "python", "raise KeyError('k')", {"raises": "LookupError"}),
        Example("p.md", 14, "python", "assert b == 4, 'wrong b'"),
        Example("p.md", 18, "python", "c = 1"),
    ]
    state = PageRun(tmp_path, {})
    run_example(page, 2, state)  # runs examples 0..2; 2 raises as announced
    assert state.namespace["b"] == 3
    with pytest.raises(ExampleFailed, match="(?s)p.md:14.*wrong b"):
        run_example(page, 3, state)
    with pytest.raises(pytest.skip.Exception, match="line 14"):
        run_example(page, 4, state)  # after a failure, later examples skip


def test_shell_runner_checks_exit_status(tmp_path: Path) -> None:
    ok = Example("p.md", 2, "bash", "refattn --version")
    run_shell(ok, tmp_path)
    bad_usage = Example("p.md", 2, "bash", "refattn list\nrefattn golden --seed -3")
    with pytest.raises(ExampleFailed, match="exited 2, expected 0"):
        run_shell(bad_usage, tmp_path)
    bad_usage.directives["exit"] = "2"
    run_shell(bad_usage, tmp_path)


def test_required_modules_cannot_skip(tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFATTN_REQUIRE_NO_SUCH_MODULE_X", "1")
    monkeypatch.delenv("REFATTN_REQUIRE_NO_SUCH_MODULE_Y", raising=False)
    assert required_but_missing(["no_such_module_x.sub", "no_such_module_y"]) == [
        "REFATTN_REQUIRE_NO_SUCH_MODULE_X"]
    page = [Example("p.md", 2, "python", "pass", {"requires": "no_such_module_y"}),
            Example("p.md", 6, "python", "pass", {"requires": "no_such_module_x"})]
    state = PageRun(tmp_path, {})
    with pytest.raises(pytest.skip.Exception, match="needs no_such_module_y"):
        run_example(page, 0, state)
    with pytest.raises(pytest.fail.Exception,
                       match="REFATTN_REQUIRE_NO_SUCH_MODULE_X=1 but no_such_module_x"):
        run_example(page, 1, state)


def test_python_runner_tracebacks_point_at_the_page(tmp_path: Path) -> None:
    ex = Example("docs/getting-started.md", 40, "python", "x = 1\n1 / 0")
    with pytest.raises(ExampleFailed) as info:
        run_python(ex, {}, tmp_path)
    assert f'"{ROOT / "docs/getting-started.md"}", line 41' in str(info.value)
    assert "ZeroDivisionError" in str(info.value)
