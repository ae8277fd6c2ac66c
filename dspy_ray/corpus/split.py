"""Where a large table file is cut, so several read tasks share it: byte ranges of jsonl, row groups of parquet.

A file larger than the range size (:func:`range_size`: at most ``BYTES_PER_TASK``, less when a few big files
would give fewer tasks than ``parallelism``, never under ``MIN_SPLIT_BYTES``) is cut into even byte ranges
``[start, end)``, one :class:`Part` per read task:

* **jsonl**: a part owns the lines that START in its range: it skips the partial first line (unless
  ``start`` is 0) and reads past ``end`` to finish its last one.  Lines are cut on bytes (``\\n``,
  ``\\r\\n`` or a lone ``\\r``, as Python's universal newlines) and decoded one at a time, so a character
  never straddles a cut.  Ids (``file:LINE``) and messages need the line number at the part's start:
  :func:`number_lines` starts one Ray task per range that counts its line breaks (all in parallel) and
  one that adds them up; a part's task waits only for that sum (part 0 for nothing), and the driver holds
  one object ref per part, never the file's bytes.
* **parquet**: each row group is read by the part whose range holds its first page, its rows numbered
  from the footer's row counts (each task reads the footer; the driver reads nothing).
* **csv** is never cut: a quoted field may hold a line break, so nothing short of reading the file from
  its start tells whether an offset is inside a field.

    >>> f = InputFile("a.jsonl", "/data/a.jsonl", 100, "jsonl", "a.jsonl")
    >>> [(p.start, p.end) for p in split_file(f, 40)]
    [(0, 33), (33, 66), (66, 100)]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.fs as pafs

from dspy_ray.corpus.listing import InputFile

BYTES_PER_TASK = 64 << 20  # a table file larger than this is cut into ranges of at most this many bytes
MIN_SPLIT_BYTES = 8 << 20  # and never into ranges smaller than this, however many workers there are
SPLITTABLE = ("jsonl", "parquet")
CHUNK = 4 << 20  # bytes read at a time (one ranged GET on object storage)
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Part:
    """What one read task reads of a file: the bytes ``[start, end)``, part ``index`` of ``count``."""

    file: InputFile
    start: int
    end: int
    index: int = 0
    count: int = 1
    breaks_before: Any = 0  # jsonl: line breaks before ``start``; an int, or the ref of the task that adds them


def whole(f: InputFile) -> Part:
    return Part(f, 0, f.size)


def range_size(total: int, parallelism: int, most: int | None = None, least: int | None = None) -> int:
    """Bytes per range: enough ranges for ``parallelism`` tasks over ``total`` bytes, within [least, most].

    >>> range_size(100 << 30, 200) == BYTES_PER_TASK, range_size(100 << 20, 200) == MIN_SPLIT_BYTES
    (True, True)
    """
    most = most or BYTES_PER_TASK
    least = min(least or MIN_SPLIT_BYTES, most)
    return max(least, min(most, -(-total // max(parallelism, 1))))


def split_file(f: InputFile, size: int) -> list[Part]:
    """``f`` in even ranges of at most ``size`` bytes (jsonl, parquet), or whole."""
    if f.kind not in SPLITTABLE or f.size <= size:
        return [whole(f)]
    n = -(-f.size // size)
    cuts = [i * f.size // n for i in range(n + 1)]
    return [Part(f, cuts[i], cuts[i + 1], i, n, 0 if i == 0 or f.kind != "jsonl" else None) for i in range(n)]


# -- jsonl: lines by bytes ---------------------------------------------------------------


def lines_from(fs: pafs.FileSystem, path: str, start: int, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes without the break) of every line that starts at or after ``start``, to the end of the
    file; read from ``start - 1``, so the partial line before ``start`` (or the break just before it) is
    skipped.  Nothing, without reading on, when that partial line runs past ``end`` (a long line cut
    into many ranges is read to its end by one of them only)."""
    with fs.open_input_file(path) as raw:
        size = raw.size()
        pos = at = max(start - 1, 0)  # pos: the next byte to read; at: the offset of the pending bytes
        pending: list[bytes] = []
        skip = start > 0
        while True:
            data = raw.read_at(min(CHUNK, size - pos), pos) if pos < size else b""
            pos += len(data)
            eof = pos >= size or not data
            if not eof and b"\n" not in data and b"\r" not in data:
                pending.append(data)  # one long line: no break in this chunk
                if skip and end is not None and pos > end and not pending[0].endswith(b"\r"):
                    return
                continue
            pieces = b"".join([*pending, data]).splitlines(keepends=True)
            # the last piece may be cut: no break yet, or a \r whose \n comes in the next chunk
            pending = [pieces.pop()] if pieces and not eof and not pieces[-1].endswith(b"\n") else []
            for piece in pieces:
                if skip:
                    skip = False
                else:
                    yield at, piece.rstrip(b"\r\n")
                at += len(piece)
            if eof or (skip and end is not None and pos > end):
                return


