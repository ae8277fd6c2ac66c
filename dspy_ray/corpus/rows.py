"""One corpus file to rows, a block at a time: what a read task runs on a worker (and the driver for ``--limit``).

Every row gets an ``id`` (the id column; else ``file:line`` for tables, the relative path for a
document) and an ``errors`` list of its own problems (null, non-string or blank text, a text
truncated to ``max_chars``, a document that could not be read).  A problem of the whole file
(broken JSON line, missing text column, no rows) raises :class:`InputError` naming the file and line.
A read task may read a :class:`~dspy_ray.corpus.split.Part` of a large file: the same rows, ids and
messages as the whole file gives (line and row numbers count from the file's start); only the first
part refuses a file without rows or without the text column, reading on past its range until a row has it::

    >>> found = discover(InputSpec("calls.jsonl", text_column="transcript"))              # doctest: +SKIP
    >>> next(file_rows(found.files[0], found.fs, InputSpec("calls.jsonl", "transcript"))).column_names  # doctest: +SKIP
    ['caller', 'transcript', 'id', 'errors']
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.corpus.documents.base import DOCUMENT_KINDS
from dspy_ray.corpus.documents.parse import parse_bytes
from dspy_ray.corpus.listing import InputFile
from dspy_ray.corpus.spec import ERRORS, ID, InputError, InputSpec, one_line
from dspy_ray.corpus.split import Part, lines_before, numbered_lines, row_groups, whole
from dspy_ray.util.fs import json_object

WHERE = "_where"  # "file:line" of each row, only when asked for (the pre-pass names duplicate ids with it)
DOCUMENT_KIND_NAMES = frozenset(DOCUMENT_KINDS.values())
Record = tuple[dict[str, Any], str]  # (values, "file:line")


def file_rows(f: InputFile | Part, fs: pafs.FileSystem, spec: InputSpec, rows_per_block: int = 256, *,
              where: bool = False, types: dict[str, str] | None = None) -> Iterator[pa.Table]:
    """The rows of one file (or of one part of it), ``rows_per_block`` at a time, normalized (see the module's
    docstring); ``types``: every other column's type over the whole corpus (:func:`merge_types`), so all
    blocks agree."""
    part = f if isinstance(f, Part) else whole(f)
    f = part.file
    if f.kind in DOCUMENT_KIND_NAMES:
        yield _normalize([_document(f, fs)], spec, where, document=True)
        return
    if f.size == 0:
        raise InputError(f"{f.shown}: file is empty")
    records = {"jsonl": _jsonl, "csv": _table_records, "parquet": _table_records}[f.kind](part, fs, spec)
    block: list[Record] = []
    for record in records:
        block.append(record)
        if len(block) >= rows_per_block:
            yield conform(_normalize(block, spec, where), types)
            block = []
    if block:
        yield conform(_normalize(block, spec, where), types)


def documents_rows(files: list[InputFile], fs: pafs.FileSystem, spec: InputSpec, rows_per_block: int, *,
                   where: bool = False) -> Iterator[pa.Table]:
    """One row per document of ``files``, in blocks of ``rows_per_block``."""
    block: list[Record] = []
    for f in files:
        block.append(_document(f, fs))
        if len(block) >= rows_per_block:
            yield _normalize(block, spec, where, document=True)
            block = []
    if block:
        yield _normalize(block, spec, where, document=True)


def _document(f: InputFile, fs: pafs.FileSystem) -> Record:
    """A document's row: its text, or "" and why not in ``_note`` (an unreadable file is still a row)."""
    values: dict[str, Any] = {ID: f.rel, "source_file": f.rel, "_note": None}
    try:
        with fs.open_input_stream(f.full) as stream:
            raw = stream.read()
    except OSError as exc:
        return {**values, "_text": "", "_note": f"cannot read the file ({one_line(exc, 200)})"}, f.rel
    if not raw.strip():
        return {**values, "_text": "", "_note": "file is empty"}, f.rel
    if f.kind in ("txt", "md", "rst"):  # the text itself, bad bytes replaced rather than the row lost
        try:
            return {**values, "_text": raw.decode("utf-8-sig")}, f.rel
        except UnicodeDecodeError:
            return {**values, "_text": raw.decode("utf-8", errors="replace"),
                    "_note": "document is not valid UTF-8; bad bytes replaced"}, f.rel
    docs, problems = parse_bytes(f.rel, f.kind, raw)
    if not docs:
        return {**values, "_text": "", "_note": "; ".join(p.reason for p in problems) or "no text"}, f.rel
    return {**values, "_text": docs[0].text}, f.rel


