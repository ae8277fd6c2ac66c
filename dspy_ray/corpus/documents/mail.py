"""Read an e-mail (.eml, the standard library): subject, sender, recipients and date, the plain body (else the
HTML one, as text), and the attachments listed by name, type and size (their content is not read).

    >>> docs, _ = read_eml("inbox/closure.eml", "eml", open("closure.eml", "rb").read())  # doctest: +SKIP
    >>> print(docs[0].text)                                                                # doctest: +SKIP
    Subject: Quay Street closed
    From: Dispatch <dispatch@example.org>
    ...

The header lines are the first section (named by the subject), so a passage cites the mail it came from.
"""

from __future__ import annotations

import email
import email.policy

from dspy_ray.corpus.documents.assemble import DocumentText
from dspy_ray.corpus.documents.base import (
    Document,
    Problem,
    RecordColumns,
    one_document,
)
from dspy_ray.corpus.documents.html import html_document


def _part_text(part) -> str:
    """A text part's content; an unknown charset is decoded as UTF-8 with bad bytes replaced."""
    try:
        return part.get_content()
    except (LookupError, UnicodeDecodeError):
        return (part.get_payload(decode=True) or b"").decode("utf-8", errors="replace")


def _body(msg) -> str:
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    content = _part_text(part)
    if part.get_content_subtype() == "html":
        return html_document(content)[1]
    return content.replace("\r\n", "\n")


def _attachments(msg) -> list[str]:
    found = []
    for part in msg.iter_attachments():
        size = len(part.get_payload(decode=True) or b"")
        found.append(f"{part.get_filename() or '(unnamed)'} ({part.get_content_type()}, {size} bytes)")
    return found


def read_eml(path: str, kind: str, raw: bytes, columns: RecordColumns | None = None
             ) -> tuple[list[Document], list[Problem]]:
    """The document of an e-mail (``kind`` and ``columns`` are for the other readers), or its problem."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        subject = " ".join(str(msg.get("subject") or "").split())
        header = [f"{name}: {' '.join(str(msg.get(name)).split())}" for name in ("Subject", "From", "To", "Date")
                  if msg.get(name)]
        body, attachments = _body(msg), _attachments(msg)
    except Exception as exc:
        return [], [Problem(path, f"cannot parse e-mail ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")]
    if not body.strip() and not attachments:
        return [], [Problem(path, "e-mail has no body text and no attachment")]
    text = DocumentText()
    text.add("\n".join(header), level=1, heading=subject or "(no subject)")
    text.add_text(body)
    if attachments:
        text.add("Attachments: " + "; ".join(attachments))
    return one_document(path, subject, text.text, text.blocks, text.headings)
