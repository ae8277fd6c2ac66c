"""Read a plain-text, Markdown or reStructuredText file: UTF-8 bytes in, one document out.

    >>> docs, problems = read_text("guides/hydrants.md", "md", b"# Hydrants\\n\\nKeep them clear.\\n")
    >>> docs[0].title, docs[0].blocks, problems
    ('Hydrants', [Block(start=0, end=10, level=1), Block(start=12, end=28, level=0)], [])

The document's text is the decoded file, unchanged, so passage offsets point into the file itself.
"""

from __future__ import annotations

from dspy_ray.corpus.documents.base import (
    Document,
    Problem,
    RecordColumns,
    one_document,
)
from dspy_ray.corpus.documents.blocks import first_heading, split_blocks


def decode_utf8(raw: bytes) -> tuple[str, str | None]:
    """(text, None), or ("", why not) for bytes that are not UTF-8 (a BOM is fine)."""
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return "", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); convert it to UTF-8"


def read_text(path: str, kind: str, raw: bytes, columns: RecordColumns | None = None
              ) -> tuple[list[Document], list[Problem]]:
    """The document of a txt / md / rst file (``columns`` is for record files only), or its problem."""
    text, problem = decode_utf8(raw)
    if problem:
        return [], [Problem(path, problem)]
    blocks, headings = split_blocks(text, kind)
    return one_document(path, first_heading(blocks, headings) or "", text, blocks, headings)
