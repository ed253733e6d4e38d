"""TeX to MathML at build time, strictly: the site loads no script to draw math.

``pymdownx.arithmatex`` (generic mode) finds the formulas of a page, ``$...$``
inline and ``$$...$$`` on lines of their own, and wraps their TeX in
``<span class="arithmatex">\\(...\\)</span>`` or
``<div class="arithmatex">\\[...\\]</div>``.  ``render_page_math`` (called by
the ``on_page_content`` hook) replaces each wrapper with MathML from the pure
Python converter ``latex2mathml``, which every current browser draws natively.

Each ``<math>`` keeps its TeX source in
``<semantics>...<annotation encoding="application/x-tex">TeX</annotation>``,
so the built page can be checked again with the same engine
(``tests/docs/test_rendered.py``) and a reader can copy the TeX.

The converter is lenient (an unknown command comes out as the text
``\\foo``); ``tex_to_mathml`` is not: it raises ``TexError`` on unbalanced
braces, on a control character (a ``\\t`` or ``\\b`` that became a tab or
a backspace), on a command the converter does not know, on an alignment ``&``
outside an environment it supports, and on an empty operator.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

from latex2mathml.converter import convert

TEX_ANNOTATION = "application/x-tex"

# what arithmatex (generic mode) writes around the TeX of a formula
_WRAPPED = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*'
    r"(?P<open>\\\(|\\\[)(?P<tex>.*?)(?P<close>\\\)|\\\])\s*</(?P=tag)>",
    re.DOTALL,
)
# commands latex2mathml accepts but renders wrongly
_REFUSED = ("\\operatorname*",)


class TexError(ValueError):
    """A formula the converter cannot render faithfully."""


class _MathText(HTMLParser):
    """The text content of a MathML fragment and its empty ``<mo>`` elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.empty_mo = 0
        self._in_annotation = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_annotation = tag == "annotation"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "mo":
            self.empty_mo += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_annotation = False

    def handle_data(self, data: str) -> None:
        if not self._in_annotation:
            self.text.append(data)


def _check_braces(tex: str) -> None:
    depth = 0
    for m in re.finditer(r"\\.|[{}]", tex):
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth < 0:
                raise TexError(f"unbalanced braces: a '}}' without '{{' in {tex!r}")
    if depth:
        raise TexError(f"unbalanced braces: {depth} '{{' never closed in {tex!r}")


def check_mathml(mathml: str, tex: str) -> None:
    """Raise TexError if the converter's output shows a TeX error."""
    parser = _MathText()
    parser.feed(mathml)
    text = "".join(parser.text)
    if "\\" in text:
        command = re.search(r"\\[A-Za-z]+|\\.", text)
        raise TexError(f"unknown TeX command {command.group() if command else '?'} "
                       f"in {tex!r}")
    if "&" in text:
        raise TexError(f"an alignment '&' outside a supported environment in {tex!r}")
    if parser.empty_mo:
        raise TexError(f"an empty operator (unsupported construct) in {tex!r}")
    if "<merror" in mathml:
        raise TexError(f"the converter reported an error in {tex!r}")


def tex_to_mathml(tex: str, *, display: bool) -> str:
    """``<math>`` for one formula, with its TeX as an annotation.

    Raises:
        TexError: on unbalanced braces, an unknown or refused command, an
            alignment outside an environment, or a converter exception.
    """
    tex = tex.strip()
    if not tex:
        raise TexError("an empty formula")
    control = re.search(r"[\x00-\x09\x0b-\x1f\x7f]", tex)
    if control:  # "\theta" written through a string that turned "\t" into a tab
        raise TexError(f"a control character {control.group()!r} in {tex!r}")
    for command in _REFUSED:
        if command in tex:
            raise TexError(f"{command} renders wrongly; use another form in {tex!r}")
    _check_braces(tex)
    try:
        out = convert(tex, display="block" if display else "inline")
    except Exception as err:  # noqa: BLE001 - every converter failure is a TeX error
        raise TexError(f"{type(err).__name__} {err} in {tex!r}".strip()) from None
    check_mathml(out, tex)
    head, sep, rest = out.partition(">")
    body = rest.removesuffix("</math>")
    if not sep or body == rest:
        raise TexError(f"unexpected converter output for {tex!r}: {out[:80]!r}")
    annotation = (f'<annotation encoding="{TEX_ANNOTATION}">'
                  f"{html.escape(tex, quote=False)}</annotation>")
    return f"{head}><semantics><mrow>{body}</mrow>{annotation}</semantics></math>"


def render_page_math(page_html: str) -> tuple[str, list[str]]:
    """Replace every arithmatex wrapper with MathML.

    Returns the new HTML and the TeX errors found (the formula is then left
    as its TeX, and the caller reports the error).
    """
    errors: list[str] = []

    def replace(m: re.Match[str]) -> str:
        display = m.group("open") == "\\["
        tex = html.unescape(m.group("tex"))
        try:
            math = tex_to_mathml(tex, display=display)
        except TexError as err:
            errors.append(str(err))
            return m.group()
        if display:
            return f'<div class="refattn-math">{math}</div>'
        return math

    return _WRAPPED.sub(replace, page_html), errors
