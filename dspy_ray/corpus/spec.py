"""What a corpus read is asked for (:class:`InputSpec`), the error a bad corpus raises, and the input formats."""

from __future__ import annotations

from dataclasses import dataclass

from dspy_ray.corpus.documents.base import DOCUMENT_KINDS
from dspy_ray.util.cli import EXIT_USAGE

TABLE_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
DOCUMENTS = "documents"  # the format of a folder of documents (any of DOCUMENT_KINDS, mixed): one row per file
SUPPORTED = sorted({*TABLE_FORMATS, *DOCUMENT_KINDS})
ID, ERRORS = "id", "errors"


class InputError(ValueError):
    """Bad input found before any LM call; the message names the file (and line) and what to do."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


@dataclass(frozen=True)
class InputSpec:
    """A corpus: a file, a folder or an object-store URI, and how its rows are read.

    >>> InputSpec("calls/", text_column="transcript").id_column
    'id'
    """

    path: str
    text_column: str = "text"
    id_column: str = "id"
    limit: int | None = None
    max_chars: int = 20_000  # longer texts are truncated, and the row's errors say so


def one_line(exc: BaseException, limit: int = 300) -> str:
    return " ".join(str(exc).split())[:limit]
