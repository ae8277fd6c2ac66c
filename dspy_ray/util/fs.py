"""Local paths and object-store URIs behind one interface (``pyarrow.fs``, with fsspec as fallback).

    >>> fs, path = filesystem_for("/tmp/out")
    >>> type(fs).__name__, path
    ('LocalFileSystem', '/tmp/out')
    >>> is_uri("s3://bucket/calls/"), is_uri("calls/")
    (True, False)

``s3://``, ``gs://``, ``hdfs://`` and ``file://`` go through pyarrow's own
filesystems (credentials from the usual environment / instance role); any other
fsspec URL (``memory://`` in tests) through ``fsspec``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import pyarrow.fs as pafs


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
