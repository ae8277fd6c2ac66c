"""One file's bytes to documents: the reader for its kind, chosen in one place (:data:`READERS`).

    >>> docs, problems = parse_bytes("notes/quay.txt", "txt", b"QUAY ACCESS\\n\\nThe gate opens at six.\\n")
    >>> docs[0].title, docs[0].headings, problems
    ('QUAY ACCESS', {0: 'QUAY ACCESS'}, [])

A reader is a function of (corpus-relative path, kind, bytes, record columns) to (documents,
problems): it needs no filesystem, so it can run wherever the bytes are.
"""

from __future__ import annotations

from collections.abc import Callable

from dspy_ray.corpus.documents.base import Document, Problem, RecordColumns
from dspy_ray.corpus.documents.corpus import Corpus, CorpusFile
from dspy_ray.corpus.documents.html import read_html
from dspy_ray.corpus.documents.mail import read_eml
from dspy_ray.corpus.documents.pdf import read_pdf
from dspy_ray.corpus.documents.records import read_records
from dspy_ray.corpus.documents.text import read_text
from dspy_ray.corpus.documents.word import read_docx

Reader = Callable[[str, str, bytes, RecordColumns], tuple[list[Document], list[Problem]]]

READERS: dict[str, Reader] = {"txt": read_text, "md": read_text, "rst": read_text, "html": read_html,
                              "jsonl": read_records, "csv": read_records, "parquet": read_records,
                              "pdf": read_pdf, "docx": read_docx, "eml": read_eml}


def parse_bytes(path: str, kind: str, raw: bytes, columns: RecordColumns = RecordColumns()
                ) -> tuple[list[Document], list[Problem]]:
    """The documents of one file of ``kind`` (see :data:`dspy_ray.corpus.documents.KINDS`), and the problems met."""
    if not raw.strip():
        return [], [Problem(path, "file is empty")]
    return READERS[kind](path, kind, raw, columns)


def read_file(corpus: Corpus, f: CorpusFile, data: bytes | None = None,
              columns: RecordColumns = RecordColumns()) -> tuple[list[Document], list[Problem]]:
    """The documents of one file, and the problems met (a bad file is one problem and no document)."""
    try:
        raw = corpus.read(f) if data is None else data
    except OSError as exc:
        return [], [Problem(f.path, f"cannot read ({getattr(exc, 'strerror', None) or exc})")]
    return parse_bytes(f.path, f.kind, raw, columns)
