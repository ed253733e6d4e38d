"""The built site read the way a reader sees it.

Every page of the ``mkdocs build --strict`` site (the ``site`` fixture) is
parsed, and its visible text and its formulas are checked with the engine the
site renders math with (``latex2mathml``, run strictly by
``docs/_gen/mathml.py``; the site draws MathML natively and loads no script):

* no TeX outside rendered math: no ``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``
  and no ``\\command`` in the visible text (code and preformatted text
  excepted);
* every ``<math>`` carries its TeX, which renders again without a TeX error
  to exactly the MathML on the page;
* every numbered step label that cites its code (``data-code`` = a function's
  dotted name, ``data-step`` = the start of one of its numbered step
  comments, resolved with ``inspect.getsource`` after importing the function)
  shows the number of that comment; on the block pages a numbered heading
  must cite its code, the headings must cover every numbered comment of each
  function they cite, and no ordered list may number steps;
* nothing is loaded from another host: no external ``src`` / ``href`` on a
  script, stylesheet, image or frame, and no ``url(http...)`` in the CSS.

Where a headless Chromium is installed (Debian's ``chromium``), the block
pages are also loaded in it with name resolution off: the same checks run on
the DOM the browser builds after the theme's scripts, and the browser's
network log must show no request of the page to another host.  Without a
browser those two tests skip; the engine checks above always run.

Each check is also shown failing on a planted defect.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import pytest

from refattn.blocks.registry import BLOCKS

ROOT = Path(__file__).resolve().parents[2]
# a block with its own page is one with a data-flow diagram (the gate and head
# sub-blocks share their parent's page)
BLOCK_PAGES = tuple(name for name, spec in BLOCKS.items() if spec.diagram)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
        "source", "track", "wbr"}
HIDDEN = {"code", "pre", "script", "style", "math", "kbd", "samp", "textarea"}
RAW_TEX = re.compile(r"\$|\\[()\[\]]|\\[A-Za-z]+")
NUMBERED = re.compile(r"^\s*(\d+)\.\s")
LOADED = {"script": "src", "img": "src", "iframe": "src", "source": "src",
          "audio": "src", "video": "src", "embed": "src", "object": "data",
          "link": "href"}


# ---------------------------------------------------------------------------
# a small DOM


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html_text: str) -> Node:
    builder = _Builder()
    builder.feed(html_text)
    builder.close()
    return builder.root


def _visible_text(node: Node, out: list[str]) -> None:
    for c in node.children:
        if isinstance(c, str):
            out.append(c)
        elif c.tag not in HIDDEN and "headerlink" not in c.attrs.get("class", ""):
            _visible_text(c, out)
        else:
            out.append(" ")


def _content(root: Node) -> Node:
    """The article of a page (without the navigation and the theme)."""
    for node in root.iter():
        if node.tag == "article":
            return node
    return root


# ---------------------------------------------------------------------------
# the checks


def raw_tex_problems(root: Node) -> list[str]:
    """TeX left in the visible text, outside rendered math and code."""
    text: list[str] = []
    _visible_text(_content(root), text)
    visible = "".join(text)
    return [f"unrendered TeX {m.group()!r} in "
            f"{visible[max(0, m.start() - 40):m.end() + 40]!r}"
            for m in RAW_TEX.finditer(visible)]


def _canonical(fragment: str) -> str:
    """A MathML fragment as a tree of (tag, sorted attributes, text), so that
    a browser's re-serialisation (``<x/>`` as ``<x></x>``, entities as
    characters) compares equal to the built page."""

    def walk(node: Node) -> str:
        attrs = " ".join(f"{k}={v!r}" for k, v in sorted(node.attrs.items())
                         if k != "xmlns")
        inner = "".join(c.strip() if isinstance(c, str) else walk(c)
                        for c in node.children)
        return f"<{node.tag} {attrs}>{inner}</{node.tag}>"

    return walk(parse(fragment))


def math_problems(page_html: str, mathml: ModuleType) -> list[str]:
    """Each <math> must carry its TeX and render from it, strictly, to exactly
    the MathML on the page."""
    problems = []
    for m in re.finditer(r"<math\b.*?</math>", page_html, re.DOTALL):
        element = m.group()
        note = re.search(r'<annotation encoding="application/x-tex">(.*?)</annotation>',
                         element, re.DOTALL)
        if note is None:
            problems.append(f"a <math> without its TeX annotation: {element[:80]!r}")
            continue
        tex = html.unescape(note.group(1))
        display = 'display="block"' in element.split(">", 1)[0]
        try:
            again = mathml.tex_to_mathml(tex, display=display)
        except mathml.TexError as err:
            problems.append(f"TeX error: {err}")
            continue
        if _canonical(again) != _canonical(element):
            problems.append(f"the MathML of {tex!r} is not what the engine renders")
    return problems


def step_problems(root: Node, worked: ModuleType, *, block_page: bool) -> list[str]:
    """Numbered step labels against the numbered comments of the code."""
    problems: list[str] = []
    covered: dict[str, set[int]] = {}
    content = _content(root)
    for node in content.iter():
        text = "".join(t for t in _label_text(node)).strip()
        cites = "data-code" in node.attrs
        is_heading = node.tag in ("h3", "h4", "h5", "h6")
        if not cites:
            if block_page and is_heading and NUMBERED.match(text):
                problems.append(f"numbered heading {text!r} cites no code "
                                "(data-code, data-step)")
            continue
        m = NUMBERED.match(text)
        if m is None:
            problems.append(f"step label {text!r} has no number")
            continue
        dotted, key = node.attrs["data-code"], node.attrs.get("data-step", "")
        try:
            fn = worked.resolve(dotted)
            want = worked.step_number(fn, key)
        except ValueError as err:
            problems.append(f"step {text!r}: {err}")
            continue
        if int(m.group(1)) != want:
            problems.append(f"step {text!r} shows {m.group(1)}, but the comment "
                            f"{key!r} of {dotted} is step {want}")
        if is_heading:
            covered.setdefault(dotted, set()).add(want)
    for dotted, numbers in covered.items():
        missing = {n for n, _, _ in worked.code_steps(worked.resolve(dotted))} - numbers
        if missing:
            problems.append(f"the steps {sorted(missing)} of {dotted} have no heading")
    if block_page:
        problems += [f"an ordered list numbers {len(n.children)} items from 1: "
                     "write steps as labels" for n in content.iter() if n.tag == "ol"]
    return problems


def _label_text(node: Node) -> Iterator[str]:
    for c in node.children:
        if isinstance(c, str):
            yield c
        elif "headerlink" not in c.attrs.get("class", ""):
            yield from _label_text(c)


def external_loads(root: Node) -> list[str]:
    """Resources the page would fetch from another host."""
    out = []
    for node in root.iter():
        attr = LOADED.get(node.tag)
        if attr is None:
            continue
        if node.tag == "link" and node.attrs.get("rel", "") in ("canonical",):
            continue
        url = node.attrs.get(attr, "")
        if re.match(r"^(https?:)?//", url):
            out.append(f"<{node.tag} {attr}={url!r}>")
    return out


def page_problems(page_html: str, mathml: ModuleType, worked: ModuleType, *,
                  block_page: bool) -> list[str]:
    root = parse(page_html)
    return (raw_tex_problems(root) + math_problems(page_html, mathml)
            + step_problems(root, worked, block_page=block_page)
            + external_loads(root))


# ---------------------------------------------------------------------------
# the site


def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if "assets" not in p.parts)


def _block_page(site: Path, name: str) -> str:
    return (site / "blocks" / name / "index.html").read_text(encoding="utf-8")


def test_every_page_renders_as_a_reader_sees_it(
    site: Path, mathml: ModuleType, worked: ModuleType
) -> None:
    problems = []
    for path in _pages(site):
        rel = path.relative_to(site).as_posix()
        block = rel.startswith("blocks/")
        for p in page_problems(path.read_text(encoding="utf-8"), mathml, worked,
                               block_page=block):
            problems.append(f"{rel}: {p}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", BLOCK_PAGES)
def test_block_page_has_steps_symbols_and_a_worked_example(
    site: Path, name: str, worked: ModuleType
) -> None:
    root = parse(_block_page(site, name))
    content = _content(root)
    headings = {n.attrs.get("id", "") for n in content.iter() if n.tag[:1] == "h"}
    assert "symbols" in headings, f"{name}: no 'Symbols' section"
    assert "worked-example" in headings, f"{name}: no 'Worked example' section"
    cited_headings = [n for n in content.iter()
                      if "data-code" in n.attrs and n.tag in ("h3", "h4", "h5")]
    assert cited_headings, f"{name}: no numbered derivation step cites its code"
    example_steps = [n for n in content.iter()
                     if "refattn-step" in n.attrs.get("class", "")]
    assert example_steps, f"{name}: the worked example has no step"
    assert not step_problems(root, worked, block_page=True)


def test_no_stylesheet_fetches_another_host(site: Path) -> None:
    bad = []
    for css in site.rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        bad += [f"{css.relative_to(site)}: {m.group()}"
                for m in re.finditer(r"@import\s+url\(\s*['\"]?(https?:)?//[^)]*\)|"
                                     r"url\(\s*['\"]?(https?:)?//[^)]*\)", text)]
    assert not bad, "\n".join(bad)


# -- the checks fail on planted defects ---------------------------------------


def _markdown_to_page(text: str, mathml: ModuleType) -> str:
    """A snippet through the site's markdown extensions and math renderer,
    inside an <article> as on a built page."""
    import markdown
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("tag:yaml.org,2002:python/",
                                  lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"),
                       Loader=_Loader)
    names, configs = [], {}
    for ext in config["markdown_extensions"]:
        if isinstance(ext, dict):
            (name, options), = ext.items()
            names.append(name)
            configs[name] = options or {}
        else:
            names.append(ext)
    body = markdown.markdown(text, extensions=names, extension_configs=configs)
    rendered, errors = mathml.render_page_math(body)
    assert not errors, errors
    return f"<html><body><article>{rendered}</article></body></html>"


def test_planted_raw_display_math_fails(site: Path, mathml: ModuleType,
                                        worked: ModuleType) -> None:
    page = _block_page(site, "cbam")
    assert not page_problems(page, mathml, worked, block_page=True)
    planted = page.replace("</article>", "<p>$$ a = \\sigma(z) $$</p></article>", 1)
    problems = page_problems(planted, mathml, worked, block_page=True)
    assert any("'$'" in p for p in problems), problems


def test_math_in_a_badly_indented_list_item_fails(mathml: ModuleType,
                                                  worked: ModuleType) -> None:
    good = _markdown_to_page(
        "* the gate:\n\n    $$ a = \\sigma(z) $$\n\n* and $x_1 = a \\odot x$.\n", mathml)
    assert not page_problems(good, mathml, worked, block_page=False)
    assert good.count("<math") == 2
    # three spaces: Python-Markdown does not see the formula as part of the item
    bad = _markdown_to_page(
        "1. the gate:\n\n   $$ a = \\sigma(z)\n   - b $$\n", mathml)
    problems = page_problems(bad, mathml, worked, block_page=False)
    assert any("unrendered TeX" in p for p in problems), problems


def test_planted_wrong_step_number_fails(site: Path, mathml: ModuleType,
                                         worked: ModuleType) -> None:
    page = _block_page(site, "cbam")
    label = re.search(r'(<h4[^>]*data-code="refattn\.blocks\.cbam\.spatial_gate_backward"'
                      r'[^>]*>)(\d+)\.', page)
    assert label is not None, "no cited h4 step for spatial_gate_backward"
    wrong = str(int(label.group(2)) + 1)
    planted = page.replace(label.group(0), f"{label.group(1)}{wrong}.", 1)
    problems = page_problems(planted, mathml, worked, block_page=True)
    assert any(f"shows {wrong}" in p for p in problems), problems


def test_planted_wrong_example_step_number_fails(site: Path, mathml: ModuleType,
                                                 worked: ModuleType) -> None:
    page = _block_page(site, "non_local")
    label = re.search(r'(<p class="refattn-step"[^>]*>\s*<strong>)(\d+)\.', page)
    assert label is not None, "no worked-example step label"
    planted = page.replace(label.group(0), f"{label.group(1)}{int(label.group(2)) + 3}.",
                           1)
    problems = page_problems(planted, mathml, worked, block_page=True)
    assert any("shows" in p for p in problems), problems


def test_uncited_numbered_heading_ordered_list_and_missing_step_fail(
    site: Path, mathml: ModuleType, worked: ModuleType
) -> None:
    page = _block_page(site, "cbam")
    planted = page.replace("</article>", "<h4>7. A step</h4><ol><li>a</li></ol>"
                                         "</article>", 1)
    problems = page_problems(planted, mathml, worked, block_page=True)
    assert any("cites no code" in p for p in problems), problems
    assert any("ordered list" in p for p in problems), problems
    # drop one cited heading: its comment is no longer covered
    label = re.search(r'<h4[^>]*data-code="refattn\.blocks\.cbam\.spatial_gate_backward"'
                      r'[^>]*data-step="gate"[^>]*>.*?</h4>', page, re.DOTALL)
    assert label is not None
    problems = page_problems(page.replace(label.group(0), "", 1), mathml, worked,
                             block_page=True)
    assert any("[5] of refattn.blocks.cbam.spatial_gate_backward have no heading" in p
               for p in problems), problems


def test_tex_errors_fail(mathml: ModuleType, worked: ModuleType) -> None:
    for tex in ("\\foo{x}", "\\frac{a}{b", "a}", "a & b", "\\operatorname*{max}",
                "x_{"):
        with pytest.raises(mathml.TexError):
            mathml.tex_to_mathml(tex, display=False)
    good = mathml.tex_to_mathml("\\frac{a}{b}", display=True)
    page = f"<html><body><article><p>{good}</p></article></body></html>"
    assert not page_problems(page, mathml, worked, block_page=False)
    broken = page.replace("\\frac{a}{b}", "\\frac{a}{b")
    assert any("TeX error" in p for p in
               page_problems(broken, mathml, worked, block_page=False))
    edited = page.replace("<mi>a</mi>", "<mi>c</mi>")
    assert any("not what the engine renders" in p for p in
               page_problems(edited, mathml, worked, block_page=False))
    stripped = re.sub(r"<annotation.*?</annotation>", "", page)
    assert any("without its TeX" in p for p in
               page_problems(stripped, mathml, worked, block_page=False))


def test_planted_external_resource_fails(site: Path, mathml: ModuleType,
                                         worked: ModuleType) -> None:
    page = (site / "index.html").read_text(encoding="utf-8")
    assert not external_loads(parse(page))
    for tag in ('<script src="https://cdn.example.org/mathjax.js"></script>',
                '<link rel="stylesheet" href="//fonts.example.org/css">',
                '<img src="http://example.org/x.png">'):
        planted = page.replace("</head>", tag + "</head>", 1)
        assert external_loads(parse(planted)), tag


# -- the same checks in a real headless browser, with the network off ---------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
BROWSER_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-extensions", "--disable-default-apps",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: network off
    "--virtual-time-budget=3000",  # let the theme's scripts run
)


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless browser installed (Debian: apt-get install chromium)")


def browse(browser: str, page: Path, tmp: Path) -> tuple[str, list[str]]:
    """The DOM a headless browser builds for `page` after running its scripts,
    and the http(s) URLs the page itself tried to load (from the browser's
    network log; the browser's own background requests are not the page's)."""
    log = tmp / f"{page.stem}-{page.parent.name}-net.json"
    proc = subprocess.run(
        [browser, *BROWSER_FLAGS, f"--log-net-log={log}", "--dump-dom",
         page.as_uri()],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    events = json.loads(log.read_text(encoding="utf-8"))
    start = {v: k for k, v in events["constants"]["logEventTypes"].items()}
    urls = []
    for event in events["events"]:
        params = event.get("params", {})
        if (start.get(event["type"]) == "URL_REQUEST_START_JOB"
                and params.get("network_isolation_key", "").startswith("file://")
                and re.match(r"^https?://", params.get("url", ""))):
            urls.append(params["url"])
    return proc.stdout, sorted(set(urls))


def test_block_pages_in_a_headless_browser_offline(
    site: Path, mathml: ModuleType, worked: ModuleType, tmp_path: Path
) -> None:
    browser = _browser()
    problems = []
    for name in BLOCK_PAGES:
        dom, urls = browse(browser, site / "blocks" / name / "index.html", tmp_path)
        assert dom.count("<math") > 5, f"{name}: the browser shows no formulas"
        problems += [f"{name}: {p}" for p in
                     page_problems(dom, mathml, worked, block_page=True)]
        problems += [f"{name}: loads {u}" for u in urls]
    assert not problems, "\n".join(problems)


def test_headless_browser_check_fails_on_planted_defects(
    site: Path, mathml: ModuleType, worked: ModuleType, tmp_path: Path
) -> None:
    browser = _browser()
    page = (site / "blocks" / "gap" / "index.html").read_text(encoding="utf-8")
    planted = site / "blocks" / "gap" / "planted.html"
    planted.write_text(
        page.replace("</head>", '<script src="https://cdn.example.org/m.js"></script>'
                     "</head>", 1)
        .replace("</article>", "<p>$$ y = \\frac{1}{L} x $$</p></article>", 1),
        encoding="utf-8")
    dom, urls = browse(browser, planted, tmp_path)
    assert urls == ["https://cdn.example.org/m.js"]
    assert any("'$'" in p for p in page_problems(dom, mathml, worked, block_page=True))
