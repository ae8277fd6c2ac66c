"""Read a file of records (jsonl, csv, parquet): one document per record, bad records named and skipped.

    >>> raw = b'{"id": "SB-1", "title": "Road closure", "text": "Quay Street is closed."}\\n{"text": ""}\\n'
    >>> docs, problems = read_records("bulletins.jsonl", "jsonl", raw, RecordColumns())
    >>> [(d.source, d.title) for d in docs], [str(p) for p in problems]
    ([('bulletins.jsonl#SB-1', 'Road closure')], ["bulletins.jsonl#2: text column 'text' is empty; record skipped"])

A record's text is its text column, split into blocks as plain text; its title is the title column,
else its id; its id is the id column, else its line (jsonl) or row number (csv from 2, parquet from 1).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator

from dspy_ray.corpus.documents.base import Document, Problem, RecordColumns
from dspy_ray.corpus.documents.blocks import split_blocks
from dspy_ray.corpus.documents.text import decode_utf8

Rows = Iterator[tuple[str, dict]]  # (row label, values) per record


class _FileProblem(Exception):
    """The whole file cannot be read: one file problem, no documents."""


def read_records(path: str, kind: str, raw: bytes, columns: RecordColumns = RecordColumns()
                 ) -> tuple[list[Document], list[Problem]]:
    """The documents of a jsonl / csv / parquet file, and the problems met (a bad file is one problem)."""
    problems: list[Problem] = []
    try:
        rows = list(ROW_READERS[kind](path, raw, problems))
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


def jsonl_rows(path: str, raw: bytes, problems: list[Problem]) -> Rows:
    """One record per non-blank line; a broken line is a record problem, bytes that are not UTF-8 a file one."""
    text, problem = decode_utf8(raw)
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


def csv_rows(path: str, raw: bytes, problems: list[Problem]) -> Rows:
    """One record per row under the header line, every value a string; rows numbered as lines, from 2."""
    text, problem = decode_utf8(raw)
    if problem:
        raise _FileProblem(problem)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for rowno, values in enumerate(reader, 2):
            extra = values.pop(None, None)  # DictReader files fields beyond the header under the key None
            if extra is not None:
                problems.append(Problem(f"{path}:{rowno}", f"{len(reader.fieldnames) + len(extra)} fields, the "
                                        f"header has {len(reader.fieldnames)}; row skipped", "record"))
                continue
            yield str(rowno), values
    except csv.Error as exc:
        raise _FileProblem(f"cannot read CSV ({exc})") from None


def parquet_rows(path: str, raw: bytes, problems: list[Problem]) -> Rows:
    """One record per row, numbered from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowInvalid, OSError) as exc:
        raise _FileProblem(f"cannot read parquet ({' '.join(str(exc).split())[:200]})") from None
    for rowno, values in enumerate(table.to_pylist(), 1):
        yield str(rowno), values


ROW_READERS: dict[str, Callable[[str, bytes, list[Problem]], Rows]] = {
    "jsonl": jsonl_rows, "csv": csv_rows, "parquet": parquet_rows}
