"""Read an HTML page: its visible text as blocks, ``<title>`` as the title, ``h1``-``h6`` as headings.

    >>> page = b"<head><title>Lines</title></head><body><nav>Home</nav><h1>Call us</h1><p>555-0100</p></body>"
    >>> docs, _ = read_html("lines.html", "html", page)
    >>> docs[0].title, docs[0].text, docs[0].headings
    ('Lines', 'Call us\\n\\n555-0100', {0: 'Call us'})

Dropped: scripts, styles, navigation, headers without an ``h1``, footers, forms, hidden elements,
cookie banners and breadcrumbs; table rows become ``cell | cell`` lines.  The document's text is
the blocks joined by blank lines: what passage offsets point into.
"""

from __future__ import annotations

import re

from dspy_ray.corpus.documents.base import (
    Block,
    Document,
    Problem,
    RecordColumns,
    one_document,
)

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


def decode_html(raw: bytes) -> tuple[str, str | None]:
    """UTF-8 (or a BOM's encoding), else the charset a ``<meta>`` tag declares; never a guess."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), None
    declared = _META_CHARSET.search(raw[:4096])
    encoding = declared.group(1).decode("ascii").lower() if declared else "utf-8"
    try:
        return raw.decode("utf-8-sig" if encoding in ("utf-8", "utf8") else encoding), None
    except LookupError:
        return "", f"declares an unknown charset {encoding!r}"
    except UnicodeDecodeError as exc:
        return "", (f"not valid {encoding} (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
                    + ("" if declared else "; declare its charset in a <meta> tag or convert it to UTF-8"))


def read_html(path: str, kind: str, raw: bytes, columns: RecordColumns | None = None
              ) -> tuple[list[Document], list[Problem]]:
    """The document of an HTML page (``kind`` and ``columns`` are for the other readers), or its problem."""
    markup, problem = decode_html(raw)
    if problem:
        return [], [Problem(path, problem)]
    try:
        title, text, blocks, headings = html_document(markup)
    except Exception as exc:
        return [], [Problem(path, f"cannot parse HTML ({type(exc).__name__}: {exc})")]
    return one_document(path, title, text, blocks, headings,
                        empty="no text (after dropping navigation, scripts and styles)")


_DROP_TAGS = {"script", "style", "noscript", "template", "nav", "footer", "form", "button", "svg", "iframe",
              "select", "input", "textarea", "head", "object", "canvas", "dialog", "menu"}
_DROP_ROLES = {"navigation", "search", "contentinfo", "banner", "menu", "menubar", "dialog", "alertdialog"}
_DROP_CLASS = re.compile(r"(^|[-_])(cookies?|consent|breadcrumbs?|sidebar|sphinxsidebar|footer|skip-?link|"
                         r"navbar|headerlink|related)($|[-_])", re.I)
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "aside", "ul", "ol", "li", "dl", "dt", "dd", "table",
               "thead", "tbody", "tfoot", "blockquote", "figure", "figcaption", "caption", "address", "header",
               "hr", "details", "summary", "body", "html", "center"}


def _dropped(tag) -> bool:
    if tag.name in _DROP_TAGS or tag.has_attr("hidden") or tag.get("aria-hidden") == "true":
        return True
    if tag.get("role") in _DROP_ROLES:
        return True
    style = (tag.get("style") or "").replace(" ", "").lower()
    if "display:none" in style:
        return True
    names = [tag.get("id") or "", *(tag.get("class") or [])]
    if any(_DROP_CLASS.search(n) for n in names if n):
        return True
    # A page header (logo, site links) rather than an article's: no h1 inside.
    return tag.name == "header" and tag.find("h1") is None


def html_document(markup: str) -> tuple[str, str, list[Block], dict[int, str]]:
    """(title, visible text, blocks, headings) of an HTML page."""
    from bs4 import BeautifulSoup, Comment, NavigableString

    soup = BeautifulSoup(markup, "html.parser")
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text(" ").split()) if title_tag else ""
    parts: list[tuple[str, int]] = []  # (block text, heading level)
    buffer: list[str] = []

    def flush():
        text = " ".join("".join(buffer).split())
        buffer.clear()
        if text:
            parts.append((text, 0))

    def walk(node):
        for child in node.children:
            if isinstance(child, Comment):
                continue
            if isinstance(child, NavigableString):
                buffer.append(str(child))
                continue
            if child.name is None or _dropped(child):
                continue
            name = child.name
            if name in _HEADINGS:
                flush()
                text = " ".join(_visible_text(child).split())
                if text:
                    parts.append((text, _HEADINGS[name]))
            elif name == "pre":
                flush()
                text = _visible_text(child).strip("\n")
                if text.strip():
                    parts.append((text, 0))
            elif name == "tr":
                flush()
                cells = [" ".join(_visible_text(c).split()) for c in child.find_all(["td", "th"], recursive=False)]
                if any(cells):
                    parts.append((" | ".join(cells), 0))
            elif name == "br":
                buffer.append("\n")
            elif name in _BLOCK_TAGS:
                flush()
                walk(child)
                flush()
            else:
                walk(child)

    walk(soup.body or soup)
    flush()
    text_parts, blocks, headings, pos = [], [], {}, 0
    for text, level in parts:
        blocks.append(Block(pos, pos + len(text), level))
        if level:
            headings[pos] = text
        text_parts.append(text)
        pos += len(text) + 2
    return title or next((t for t, lvl in parts if lvl == 1), ""), "\n\n".join(text_parts), blocks, headings


def _visible_text(tag) -> str:
    """Text of ``tag`` without its dropped descendants (a heading's ``¶`` permalink, a hidden span)."""
    from bs4 import Comment, NavigableString

    out = []
    for child in tag.children:
        if isinstance(child, Comment):
            continue
        if isinstance(child, NavigableString):
            out.append(str(child))
        elif child.name is not None and not _dropped(child):
            out.append(_visible_text(child))
    return "".join(out)
