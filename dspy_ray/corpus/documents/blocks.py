"""Paragraphs and headings of a plain-text, Markdown or reStructuredText document: one rule set per format.

A block is a span of the text; a heading keeps its text (markup removed) by its start offset::

    >>> split_blocks("Hours\\n=====\\n\\nOpen daily.\\nClosed on holidays.\\n", "rst")
    ([Block(start=0, end=11, level=1), Block(start=13, end=44, level=0)], {0: 'Hours'})
    >>> split_blocks("# Hours\\n\\n```\\n# a comment\\n```\\n", "md")[1]
    {0: 'Hours'}

:func:`split_blocks` reads the lines in order.  A line the format keeps verbatim (Markdown inside
a code fence) joins the paragraph; a blank line ends it; at any other line the format's
:meth:`BlockRules.heading` says whether a heading starts there and how many lines it takes, or
the line joins the paragraph.  Which formats have rules: :data:`RULES`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from dspy_ray.corpus.documents.base import Block

_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_UNDERLINE = re.compile(r"""^([=\-~^"'`*+#:.<>_])\1{2,}\s*$""")


class Line(NamedTuple):
    start: int
    end: int
    text: str  # without its newline


@dataclass(frozen=True)
class Heading:
    """A heading a format's rules found at a line: how many lines it takes (title, underline, overline)."""

    lines: int
    title: str
    level: int


class BlockRules:
    """A format's rules; one instance per document, since some keep state (an open fence, the levels met)."""

    def verbatim(self, line: str) -> bool:
        """Whether ``line`` joins the paragraph as it is, whatever it looks like."""
        return False

    def heading(self, lines: Sequence[Line], i: int, in_paragraph: bool) -> Heading | None:
        raise NotImplementedError


class Markdown(BlockRules):
    """``#`` headings, which may interrupt a paragraph, and ``===`` / ``---`` underlined ones; none in code fences."""

    def __init__(self):
        self.fenced = False

    def verbatim(self, line: str) -> bool:
        if _FENCE.match(line):
            self.fenced = not self.fenced
            return True
        return self.fenced

    def heading(self, lines: Sequence[Line], i: int, in_paragraph: bool) -> Heading | None:
        if m := _ATX.match(lines[i].text):
            return Heading(1, m.group(2), len(m.group(1)))
        mark = _underline_mark(lines, i, in_paragraph)
        if mark is not None and mark in "=-":
            return Heading(2, lines[i].text.strip(), 1 if mark == "=" else 2)
        return None


class RestructuredText(BlockRules):
    """Titles underlined, and maybe overlined, with one repeated punctuation mark; levels in order of first use."""

    def __init__(self):
        self.levels: list[str] = []  # underline styles in order of first use: the heading levels

    def heading(self, lines: Sequence[Line], i: int, in_paragraph: bool) -> Heading | None:
        if in_paragraph:
            return None
        line = lines[i].text
        # An overline, title, underline triple: "=====\nTitle\n=====".
        if (_UNDERLINE.match(line) and i + 2 < len(lines) and lines[i + 1].text.strip()
                and _UNDERLINE.match(lines[i + 2].text) and lines[i + 2].text.strip()[0] == line.strip()[0]):
            return Heading(3, lines[i + 1].text, self._level("over" + line.strip()[0]))
        mark = _underline_mark(lines, i, in_paragraph)
        if mark is not None:
            return Heading(2, line.strip(), self._level(mark))
        return None

    def _level(self, style: str) -> int:
        if style not in self.levels:
            self.levels.append(style)
        return self.levels.index(style) + 1


class PlainText(RestructuredText):
    """reStructuredText's titles, and stand-alone short lines: ALL CAPS (level 2), or capitalised (level 3)."""

    def heading(self, lines: Sequence[Line], i: int, in_paragraph: bool) -> Heading | None:
        found = super().heading(lines, i, in_paragraph)
        if found is not None or in_paragraph:
            return found
        has_next = i + 1 < len(lines)
        if _plain_heading(lines[i].text, lines[i + 1].text if has_next else "", has_next):
            title = lines[i].text.strip()
            return Heading(1, title, 2 if title.isupper() else 3)
        return None


RULES: dict[str, type[BlockRules]] = {"md": Markdown, "rst": RestructuredText, "txt": PlainText}


def split_blocks(text: str, kind: str) -> tuple[list[Block], dict[int, str]]:
    """Paragraph and heading blocks of a txt / md / rst text (offsets into ``text``), and the headings' text."""
    rules = RULES[kind]()
    lines = list(_lines(text))
    blocks: list[Block] = []
    headings: dict[int, str] = {}
    para: list[Line] = []

    def flush():
        if para:
            blocks.append(Block(para[0].start, para[-1].end))
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        found = None
        if rules.verbatim(line.text):
            para.append(line)
        elif not line.text.strip():
            flush()
        elif (found := rules.heading(lines, i, bool(para))) is not None:
            flush()
            blocks.append(Block(line.start, lines[i + found.lines - 1].end, max(1, found.level)))
            headings[line.start] = found.title.strip()
        else:
            para.append(line)
        i += found.lines if found is not None else 1
    flush()
    return blocks, headings


def first_heading(blocks: list[Block], headings: dict[int, str]) -> str | None:
    """The text of the first heading of the highest level (the document's title), if any."""
    top = [b for b in blocks if b.level]
    if not top:
        return None
    best = min(b.level for b in top)
    return headings[next(b.start for b in top if b.level == best)]


def _lines(text: str) -> Iterator[Line]:
    pos = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        yield Line(pos, pos + len(body), body)
        pos += len(line)


def _underline_mark(lines: Sequence[Line], i: int, in_paragraph: bool) -> str | None:
    """The mark underlining line ``i``: the next line is one mark repeated, at least as long as the title (or 3)."""
    if in_paragraph or i + 1 >= len(lines):
        return None
    title, under = lines[i].text.strip(), lines[i + 1].text
    if (not title or not _UNDERLINE.match(under) or len(under.strip()) < min(len(title), 3)
            or _UNDERLINE.match(lines[i].text)):
        return None
    return under.strip()[0]


def _plain_heading(line: str, nxt: str, has_next: bool) -> bool:
    """A stand-alone short line: ALL CAPS, or capitalised without end punctuation, followed by a blank line."""
    s = line.strip()
    if not has_next or nxt.strip() or not (2 < len(s) <= 70) or s[-1] in ".,;:!?)" or s[0] in "-*•+|([0123456789":
        return False
    letters = [c for c in s if c.isalpha()]
    if len(letters) < 3:
        return False
    return s.isupper() or (s[0].isupper() and len(s.split()) <= 8)
