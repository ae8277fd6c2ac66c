"""The pre-pass's quick look at a jsonl part: its whole byte range parsed by pyarrow's JSON reader at once.

The line-by-line reader (:func:`~dspy_ray.corpus.rows.file_rows`) parses each line with Python's
``json`` and builds the row's ``errors`` in Python: about 0.5 s of CPU per 10 MB, so a 600 MB corpus
costs half a minute of the pre-pass before the first LM call.  What the pre-pass needs of a clean
part is only counts and the given ids, which Arrow computes an order of magnitude faster.

:func:`jsonl_check` gives the same figures the line-by-line read gives, or ``None`` whenever it
could differ, and the caller reads the part line by line (which names the file and line of a
problem): a line pyarrow refuses, blank lines or ``\\r`` breaks (line numbers would not follow
row numbers), a byte order mark, an id or text column that pyarrow types unlike Python's ``json``
(a date-like string becomes a timestamp), a given ``errors`` column, or a first part without rows or
without the text column (whose messages need the whole file).

    >>> jsonl_check(whole(found.files[0]), found.fs, spec)        # doctest: +SKIP
    QuickCheck(rows=31250, with_errors=0, types={}, ids=<...>, where=<...>)
"""

from __future__ import annotations

import functools
import io
import sys
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson

from dspy_ray.corpus.spec import ERRORS, ID, InputSpec
from dspy_ray.corpus.split import BOM, CHUNK, Part, lines_before

@functools.cache
def blank_pattern() -> str:
    """A regex of texts made only of what Python's ``str.isspace()`` calls space: such a text is "empty"
    (Arrow's trim knows Unicode White_Space, a slightly different set), so a blank text is counted as the
    line-by-line read counts it.  Built on first use (a scan of every code point, ~50 ms), not at import."""
    space = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    return "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in space) + "]*$"
SIMPLE_TYPES = ("null", "bool", "int64", "double", "string")  # what Python's values give as themselves


class QuickCheck(NamedTuple):
    rows: int
    with_errors: int
    types: dict[str, str]  # the other columns' types, as the line-by-line read's blocks report them
    ids: pa.Array  # the ids the data gives
    where: pa.Array  # their "file:line"


def owned_bytes(part: Part, fs: pafs.FileSystem) -> tuple[int, bytes] | None:
    """(offset, bytes) of the lines that start in the part, breaks included; None when a ``\\r`` is read
    (whose breaks the line-by-line reader counts in ways a byte count cannot follow cheaply)."""
    f = part.file
    with fs.open_input_file(f.full) as raw:
        size = raw.size()
        start = max(part.start - 1, 0)
        data = raw.read_at(part.end - start, start)
        while not data.endswith(b"\n") and start + len(data) < size:  # finish the last line
            more = raw.read_at(min(CHUNK, size - start - len(data)), start + len(data))
            if not more:
                break
            cut = more.find(b"\n")
            data += more if cut < 0 else more[: cut + 1]
    if b"\r" in data:
        return None
    skip = 0
    if part.start > 0:  # the partial line before the part (or the break just before it) is not ours
        cut = data.find(b"\n")
        if cut < 0 or start + cut + 1 >= part.end:
            return part.start, b""  # no line starts in the part
        skip = cut + 1
    return start + skip, data[skip:]


def jsonl_check(part: Part, fs: pafs.FileSystem, spec: InputSpec) -> QuickCheck | None:
    """The part's rows, rows with problems, column types and given ids, or None (read it line by line)."""
    owned = owned_bytes(part, fs)
    if owned is None:
        return None
    at, data = owned
    if not data or data.startswith(BOM):
        return None if part.index == 0 or data else QuickCheck(0, 0, {}, pa.array([], pa.string()),
                                                                 pa.array([], pa.string()))
    try:
        table = pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(
            use_threads=False, block_size=len(data) + 1))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    names = table.column_names
    if table.num_rows != lines or ERRORS in names or (spec.id_column != ID and ID in names):
        return None  # blank lines; or columns the row normalization rewrites
    if part.index == 0 and (spec.text_column not in names):
        return None
    text, given = (table.column(n).combine_chunks() if n in names else pa.nulls(lines, pa.string())
                   for n in (spec.text_column, spec.id_column))
    if str(text.type) not in ("null", "string") or str(given.type) not in ("null", "string", "int64"):
        return None
    text, given = text.cast(pa.string()), given.cast(pa.string())
    bad = pc.or_kleene(pc.is_null(text), pc.or_(pc.match_substring_regex(text, blank_pattern()),
                                                 pc.greater(pc.utf8_length(text), spec.max_chars)))
    first = lines_before(part) + 1 + (at > part.start)
    where = pc.binary_join_element_wise(f"{part.file.rel}:",
                                        pa.array(np.arange(first, first + lines)).cast(pa.string()), "")
    keep = pc.fill_null(pc.not_equal(given, where), False)  # an id equal to its own place counts as generated
    types = {n: t if t in SIMPLE_TYPES else "string"
             for n, t in ((f.name, str(f.type)) for f in table.schema) if n not in (spec.text_column, ID, ERRORS)}
    return QuickCheck(table.num_rows, pc.sum(pc.fill_null(bad, True)).as_py() or 0, types,
                      pc.filter(given, keep), pc.filter(where, keep))
