"""What every step of corpus reading shares: the document kinds, a document and its blocks, a problem.

    >>> one_document("guides/fire_safety.txt", "", "Keep exits clear.\\n", [Block(0, 17)], {})
    ([Document(source='guides/fire_safety.txt', file='guides/fire_safety.txt', title='fire safety', \
text='Keep exits clear.\\n', blocks=[Block(start=0, end=17, level=0)], headings={})], [])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from dspy_ray.util.cli import EXIT_USAGE

TEXT_KINDS = {".txt": "txt", ".md": "md", ".markdown": "md", ".rst": "rst", ".html": "html", ".htm": "html"}
BINARY_KINDS = {".pdf": "pdf", ".docx": "docx", ".eml": "eml"}  # text extracted: page text, paragraphs, mail body
DOCUMENT_KINDS = {**TEXT_KINDS, **BINARY_KINDS}  # one file, one document
RECORD_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
KINDS = {**DOCUMENT_KINDS, **RECORD_KINDS}


class CorpusError(ValueError):
    """The corpus cannot be indexed at all (missing, empty, no usable file); the message says why."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


@dataclass(frozen=True)
class Block:
    """A paragraph or heading: ``text[start:end]`` of its document; ``level`` > 0 for a heading."""

    start: int
    end: int
    level: int = 0


@dataclass
class Document:
    source: str  # corpus-relative path, or "<file>#<record id>"
    file: str  # corpus-relative path of the file it came from
    title: str
    text: str
    blocks: list[Block]
    headings: dict[int, str] = field(default_factory=dict)  # block start -> heading text (markup removed)


@dataclass(frozen=True)
class Problem:
    where: str  # file, "file:line" or "file#record"
    reason: str
    kind: str = "file"  # file | record

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class RecordColumns:
    text: str = "text"
    title: str = "title"
    id: str = "id"


def one_document(path: str, title: str, text: str, blocks: list[Block], headings: dict[int, str], *,
                 empty: str = "no text") -> tuple[list[Document], list[Problem]]:
    """A file that is one document: without a title, its name is the title; without text, the problem ``empty``."""
    if not text.strip():
        return [], [Problem(path, empty)]
    title = title or PurePosixPath(path).stem.replace("_", " ")
    return [Document(path, path, title, text, blocks, headings)], []
