"""Find a corpus's files on the driver: only names and sizes, never their rows.

A corpus is one file, or a folder (recursive, links not followed; names starting with ``.`` or
``_`` are hidden) holding files of one table format (parquet, jsonl, csv) or documents of any
kinds (txt, md, rst, html, pdf, docx, eml, mixed).  Files of other kinds are named in
``unsupported``, so a run accounts for every file::

    >>> found = discover(InputSpec("inbox/"))                         # doctest: +SKIP
    >>> found.format, [f.rel for f in found.files], found.unsupported  # doctest: +SKIP
    ('documents', ['a.pdf', 'b.eml', 'notes/c.md'], ['scan.tiff'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow.fs as pafs

from dspy_ray.corpus.documents.base import DOCUMENT_KINDS
from dspy_ray.corpus.spec import (
    DOCUMENTS,
    SUPPORTED,
    TABLE_FORMATS,
    InputError,
    InputSpec,
    one_line,
)
from dspy_ray.util.fs import filesystem_for, list_files


@dataclass(frozen=True)
class InputFile:
    rel: str  # the name ids and messages use: relative to the folder (one file: its name)
    full: str  # the path inside the filesystem
    size: int
    kind: str  # jsonl | csv | parquet, or a document kind (txt, pdf, ...)
    shown: str  # how messages name it: the path or URI the user gave, and the file in it


@dataclass
class InputFiles:
    """The corpus's files, sorted by relative path, and how to open them."""

    format: str  # parquet | jsonl | csv | documents
    files: list[InputFile]
    fs: pafs.FileSystem
    shown: str  # the corpus as the user named it
    unsupported: list[str] = field(default_factory=list)  # files of other kinds, relative paths

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


def kind_of(suffix: str) -> str | None:
    return TABLE_FORMATS.get(suffix) or DOCUMENT_KINDS.get(suffix)


def discover(spec: InputSpec) -> InputFiles:
    """The corpus's files; :class:`InputError` when there is none, or the folder mixes formats."""
    shown = spec.path.rstrip("/") or spec.path
    try:
        fs, root = filesystem_for(spec.path)
        info = fs.get_file_info(root)
    except (OSError, ValueError) as exc:
        raise InputError(f"{shown}: cannot open ({one_line(exc)})") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {shown}")
    if info.type == pafs.FileType.File:
        suffix = PurePosixPath(root).suffix.lower()
        kind = kind_of(suffix)
        if kind is None:
            raise InputError(f"{shown}: unknown input format {suffix or '(no extension)'!r}; "
                             f"supported: {', '.join(SUPPORTED)}")
        name = PurePosixPath(root).name
        return InputFiles(_format(kind), [InputFile(name, root, info.size or 0, kind, shown)], fs, shown)
    try:
        listing = list_files(fs, root, info=info, hidden="name", follow_links=False)
    except OSError as exc:
        raise InputError(f"{shown}: cannot list ({one_line(exc)})") from None
    files, unsupported = [], []
    for f in listing.files:
        kind = kind_of(f.suffix)
        if kind is None:
            unsupported.append(f.path)
        else:
            files.append(InputFile(f.path, f.full, f.size, kind, f"{shown}/{f.path}"))
    # Path order (component by component), as this reader has always sorted: "a/b.txt" before "a.txt".
    files.sort(key=lambda f: PurePosixPath(f.rel).parts)
    if not files:
        raise InputError(f"{shown}: no input files found; supported extensions: {', '.join(SUPPORTED)}"
                         + (f" (found only: {', '.join(unsupported[:5])})" if unsupported else ""))
    formats = {_format(f.kind): f for f in files}
    if len(formats) > 1:
        a, b = list(formats.values())[:2]
        raise InputError(f"{shown}: mixes input formats ({a.rel} and {b.rel}); use one table format per folder, "
                         f"or documents only")
    return InputFiles(next(iter(formats)), files, fs, shown, unsupported)


def _format(kind: str) -> str:
    return kind if kind in TABLE_FORMATS.values() else DOCUMENTS
