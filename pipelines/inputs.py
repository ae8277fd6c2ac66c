"""Read and validate a corpus on the driver, before any LM call.

Accepted: a parquet / jsonl (.jsonl, .ndjson, .json lines) / csv file, a folder
of such files (one format), or a folder of ``.txt`` documents (one row each).
Problems that would make the run meaningless raise :class:`InputError` naming
the file (and line); problems of a single row become entries in its ``errors``.

    >>> table = load_corpus(InputSpec("data/sample_calls.jsonl"))     # doctest: +SKIP
    >>> table.column_names[-1]                                         # doctest: +SKIP
    'errors'
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dspy_ray.util.fs import filesystem_for, is_uri, json_lines, list_files
from dspy_ray.util.cli import EXIT_USAGE

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
           ".txt": "txt"}
ID, ERRORS = "id", "errors"


class InputError(ValueError):
    """Bad input found before any LM call; the message names the file and what to do."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


@dataclass(frozen=True)
class InputSpec:
    path: str
    text_column: str = "text"
    id_column: str = "id"
    limit: int | None = None
    max_chars: int = 20_000  # longer texts are truncated, and the row's errors say so


@dataclass
class _Row:
    values: dict[str, Any]
    where: str  # "file:line" for messages and generated ids


def discover(path: str) -> tuple[str, list[Path], Path]:
    """(format, files in sorted order, root used for relative names).

    In a folder, the files in it and its sub-folders (not linked ones) count, but those named ``.*`` or ``_*``.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"input not found: {path}")
    if root.is_file():
        fmt = FORMATS.get(root.suffix.lower())
        if fmt is None:
            raise InputError(f"{root}: unknown input format {root.suffix or '(no extension)'!r}; "
                             f"supported: {', '.join(sorted(FORMATS))}")
        return fmt, [root], root.parent
    try:
        listing = list_files(*filesystem_for(root), hidden="name", suffixes=FORMATS, follow_links=False)
    except OSError as exc:
        raise InputError(f"{root}: cannot list ({' '.join(str(exc).split())[:300]})") from None
    # Path order (component by component), as this reader has always sorted: "a/b.txt" before "a.txt".
    usable = sorted(root / f.path for f in listing.files)
    if not usable:
        raise InputError(f"{root}: no input files found; supported extensions: {', '.join(sorted(FORMATS))}")
    kinds = {FORMATS[p.suffix.lower()]: p for p in usable}
    if len(kinds) > 1:
        a, b = list(kinds.values())[:2]
        raise InputError(f"{root}: mixes input formats ({a.name} and {b.name}); use one format per folder")
    return next(iter(kinds)), usable, root


def _read_jsonl(path: Path, rel: str) -> Iterator[_Row]:
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, value in json_lines(f, str(path), InputError):
            yield _Row(value, f"{rel}:{lineno}")


def _read_table(path: Path, fmt: str) -> pa.Table:
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        # Strings everywhere: ids like "007" keep their zeros; types are the program's business.
        with path.open("rb") as f:
            header = f.readline().decode("utf-8", errors="replace").strip()
        names = next(iter(csv.reader([header])), [])
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot read {fmt}: {' '.join(str(e).split())[:300]}") from None


def _rows(fmt: str, files: list[Path], root: Path, spec: InputSpec) -> Iterator[_Row]:
    for path in files:
        rel = path.name if len(files) == 1 and path.parent == root else str(path.relative_to(root))
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty")
        if fmt == "txt":
            raw = path.read_bytes()
            try:
                text, note = raw.decode("utf-8"), None
            except UnicodeDecodeError:
                text, note = raw.decode("utf-8", errors="replace"), "document is not valid UTF-8; bad bytes replaced"
            yield _Row({ID: rel, spec.text_column: text, "source_file": rel, "_note": note}, rel)
            continue
        if fmt == "jsonl":
            produced = False
            for row in _read_jsonl(path, rel):
                produced = True
                yield row
            if not produced:
                raise InputError(f"{path}: no rows (only blank lines)")
            continue
        table = _read_table(path, fmt)
        if table.num_rows == 0:
            raise InputError(f"{path}: no rows")
        if spec.text_column not in table.column_names:
            raise InputError(f"{path}: text column {spec.text_column!r} not found; columns are "
                             f"{table.column_names}; choose one with --text-column")
        for i, values in enumerate(table.to_pylist(), 1):
            yield _Row(values, f"{rel}:{i + (1 if fmt == 'csv' else 0)}")


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


def load_corpus(spec: InputSpec) -> pa.Table:
    """Read, validate and normalize the input; raises InputError for file-level problems.

    An object-store URI (``s3://bucket/calls/``) is copied to a local temporary
    folder first (the corpus is read on the driver either way); messages name the URI.
    """
    if not is_uri(spec.path):
        return _load_local(spec)
    import dataclasses
    import tempfile

    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        local = stage_uri(spec.path, tmp)
        try:
            return _load_local(dataclasses.replace(spec, path=local))
        except InputError as exc:
            raise InputError(str(exc).replace(local, spec.path.rstrip("/"))) from None


def stage_uri(uri: str, tmp: str) -> str:
    """Copy a file or folder at ``uri`` into ``tmp``; the local path that mirrors it."""
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem_for(uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{uri}: cannot open ({' '.join(str(exc).split())[:300]})") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    name = info.base_name or "corpus"
    local = str(Path(tmp) / name)
    try:
        if info.type == pafs.FileType.Directory:
            Path(local).mkdir()
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as exc:
        raise InputError(f"{uri}: cannot read ({' '.join(str(exc).split())[:300]})") from None
    return local


def _load_local(spec: InputSpec) -> pa.Table:
    fmt, files, root = discover(spec.path)
    rows: list[_Row] = []
    for row in _rows(fmt, files, root, spec):
        rows.append(row)
        if spec.limit is not None and len(rows) >= spec.limit:
            break
    if fmt == "jsonl" and not any(spec.text_column in r.values for r in rows):
        found = sorted({k for r in rows[:100] for k in r.values})
        raise InputError(f"{files[0] if len(files) == 1 else root}: text column {spec.text_column!r} not found; "
                         f"columns are {found}; choose one with --text-column")
    seen: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for row in rows:
        values = dict(row.values)
        note = values.pop("_note", None)
        user_id = values.get(spec.id_column)
        if user_id is not None and fmt != "txt":
            rid = str(user_id)
            if rid in seen:
                raise InputError(f"duplicate id {rid!r} at {seen[rid]} and {row.where}; ids must be unique "
                                 f"(fix the data, or drop the {spec.id_column!r} column to generate ids)")
            seen[rid] = row.where
        else:
            rid = values.get(ID) if fmt == "txt" else row.where
        text, errors = _text_problems(values.get(spec.text_column), spec)
        if note:
            errors.append(note)
        values[spec.text_column] = text
        values[ID] = rid
        values[ERRORS] = errors + list(values.get(ERRORS) or []) if isinstance(values.get(ERRORS), list) else errors
        records.append(values)
    names: list[str] = []
    for r in records:
        names.extend(k for k in r if k not in names)
    columns = {n: _column([r.get(n) for r in records]) for n in names if n not in (ID, ERRORS, spec.text_column)}
    columns[spec.text_column] = pa.array([r[spec.text_column] for r in records], type=pa.string())
    columns[ID] = pa.array([r[ID] for r in records], type=pa.string())
    columns[ERRORS] = pa.array([r[ERRORS] for r in records], type=pa.list_(pa.string()))
    return pa.table(columns)


def to_dataset(table: pa.Table, *, rows_per_block: int = 64):
    """``ray.data.from_arrow`` cut into blocks of about ``rows_per_block`` rows, so actors share the work."""
    import ray

    blocks = [table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)]
    return ray.data.from_arrow(blocks)