def _jsonl(part: Part, fs: pafs.FileSystem, spec: InputSpec) -> Iterator[Record]:
    """The rows of the lines that start in the part.  The first part reads on past its end (rows not
    yielded) while no row has the text column, so that "no rows" and "text column not found" are said of
    the whole file, with the first bad line before them, as a whole read would."""
    f = part.file
    produced = has_text = False
    columns: set[str] = set()
    for offset, lineno, raw in numbered_lines(fs, f.full, part.start, lines_before(part), part.end):
        owned = offset < part.end
        if not owned and (part.index > 0 or has_text):
            return
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        value = json_object(line, f"{f.shown} line {lineno}", InputError)
        produced = True
        has_text = has_text or spec.text_column in value
        if not has_text and len(columns) < 200:
            columns.update(value)
        if owned:
            yield value, f"{f.rel}:{lineno}"
    if part.index > 0:
        return
    if not produced:
        raise InputError(f"{f.shown}: no rows (only blank lines)")
    if not has_text:
        raise InputError(f"{f.shown}: text column {spec.text_column!r} not found; columns are {sorted(columns)}; "
                         f"choose one with --text-column")


def _table_records(part: Part, fs: pafs.FileSystem, spec: InputSpec) -> Iterator[Record]:
    """csv (every value a string: ids like "007" keep their zeros; rows numbered as lines, from 2) or parquet
    (the part's row groups, numbered from the file's first row)."""
    f = part.file
    first = 2 if f.kind == "csv" else 1
    n = 0
    try:
        batches = _csv_batches(f, fs) if f.kind == "csv" else _parquet_batches(part, fs)
        schema, total = next(batches)
        if spec.text_column not in schema.names:
            raise InputError(f"{f.shown}: text column {spec.text_column!r} not found; columns are {schema.names}; "
                             f"choose one with --text-column")
        for before, batch in batches:
            for i, values in enumerate(batch.to_pylist()):
                yield values, f"{f.rel}:{before + i + first}"
            n += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{f.shown}: cannot read {f.kind}: {one_line(exc)}") from None
    if part.index == 0 and (n if total is None else total) == 0:
        raise InputError(f"{f.shown}: no rows")


def _csv_batches(f: InputFile, fs: pafs.FileSystem) -> Iterator:
    """(the schema, None), then (rows before, record batch), streamed."""
    with fs.open_input_stream(f.full) as stream:
        head = stream.read(1 << 16).decode("utf-8", errors="replace").splitlines()
    header = head[0].strip() if head else ""
    names = next(iter(csv.reader([header])), [])
    options = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
    with fs.open_input_stream(f.full) as stream:
        reader = pacsv.open_csv(stream, convert_options=options)
        yield reader.schema, None
        before = 0
        for batch in reader:
            yield before, batch
            before += batch.num_rows


def _parquet_batches(part: Part, fs: pafs.FileSystem) -> Iterator:
    """(the schema, the file's rows), then (rows of the file before, record batch) of the part's row groups."""
    with fs.open_input_file(part.file.full) as stream:
        parquet = pq.ParquetFile(stream)
        yield parquet.schema_arrow, parquet.metadata.num_rows
        for group, before in row_groups(parquet.metadata, part):
            for batch in parquet.iter_batches(batch_size=4096, row_groups=[group]):
                yield before, batch
                before += batch.num_rows


