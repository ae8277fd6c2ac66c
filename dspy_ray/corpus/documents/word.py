"""Read a Word file (.docx, python-docx): paragraphs and tables in order, Heading styles as sections.

    >>> docs, _ = read_docx("guides/hydrants.docx", "docx", open("hydrants.docx", "rb").read())  # doctest: +SKIP
    >>> docs[0].title, docs[0].headings                                                          # doctest: +SKIP
    ('Hydrant guide', {0: 'Hydrant guide', 15: 'Inspection'})

A table row becomes a ``cell | cell`` line.  The old binary ``.doc`` is not read (it is an unsupported kind).
"""

from __future__ import annotations

import io
import re

from dspy_ray.corpus.documents.assemble import DocumentText
from dspy_ray.corpus.documents.base import (
    Document,
    Problem,
    RecordColumns,
    one_document,
)

_HEADING_STYLE = re.compile(r"^Heading (\d)$")


def _level(style_name: str) -> int:
    """1-6 for the Title and Heading N styles, 0 for any other paragraph."""
    if style_name == "Title":
        return 1
    m = _HEADING_STYLE.match(style_name)
    return min(int(m.group(1)) + 1, 6) if m else 0


def read_docx(path: str, kind: str, raw: bytes, columns: RecordColumns | None = None
              ) -> tuple[list[Document], list[Problem]]:
    """The document of a .docx file (``kind`` and ``columns`` are for the other readers), or its problem."""
    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(raw))
        title = (document.core_properties.title or "").strip()
        text = DocumentText()
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                for row in item.rows:
                    cells = [" ".join(c.text.split()) for c in row.cells]
                    text.add(" | ".join(cells) if any(cells) else "")
                continue
            style = item.style.name if item.style is not None else ""
            level = _level(style)
            if level == 1 and style == "Title" and not title:
                title = item.text.strip()
            text.add(item.text, level=level)
    except Exception as exc:
        return [], [Problem(path, f"not a readable Word file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")]
    return one_document(path, title, text.text, text.blocks, text.headings, empty="no text (no paragraph or table)")
