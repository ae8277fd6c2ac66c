"""Read a PDF from its text layer (pypdfium2): one document, each page a section (``page 3``).

    >>> docs, problems = read_pdf("notices/closure.pdf", "pdf", open("closure.pdf", "rb").read())  # doctest: +SKIP
    >>> docs[0].headings                                                                       # doctest: +SKIP
    {0: 'page 1', 412: 'page 2: DETOURS'}

pypdfium2 rather than pypdf: the same text on our generated PDFs, 3.5x to 18x the pages per second
(``benchmarks/pdf_readers.py``).  A PDF is never silently empty: one that needs a password, one that
is not a readable PDF, and one whose pages have no text layer (a scan without OCR) are problems that
name the file.
"""

from __future__ import annotations

from dspy_ray.corpus.documents.assemble import DocumentText
from dspy_ray.corpus.documents.base import (
    Document,
    Problem,
    RecordColumns,
    one_document,
)


def pdf_pages(raw: bytes) -> tuple[list[str], str, str | None]:
    """(text of each page, the PDF's title or "", None) or ([], "", why the file cannot be read)."""
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(raw)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            return [], "", "encrypted: the PDF needs a password to be read; decrypt it first"
        return [], "", f"not a readable PDF ({' '.join(str(exc).split())[:200]})"
    try:
        title = (doc.get_metadata_dict().get("Title") or "").strip()
        pages = []
        for i in range(len(doc)):
            page = doc[i]
            textpage = page.get_textpage()
            text = textpage.get_text_range()
            textpage.close()
            page.close()
            pages.append(text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""))
        return pages, title, None
    except pdfium.PdfiumError as exc:
        return [], "", f"not a readable PDF ({' '.join(str(exc).split())[:200]})"
    finally:
        doc.close()


def read_pdf(path: str, kind: str, raw: bytes, columns: RecordColumns | None = None
             ) -> tuple[list[Document], list[Problem]]:
    """The document of a PDF (``kind`` and ``columns`` are for the other readers), or its problem."""
    pages, title, problem = pdf_pages(raw)
    if problem:
        return [], [Problem(path, problem)]
    if not pages:
        return [], [Problem(path, "the PDF has no pages")]
    text = DocumentText()
    for number, page in enumerate(pages, 1):
        text.add_text(page, section=f"page {number}")
    if not text.text.strip():
        return [], [Problem(path, f"no text layer on any of its {len(pages)} pages (a scan? run OCR on it first)")]
    return one_document(path, title, text.text, text.blocks, text.headings)