def _text_problems(value: Any, spec: InputSpec) -> tuple[str, list[str]]:
    name = spec.text_column
    if value is None:
        return "", [f"{name} is null"]
    if not isinstance(value, str):
        return "", [f"{name} is not a string (got {type(value).__name__})"]
    if not value.strip():
        return value, [f"{name} is empty"]
    if len(value) > spec.max_chars:
        return value[: spec.max_chars], [f"{name} truncated from {len(value)} to {spec.max_chars} characters"]
    return value, []


def _column(values: list[Any]) -> pa.Array:
    """One column; values of mixed types (across jsonl lines) or nested ones are kept as JSON text."""
    try:
        array = pa.array(values)
        if not pa.types.is_struct(array.type) and not pa.types.is_list(array.type):
            return array
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                     for v in values], type=pa.string())


def _normalize(block: list[Record], spec: InputSpec, where: bool, *, document: bool = False) -> pa.Table:
    """Rows to one Arrow table: every column, then the text column, ``id`` and ``errors`` (and ``_where``)."""
    records = []
    for values, at in block:
        values = dict(values)
        note = values.pop("_note", None)
        if document:
            values[spec.text_column] = values.pop("_text")
            rid = values[ID]
        else:
            user_id = values.get(spec.id_column)
            rid = at if user_id is None else str(user_id)
        text, errors = _text_problems(values.get(spec.text_column), spec)
        if note:
            errors = [note] if document and not text else errors + [note]
        given = values.get(ERRORS)
        values[spec.text_column], values[ID] = text, rid
        values[ERRORS] = errors + list(given) if isinstance(given, list) else errors
        records.append(values)
    names: list[str] = []
    for r in records:
        names.extend(k for k in r if k not in names)
    columns = {n: _column([r.get(n) for r in records]) for n in names if n not in (ID, ERRORS, spec.text_column)}
    columns[spec.text_column] = pa.array([r[spec.text_column] for r in records], type=pa.string())
    columns[ID] = pa.array([r[ID] for r in records], type=pa.string())
    columns[ERRORS] = pa.array([r[ERRORS] for r in records], type=pa.list_(pa.string()))
    if where:
        columns[WHERE] = pa.array([at for _, at in block], type=pa.string())
    return pa.table(columns)


def column_types(table: pa.Table, spec: InputSpec) -> dict[str, str]:
    """The types of a block's other columns (not the text, ``id``, ``errors``): what the pre-pass collects."""
    return {f.name: str(f.type) for f in table.schema if f.name not in (spec.text_column, ID, ERRORS, WHERE)}


def merge_types(found: Iterator[dict[str, str]]) -> dict[str, str]:
    """One type per column over many blocks: the same type stays, int and float make float, null gives way,
    anything else is kept as JSON text (as mixed values within a block are)."""
    out: dict[str, str] = {}
    for types in found:
        for name, kind in types.items():
            before = out.get(name)
            if before in (None, "null"):
                out[name] = kind
            elif kind not in ("null", before):
                out[name] = "double" if {before, kind} <= {"int64", "double"} else "string"
    return out


def conform(table: pa.Table, types: dict[str, str] | None) -> pa.Table:
    """``table`` with ``types``' columns in that order and of those types (missing ones null), then its own."""
    if not types:
        return table
    columns = {}
    for name, kind in types.items():
        try:
            target = pa.string() if kind == "string" else pa.null() if kind == "null" else pa.type_for_alias(kind)
        except ValueError:  # a type without an alias (decimal, zoned timestamp): parquet keeps it per file
            continue
        if name not in table.column_names:
            columns[name] = pa.nulls(table.num_rows, target)
            continue
        column = table.column(name)
        if column.type == target:
            columns[name] = column
        elif kind == "string":
            columns[name] = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v)
                                      for v in column.to_pylist()], pa.string())
        else:
            columns[name] = column.cast(target)
    rest = {n: table.column(n) for n in table.column_names if n not in columns}
    return pa.table({**columns, **rest})
