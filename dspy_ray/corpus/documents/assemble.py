"""Build one document's text from pieces (a page, a paragraph, a mail header), blocks and headings kept in step.

Pieces are joined by blank lines; each piece's blocks are offsets into the joined text, so passages
cut from it point back into the document::

    >>> text = DocumentText()
    >>> text.add("Road closures", level=1)
    >>> text.add_text("Quay Street is closed.\\n\\nUse Dock Road.\\n", section="page 1")
    >>> text.text, text.headings
    ('Road closures\\n\\nQuay Street is closed.\\n\\nUse Dock Road.', {0: 'Road closures', 15: 'page 1'})
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dspy_ray.corpus.documents.base import Block
from dspy_ray.corpus.documents.blocks import split_blocks


@dataclass
class DocumentText:
    parts: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    headings: dict[int, str] = field(default_factory=dict)  # block start -> section name

    @property
    def pos(self) -> int:
        """Where the next piece starts in the joined text."""
        return sum(len(p) + 2 for p in self.parts)

    @property
    def text(self) -> str:
        return "\n\n".join(self.parts)

    def add(self, piece: str, level: int = 0, heading: str | None = None) -> None:
        """One block; ``level`` > 0 makes it a heading named ``heading`` (else its own text)."""
        piece = piece.strip("\n")
        if not piece.strip():
            return
        start = self.pos
        self.blocks.append(Block(start, start + len(piece), level))
        if level:
            self.headings[start] = " ".join((heading or piece).split())
        self.parts.append(piece)

    def add_text(self, piece: str, *, section: str | None = None) -> None:
        """Plain text split into paragraphs and headings; ``section`` names where it starts (``page 3``),
        and headings found inside it are named ``<section>: <heading>``."""
        piece = piece.strip("\n")
        if not piece.strip():
            return
        start = self.pos
        blocks, headings = split_blocks(piece, "txt")
        for i, b in enumerate(blocks):
            level = max(b.level, 1) if (section and i == 0) else b.level
            self.blocks.append(Block(start + b.start, start + b.end, level))
        for offset, title in headings.items():
            self.headings[start + offset] = f"{section}: {title}" if section else title
        if section and blocks:
            first = start + blocks[0].start
            self.headings.setdefault(first, section)
        self.parts.append(piece)
