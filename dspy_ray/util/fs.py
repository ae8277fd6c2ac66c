"""Local paths and object-store URIs behind one interface (``pyarrow.fs``, with fsspec as fallback).

    >>> fs, path = filesystem_for("/tmp/out")
    >>> type(fs).__name__, path
    ('LocalFileSystem', '/tmp/out')
    >>> is_uri("s3://bucket/calls/"), is_uri("calls/")
    (True, False)
    >>> listing = list_files(*filesystem_for("data/rag/corpus"), hidden="path", suffixes={".md"})  # doctest: +SKIP
    >>> listing.files[0].path, listing.skipped                                                    # doctest: +SKIP
    ('animal_services/animal_services_overview.md', {'.rst': 8, '.txt': 7, '.html': 6, '.jsonl': 1, '.htm': 1})

``s3://``, ``gs://``, ``hdfs://`` and ``file://`` go through pyarrow's own
filesystems (credentials from the usual environment / instance role); any other
fsspec URL (``memory://`` in tests) through ``fsspec``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

import pyarrow.fs as pafs

HIDDEN = (".", "_")  # a name starting so is hidden: .git, .DS_Store, Sphinx's _sources, __pycache__


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def filesystem_for(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    uri = str(uri)
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError):  # ArrowInvalid / ArrowNotImplementedError: not a pyarrow scheme
        pass
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """A file's or object's bytes; None when it does not exist (other failures raise OSError).

    ``read_bytes(*filesystem_for(uri))`` for a URI."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:  # some filesystems raise a bare OSError
            return None
        raise


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file or object whole: under a temporary name, then renamed, so readers never see part of it."""
    import uuid

    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


@dataclass(frozen=True)
class ListedFile:
    """One file :func:`list_files` found."""

    path: str  # relative to the folder listed (one file listed: its name), posix
    full: str  # the path inside the filesystem
    size: int

    @property
    def suffix(self) -> str:
        """The extension in lower case, "" when none: ``sub/Page.HTML`` -> ``.html``."""
        return PurePosixPath(self.path).suffix.lower()


@dataclass
class Listing:
    """What :func:`list_files` found, and how many files it left out, by why."""

    files: list[ListedFile]  # sorted by path
    skipped: dict[str, int] = field(default_factory=dict)  # "hidden or excluded", or the extension not asked for


def list_files(fs: pafs.FileSystem, root: str, *, recursive: bool = True, hidden: Literal["path", "name"] | None = None,
               exclude: Sequence[str] = (), suffixes: Collection[str] | None = None, follow_links: bool = True,
               info: pafs.FileInfo | None = None) -> Listing:
    """The files at ``root`` (a folder, or a single file), local or in an object store, sorted by relative path.

    Left out, and counted in ``skipped``: with ``hidden="path"`` a file with any path component starting
    with ``.`` or ``_`` (``.git/``, ``_sources/``), with ``hidden="name"`` a file so named; a relative path
    matching an ``exclude`` glob; with ``suffixes`` (lower case) a file of another extension, counted under
    that extension (``"(no extension)"``).  ``follow_links=False``: on local disk, nothing under a linked
    sub-folder.  ``info``: the root's ``FileInfo`` when the caller has it already.
    Raises FileNotFoundError when nothing is at ``root``, OSError when it cannot be listed.
    """
    info = fs.get_file_info(root) if info is None else info
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(root)
    if info.type == pafs.FileType.File:
        entries, base = [info], root.rsplit("/", 1)[0] if "/" in root else ""
    else:
        entries, base = fs.get_file_info(pafs.FileSelector(root, recursive=recursive)), root
    if not follow_links and isinstance(fs, pafs.LocalFileSystem):  # pyarrow follows them, to ELOOP in a cycle
        links = tuple(e.path + "/" for e in entries if e.type == pafs.FileType.Directory and os.path.islink(e.path))
        entries = [e for e in entries if not e.path.startswith(links)]
    files, skipped = [], Counter()
    for entry in entries:
        if entry.type != pafs.FileType.File:
            continue
        found = ListedFile(entry.path[len(base):].lstrip("/") if base else entry.path, entry.path, entry.size or 0)
        parts = PurePosixPath(found.path).parts
        if (hidden and any(part.startswith(HIDDEN) for part in (parts if hidden == "path" else parts[-1:]))
                or any(fnmatch.fnmatch(found.path, pattern) for pattern in exclude)):
            skipped["hidden or excluded"] += 1
        elif suffixes is not None and found.suffix not in suffixes:
            skipped[found.suffix or "(no extension)"] += 1
        else:
            files.append(found)
    files.sort(key=lambda f: f.path)
    return Listing(files, dict(skipped))


def json_lines(lines: Iterable[str], source: str, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ``error`` names ``source`` and the line otherwise."""
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            yield lineno, json_object(line.rstrip("\r\n"), f"{source} line {lineno}", error)


def json_object(text: str, source: str, error: type[Exception]) -> dict:
    """``text`` parsed as one JSON object; ``error`` naming ``source`` (and the column) when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f" line {e.lineno}" if e.lineno > 1 else ""
        raise error(f"{source}{where}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(value, dict):
        raise error(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value
