"""Read a corpus for indexing: a folder (recursive) or one file, on local disk or object storage.

Document kinds, by extension:

=====================  =====================================================================
``.txt``               paragraphs split by blank lines; headings: ``===``/``---`` underlined,
                       ALL CAPS lines, or short stand-alone lines without end punctuation
``.md``, ``.markdown`` ``#`` headings and ``===``/``---`` underlined ones (not inside code fences)
``.rst``               titles underlined (and maybe overlined) with one repeated punctuation mark
``.html``, ``.htm``    visible text from an HTML parser (BeautifulSoup, ``html.parser``): scripts,
                       styles, navigation, headers without an ``h1``, footers, forms, hidden
                       elements, cookie banners and breadcrumbs dropped; ``<title>`` kept as the
                       title, ``h1``-``h6`` as headings, table rows as ``cell | cell`` lines
``.jsonl``, ``.csv``,  one document per record: ``--text-column`` (default ``text``),
``.parquet``           ``--title-column`` (``title``), ``--id-column`` (``id``; else the line or
                       row number); its source is ``<file>#<record id>``
=====================  =====================================================================

A document's ``text`` is what passage offsets point into: the decoded file
for txt/md/rst (unchanged), the extracted text for HTML (blocks joined by blank
lines), the text field for a record.  Text files must be UTF-8 (a BOM is
fine); HTML may declare another charset in a ``<meta>`` tag.

Errors are data: an unreadable, undecodable or empty file, a file without the
text column, a bad record (broken JSON line, empty text, duplicate id) is a
:class:`Problem` naming the file (and line or record) — reported and counted,
never silently dropped.  Files of other kinds (images, scripts) and paths with a
component starting with ``.`` or ``_`` (``.git``, Sphinx's ``_sources``) are
*ignored*, counted by extension in the summary.

    >>> corpus = scan_corpus("data/rag/corpus")                        # doctest: +SKIP
    >>> len(corpus.files), corpus.ignored                              # doctest: +SKIP
    (50, {})
    >>> docs, problems = read_file(corpus, corpus.files[0])            # doctest: +SKIP
    >>> docs[0].source, docs[0].title, docs[0].blocks[0]               # doctest: +SKIP
    ('animal_services/animal_services_overview.md', 'Animal Services', Block(0, 17, 1))
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow.fs as pafs

from dspy_ray.util.fs import filesystem_for
from dspy_ray.util.cli import EXIT_USAGE

TEXT_KINDS = {".txt": "txt", ".md": "md", ".markdown": "md", ".rst": "rst", ".html": "html", ".htm": "html"}
RECORD_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
KINDS = {**TEXT_KINDS, **RECORD_KINDS}


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
class CorpusFile:
    path: str  # relative to the corpus root, posix
    full: str  # path inside the filesystem
    size: int
    kind: str


@dataclass
class Corpus:
    location: str
    fs: pafs.FileSystem
    root: str
    files: list[CorpusFile]
    ignored: dict[str, int]  # extension (or "hidden/excluded") -> count

    def read(self, f: CorpusFile) -> bytes:
        with self.fs.open_input_stream(f.full) as stream:
            return stream.read()


@dataclass(frozen=True)
class RecordColumns:
    text: str = "text"
    title: str = "title"
    id: str = "id"


# -- listing ---------------------------------------------------------------------------


def scan_corpus(location: str, exclude: tuple[str, ...] = ()) -> Corpus:
    """The corpus's indexable files, sorted by path; raises :class:`CorpusError` when there is nothing to index.

    ``exclude``: glob patterns matched against corpus-relative paths (``genindex*.html``, ``drafts/*``).
    """
    try:
        fs, root = filesystem_for(location)
        info = fs.get_file_info(root)
    except (OSError, ValueError) as exc:
        raise CorpusError(f"corpus {location}: cannot open ({' '.join(str(exc).split())[:300]})") from None
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"corpus not found: {location}")
    if info.type == pafs.FileType.File:
        entries, base = [info], root.rsplit("/", 1)[0] if "/" in root else ""
    else:
        try:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except OSError as exc:
            raise CorpusError(f"corpus {location}: cannot list ({' '.join(str(exc).split())[:300]})") from None
        base = root
    files, ignored = [], Counter()
    for entry in entries:
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(base):].lstrip("/") if base else entry.path
        if any(part.startswith((".", "_")) for part in PurePosixPath(rel).parts) or any(
                fnmatch.fnmatch(rel, pattern) for pattern in exclude):
            ignored["hidden or excluded"] += 1
            continue
        ext = PurePosixPath(rel).suffix.lower()
        if ext not in KINDS:
            ignored[ext or "(no extension)"] += 1
            continue
        files.append(CorpusFile(rel, entry.path, entry.size or 0, KINDS[ext]))
    files.sort(key=lambda f: f.path)
    if not files:
        kinds = ", ".join(sorted(KINDS))
        found = f" (found only: {_counts(ignored)})" if ignored else ""
        raise CorpusError(f"corpus {location}: no files to index{found}; supported: {kinds}")
    return Corpus(location, fs, root, files, dict(ignored))


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- one file ------------------------------------------------------------------------


def read_file(corpus: Corpus, f: CorpusFile, data: bytes | None = None,
              columns: RecordColumns = RecordColumns()) -> tuple[list[Document], list[Problem]]:
    """The documents of one file, and the problems met (a bad file is one problem and no document)."""
    try:
        raw = corpus.read(f) if data is None else data
    except OSError as exc:
        return [], [Problem(f.path, f"cannot read ({getattr(exc, 'strerror', None) or exc})")]
    return parse_bytes(f.path, f.kind, raw, columns)


def parse_bytes(path: str, kind: str, raw: bytes, columns: RecordColumns = RecordColumns()
                ) -> tuple[list[Document], list[Problem]]:
    if not raw.strip():
        return [], [Problem(path, "file is empty")]
    if kind in RECORD_KINDS.values():
        return _records(path, kind, raw, columns)
    if kind == "html":
        text, problem = _decode_html(raw)
    else:
        text, problem = _decode_utf8(raw)
    if problem:
        return [], [Problem(path, problem)]
    if kind == "html":
        try:
            title, text, blocks, headings = html_document(text)
        except Exception as exc:  # noqa: BLE001 - a parser crash on one page must not stop the corpus
            return [], [Problem(path, f"cannot parse HTML ({type(exc).__name__}: {exc})")]
    else:
        blocks, headings = split_blocks(text, kind)
        title = _first_heading(blocks, headings) or ""
    if not text.strip():
        return [], [Problem(path, "no text" + (" (after dropping navigation, scripts and styles)"
                                                 if kind == "html" else ""))]
    title = title or PurePosixPath(path).stem.replace("_", " ")
    return [Document(path, path, title, text, blocks, headings)], []


def _decode_utf8(raw: bytes) -> tuple[str, str | None]:
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return "", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); convert it to UTF-8"


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


def _decode_html(raw: bytes) -> tuple[str, str | None]:
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


# -- plain text, Markdown, reStructuredText ------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_UNDERLINE = re.compile(r"""^([=\-~^"'`*+#:.<>_])\1{2,}\s*$""")
_RST_LEVELS = "=-~^\"'`*+#:.<>_"


def _lines(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, line without newline) for each line."""
    pos = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        yield pos, pos + len(body), body
        pos += len(line)


def split_blocks(text: str, kind: str) -> tuple[list[Block], dict[int, str]]:
    """Paragraph and heading blocks of a txt / md / rst text (offsets into ``text``)."""
    lines = list(_lines(text))
    blocks: list[Block] = []
    headings: dict[int, str] = {}
    para: list[tuple[int, int, str]] = []
    rst_levels: list[str] = []  # underline characters in order of first use = heading levels

    def flush():
        if para:
            blocks.append(Block(para[0][0], para[-1][1]))
            para.clear()

    def heading(start: int, end: int, title: str, level: int):
        flush()
        blocks.append(Block(start, end, max(1, level)))
        headings[start] = title.strip()

    i, fenced = 0, False
    while i < len(lines):
        start, end, line = lines[i]
        nxt = lines[i + 1][2] if i + 1 < len(lines) else ""
        if kind == "md" and _FENCE.match(line):
            fenced = not fenced
            para.append(lines[i])
            i += 1
            continue
        if fenced:
            para.append(lines[i])
            i += 1
            continue
        if not line.strip():
            flush()
            i += 1
            continue
        if kind == "md" and (m := _ATX.match(line)):
            heading(start, end, m.group(2), len(m.group(1)))
            i += 1
            continue
        stripped = line.strip()
        # An overline, title, underline triple (rst / txt): "=====\nTitle\n=====".
        if (kind in ("rst", "txt") and _UNDERLINE.match(line) and i + 2 < len(lines)
                and lines[i + 1][2].strip() and _UNDERLINE.match(lines[i + 2][2])
                and lines[i + 2][2].strip()[0] == stripped[0] and not para):
            title_line = lines[i + 1]
            level = _rst_level(rst_levels, "over" + stripped[0])
            heading(start, lines[i + 2][1], title_line[2], level)
            i += 3
            continue
        # A title underlined with one repeated mark, as long as the title at least (md: = and - only).
        if (not para and stripped and _UNDERLINE.match(nxt) and len(nxt.strip()) >= min(len(stripped), 3)
                and (kind != "md" or nxt.strip()[0] in "=-") and not _UNDERLINE.match(line)):
            mark = nxt.strip()[0]
            level = (1 if mark == "=" else 2) if kind == "md" else _rst_level(rst_levels, mark)
            heading(start, lines[i + 1][1], stripped, level)
            i += 2
            continue
        if kind == "txt" and not para and _plain_heading(line, nxt, i + 1 < len(lines)):
            heading(start, end, stripped, 2 if stripped.isupper() else 3)
            i += 1
            continue
        para.append(lines[i])
        i += 1
    flush()
    return blocks, headings


def _rst_level(levels: list[str], mark: str) -> int:
    if mark not in levels:
        levels.append(mark)
    return levels.index(mark) + 1


def _plain_heading(line: str, nxt: str, has_next: bool) -> bool:
    """A stand-alone short line: ALL CAPS, or capitalised without end punctuation, followed by a blank line."""
    s = line.strip()
    if not has_next or nxt.strip() or not (2 < len(s) <= 70) or s[-1] in ".,;:!?)" or s[0] in "-*•+|([0123456789":
        return False
    letters = [c for c in s if c.isalpha()]
    if len(letters) < 3:
        return False
    return s.isupper() or (s[0].isupper() and len(s.split()) <= 8)


def _first_heading(blocks: list[Block], headings: dict[int, str]) -> str | None:
    top = [b for b in blocks if b.level]
    if not top:
        return None
    best = min(b.level for b in top)
    return headings[next(b.start for b in top if b.level == best)]


# -- HTML ------------------------------------------------------------------------------------

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


# -- records (jsonl / csv / parquet) -----------------------------------------------------------


def _records(path: str, kind: str, raw: bytes, columns: RecordColumns) -> tuple[list[Document], list[Problem]]:
    problems: list[Problem] = []
    try:
        rows = list(_record_rows(path, kind, raw, problems))
    except _FileProblem as exc:
        return [], [Problem(path, str(exc))]
    if rows and not any(columns.text in values for _, values in rows):
        found = sorted({k for _, values in rows[:100] for k in values})
        return [], [Problem(path, f"text column {columns.text!r} not found; columns are {found}; "
                                  f"choose one with --text-column")]
    docs: list[Document] = []
    seen: dict[str, str] = {}
    for where, values in rows:
        rid = values.get(columns.id)
        rid = where if rid is None or str(rid).strip() == "" else str(rid)
        label = f"{path}#{rid}"
        if rid in seen:
            problems.append(Problem(label, f"duplicate record id (first at {seen[rid]}); record skipped", "record"))
            continue
        seen[rid] = where
        text = values.get(columns.text)
        if not isinstance(text, str) or not text.strip():
            reason = "is null" if text is None else "is empty" if isinstance(text, str) else \
                f"is not a string ({type(text).__name__})"
            problems.append(Problem(label, f"text column {columns.text!r} {reason}; record skipped", "record"))
            continue
        title = values.get(columns.title)
        title = str(title).strip() if title not in (None, "") else rid
        blocks, headings = split_blocks(text, "txt")
        docs.append(Document(label, path, title, text, blocks, headings))
    if not docs and not problems:
        problems.append(Problem(path, "no records"))
    return docs, problems


class _FileProblem(Exception):
    pass


def _record_rows(path: str, kind: str, raw: bytes, problems: list[Problem]) -> Iterator[tuple[str, dict]]:
    """(row label, values) per record; a broken JSON line is a record problem, an unreadable file a file one."""
    if kind == "jsonl":
        text, problem = _decode_utf8(raw)
        if problem:
            raise _FileProblem(problem)
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(f"{path}:{lineno}", f"invalid JSON ({exc.msg}); line skipped", "record"))
                continue
            if not isinstance(value, dict):
                problems.append(Problem(f"{path}:{lineno}", "not a JSON object; line skipped", "record"))
                continue
            yield str(lineno), value
        return
    if kind == "csv":
        text, problem = _decode_utf8(raw)
        if problem:
            raise _FileProblem(problem)
        try:
            for rowno, values in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):
                yield str(rowno), values
        except csv.Error as exc:
            raise _FileProblem(f"cannot read CSV ({exc})") from None
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowInvalid, OSError) as exc:
        raise _FileProblem(f"cannot read parquet ({' '.join(str(exc).split())[:200]})") from None
    for rowno, values in enumerate(table.to_pylist(), 1):
        yield str(rowno), values
