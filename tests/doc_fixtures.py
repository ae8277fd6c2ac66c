"""Small PDF, DOCX and e-mail files made in the test: a hand-written PDF text layer, an image-only page,
an encrypted copy, a Word file with headings, a mail with an HTML body and an attachment.

    >>> pdf = make_pdf([["Quay Street is closed.", "Use Dock Road."], ["Second page."]])
    >>> pdf[:8]
    b'%PDF-1.4'
"""

from __future__ import annotations

import io
from email.message import EmailMessage


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str]], *, image_only: bool = False) -> bytes:
    """A PDF with one page per item, each line of text drawn in Helvetica (a real text layer);
    ``image_only``: every page only paints a grey rectangle (what a scan without OCR looks like)."""
    objects: list[bytes] = []
    n = len(pages)
    page_ids = [4 + 2 * i for i in range(n)]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for i, lines in enumerate(pages):
        if image_only:
            stream = b"0.5 g 72 300 400 400 re f"
        else:
            body = " T* ".join(f"({_escape(line)}) Tj" for line in lines)
            stream = f"BT /F1 11 Tf 14 TL 72 740 Td {body} ET".encode("latin-1")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> "
                       f">> /Contents {page_ids[i] + 1} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def encrypt_pdf(raw: bytes, password: str = "secret") -> bytes:
    """``raw`` encrypted with a user password (RC4, so no extra crypto package is needed)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(raw)))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx(title: str, sections: list[tuple[str, list[str]]], table: list[list[str]] | None = None) -> bytes:
    """A Word file: ``title`` (Title style), then per section a Heading 1 and its paragraphs; maybe a table."""
    import docx

    document = docx.Document()
    document.add_paragraph(title, style="Title")
    for heading, paragraphs in sections:
        document.add_heading(heading, level=1)
        for text in paragraphs:
            document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_eml(subject: str, body: str, *, html: str | None = None, sender: str = "Dispatch <dispatch@example.org>",
             attachments: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """An e-mail: a plain body (and an HTML alternative when given), attachments by name."""
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = subject, sender, "crew@example.org"
    msg["Date"] = "Tue, 03 Nov 2026 09:15:00 +0000"
    if body:
        msg.set_content(body)
    if html is not None:
        if body:
            msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(html, subtype="html")
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return bytes(msg)
