"""Cut documents into passages: by tokens or characters, with overlap, at headings and paragraphs where it can.

A chunk is a contiguous span of the document's text, so its offsets are exact
and its text is the source's own.  From a chunk's start, the end is chosen in
the window that fits ``size``:

1. before the first heading after at least ``size // 4`` units (a section starts
   a new chunk; smaller sections are merged into the next one);
2. else, the document's end when it fits;
3. else, the last paragraph break in the window's second half;
4. else, the last sentence end there; else the window's end.

The next chunk starts ``overlap`` units before the previous end, except after
a heading break (sections do not overlap).  "Tokens" are words and punctuation
marks (``\\w+|[^\\w\\s]``): a stable, model-free count that subword tokenizers
exceed by ~1.2-1.5x, so the default 160 stays under a 256-token embedder limit.

    >>> doc = Document("a.md", "a.md", "A", "# A\\n\\nOne two. Three four.", [Block(0, 3, 1), Block(5, 24)], {0: "A"})
    >>> [(c.id, c.section, c.text) for c in chunk_document(doc, ChunkSettings(size=50, overlap=5))]
    [('a.md:0', 'A', '# A\\n\\nOne two. Three four.')]
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dspy_ray.retrieval.passages import content_hash, embedding_text
from pipelines.documents import Block, Document  # noqa: F401 - Block is used in the docstring's example

TOKEN = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
HEADING, PARAGRAPH, SENTENCE = 3, 2, 1


class ChunkSettings(BaseModel):
    """How documents are cut; part of the index manifest (a change means every passage changes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit: str = Field("tokens", pattern="^(tokens|chars)$", description="what size and overlap count")
    size: int = Field(160, ge=8, description="largest passage, in units")
    overlap: int = Field(32, ge=0, description="units repeated from the previous passage")

    @model_validator(mode="after")
    def _overlap_below_half(self) -> ChunkSettings:
        if self.overlap * 2 > self.size:
            raise ValueError(f"overlap ({self.overlap}) must be at most half the size ({self.size})")
        return self


@dataclass(frozen=True)
class Chunk:
    id: str
    source: str
    file: str
    title: str
    section: str
    text: str
    start: int
    end: int
    chunk: int

    @property
    def embedding_text(self) -> str:
        return embedding_text(self.title, self.section, self.text)

    @property
    def hash(self) -> str:
        return content_hash(self.embedding_text)


def chunk_document(doc: Document, settings: ChunkSettings) -> list[Chunk]:
    """The document's passages, numbered from 0 (ids ``<source>:<n>``)."""
    spans = [(m.start(), m.end()) for m in TOKEN.finditer(doc.text)]
    if not spans:
        return []
    starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((e for _, e in spans), dtype=np.int64, count=len(spans))
    n = len(spans)
    priority = np.zeros(n + 1, dtype=np.int8)
    for block in doc.blocks:
        i = int(np.searchsorted(starts, block.start))
        priority[i] = max(priority[i], HEADING if block.level else PARAGRAPH)
    for m in _SENTENCE_END.finditer(doc.text):
        i = int(np.searchsorted(starts, m.end()))
        priority[i] = max(priority[i], SENTENCE)
    priority[0] = 0
    heading_starts = sorted(doc.headings)
    chars = settings.unit == "chars"

    def fits(i: int, units: int) -> int:
        """Largest j (exclusive) with tokens i..j-1 within ``units``; at least i + 1."""
        if chars:
            j = int(np.searchsorted(ends, starts[i] + units, side="right"))
        else:
            j = i + units
        return max(i + 1, min(j, n))

    def back(j: int, units: int) -> int:
        """Smallest i with tokens i..j-1 within ``units``."""
        if chars:
            return int(np.searchsorted(starts, ends[j - 1] - units, side="left"))
        return j - units

    chunks: list[Chunk] = []
    i = 0
    min_fill = settings.size // 4
    while i < n:
        j_max = fits(i, settings.size)
        lo = fits(i, min_fill) if min_fill else i + 1
        window = priority[lo + 1:j_max + 1] if lo < j_max else priority[0:0]
        heads = np.flatnonzero(window >= HEADING)
        if len(heads):
            j = lo + 1 + int(heads[0])
        elif j_max == n:
            j = n
        else:
            half = fits(i, settings.size // 2)
            tail = priority[half + 1:j_max + 1]
            j = j_max
            for level in (PARAGRAPH, SENTENCE):
                hits = np.flatnonzero(tail >= level)
                if len(hits):
                    j = half + 1 + int(hits[-1])
                    break
        start, end = int(starts[i]), int(ends[j - 1])
        section_at = bisect.bisect_right(heading_starts, start) - 1
        section = doc.headings[heading_starts[section_at]] if section_at >= 0 else ""
        chunks.append(Chunk(f"{doc.source}:{len(chunks)}", doc.source, doc.file, doc.title, section,
                            doc.text[start:end], start, end, len(chunks)))
        if j >= n:
            break
        i = j if priority[j] >= HEADING or not settings.overlap else max(i + 1, back(j, settings.overlap))
    return chunks
