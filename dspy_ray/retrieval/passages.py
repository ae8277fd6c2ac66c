"""What a retriever returns, and how a passage is stored in an index folder.

A passage is a chunk of one document (:mod:`pipelines.chunking` cuts them)::

    Passage(id="dispatch/priority_codes.md:2", source="dispatch/priority_codes.md",
            title="Priority Codes", section="Echo calls", text="Echo calls flash white ...",
            score=0.83, start=1804, end=2711, chunk=2)

``id`` is ``<source>:<chunk number>``, so the same corpus gives the same ids.
``source`` is the file's path relative to the corpus root (posix slashes), or
``<file>#<record id>`` for a record of a jsonl / csv / parquet file.  ``start`` /
``end`` are character offsets into the document's text: the decoded file for
.txt/.md/.rst, the visible text for HTML, the text field for a record.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import pyarrow as pa

# passages.parquet: row i is FAISS id i (and BM25 document i).
PASSAGE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("title", pa.string()),
    ("section", pa.string()),
    ("text", pa.string()),
    ("start", pa.int64()),
    ("end", pa.int64()),
    ("chunk", pa.int32()),
    ("file", pa.string()),  # the corpus file it came from (for a record: the jsonl/csv/parquet file)
    ("hash", pa.string()),  # content hash of embedding_text(): the key of the embedding store
])


@dataclass(frozen=True)
class Passage:
    """One retrieved passage; ``score`` is the mode's score (cosine, BM25, or reciprocal-rank fusion)."""

    id: str
    source: str
    title: str
    section: str
    text: str
    score: float = 0.0
    start: int = 0
    end: int = 0
    chunk: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def embedding_text(title: str, section: str, text: str) -> str:
    """What is embedded and BM25-indexed for a passage: its title and section, then its text.

    The heading line gives a chunk cut from the middle of a page the page's
    topic ("Priority Codes — Echo calls") that its own words may not repeat.
    """
    header = title if not section or section == title else (f"{title} — {section}" if title else section)
    return f"{header}\n{text}" if header else text


def embedding_texts(table: pa.Table) -> list[str]:
    """:func:`embedding_text` of every row of a table with ``title``, ``section`` and ``text`` columns."""
    return [embedding_text(t, s, x) for t, s, x in zip(table.column("title").to_pylist(),
                                                      table.column("section").to_pylist(),
                                                      table.column("text").to_pylist())]


def content_hash(text: str) -> str:
    """128-bit hex digest of an embedding input: same text, same vector, reused across runs."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