def numbered_lines(fs: pafs.FileSystem, path: str, start: int, breaks_before: int,
                   end: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(offset, line number, bytes) of every line from the first that starts at or after ``start`` (``end``:
    see :func:`lines_from`); a UTF-8 byte order mark at the start of the file is dropped."""
    lineno = None
    for at, line in lines_from(fs, path, start, end):
        if lineno is None:  # the break that ends the skipped partial line counts too, when it is past start
            lineno = breaks_before + 1 + (at > start)
        if at == 0 and line.startswith(BOM):
            line = line[len(BOM):]
        yield at, lineno, line
        lineno += 1


def count_breaks(fs: pafs.FileSystem, path: str, start: int, end: int) -> int:
    """Line breaks whose last byte is in ``[start, end)``: each ``\\n``, and each ``\\r`` not followed by one."""
    n = 0
    with fs.open_input_file(path) as raw:
        pos = start
        while pos < end:
            want = min(CHUNK, end - pos)
            data = raw.read_at(want + 1, pos)  # one byte more: is a \r at the end followed by \n?
            n += data.count(b"\n", 0, want)
            crs = data.count(b"\r", 0, want)
            if crs:
                n += crs - data.count(b"\r\n", 0, want + 1)
            pos += want
    return n


def _running_sums(*counts: int) -> int | tuple[int, ...]:
    sums, total = [], 0
    for c in counts:
        total += c
        sums.append(total)
    return sums[0] if len(sums) == 1 else tuple(sums)


def number_lines(groups: list[list[Part]], fs: pafs.FileSystem) -> list[list[Part]]:
    """``groups`` with each later jsonl part's line breaks before it: the ref of a Ray task that adds up the
    counts of the ranges before (one counting task per range, all in parallel).  No task when nothing is cut."""
    cut: dict[str, list[Part]] = {}
    for group in groups:
        for part in group:
            if part.file.kind == "jsonl" and part.count > 1:
                cut.setdefault(part.file.full, []).append(part)
    if not cut:
        return groups
    import ray

    count, add = ray.remote(count_breaks), ray.remote(_running_sums)
    before = {}
    for full, parts in cut.items():
        parts.sort(key=lambda p: p.index)
        counts = [count.remote(fs, full, p.start, p.end) for p in parts[:-1]]
        sums = add.options(num_returns=len(counts)).remote(*counts)
        for part, ref in zip(parts[1:], [sums] if len(counts) == 1 else sums):
            before[full, part.index] = ref
    return [[replace(p, breaks_before=before.get((p.file.full, p.index), p.breaks_before)) for p in group]
            for group in groups]


def lines_before(part: Part) -> int:
    """The line breaks before the part's start (waits for the task that adds them up)."""
    if isinstance(part.breaks_before, int):
        return part.breaks_before
    if part.breaks_before is None:
        raise RuntimeError(f"{part.file.shown}: part {part.index} was not numbered (number_lines)")
    import ray

    return ray.get(part.breaks_before)


# -- parquet: row groups -----------------------------------------------------------------


def row_groups(metadata: Any, part: Part) -> list[tuple[int, int]]:
    """(row group, rows of the file before it) of each row group whose first page is in the part's range."""
    owned, before = [], 0
    last = max(part.file.size - 1, 0)
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        if part.count == 1 or part.start <= min(max(_first_page(group), 0), last) < part.end:
            owned.append((g, before))
        before += group.num_rows
    return owned


def _first_page(group: Any) -> int:
    if group.num_columns == 0:
        return 0
    column = group.column(0)
    return min([o for o in (column.dictionary_page_offset, column.data_page_offset) if o], default=0)
