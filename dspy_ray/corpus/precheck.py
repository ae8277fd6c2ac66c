"""The validation pre-pass: the whole corpus read on the workers, no LM, before the first LM call.

Each read task reports, per file (or per range of a large file: the run's own plan, see
:mod:`~dspy_ray.corpus.split`), its rows, the rows with problems, and the first problem that makes
the file unusable (broken JSON line, missing text column, no rows ...); the ids the data gives are
hash-partitioned into buckets and each bucket counted by its own task, so no process holds every id
(plain Ray tasks over the run's own read tasks: no shuffle operator to start for a small corpus).  The driver
sees one row per file and the ids that occur twice::

    >>> checked = precheck(discover(spec), spec)     # doctest: +SKIP   (raises InputError on bad input)
    >>> checked.rows, checked.rows_with_errors, checked.unreadable[:1]   # doctest: +SKIP
    (2000000, 12, ['scans/0001.pdf: no text layer on any of its 3 pages (a scan? run OCR on it first)'])
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dspy_ray.corpus.listing import InputFiles
from dspy_ray.corpus.quickcheck import jsonl_check
from dspy_ray.corpus.rows import (
    WHERE,
    column_types,
    documents_rows,
    file_rows,
    merge_types,
)
from dspy_ray.corpus.source import plan_groups, read_parallelism
from dspy_ray.corpus.spec import DOCUMENTS, ERRORS, ID, InputError, InputSpec
from dspy_ray.corpus.split import Part, number_lines

CHECK_SCHEMA = pa.schema([("file", pa.string()), (ID, pa.string()), ("where", pa.string()), ("rows", pa.int64()),
                          ("with_errors", pa.int64()), ("problem", pa.string()), ("note", pa.string()),
                          ("types", pa.string()), ("part", pa.int64())])
SHOWN = 20  # unreadable documents listed by name; the rest are counted


@dataclass
class Checked:
    rows: int
    rows_with_errors: int
    unreadable: list[str] = field(default_factory=list)  # "file: why" of documents that gave no text
    unreadable_count: int = 0
    types: dict[str, str] = field(default_factory=dict)  # the other columns' types over the corpus (merge_types)


def _check_table(file: str, rows: int, with_errors: int, problem: str | None = None, note: str | None = None,
                 ids: pa.Array | None = None, where: pa.Array | None = None, types: dict | None = None,
                 part: int = 0) -> pa.Table:
    """One file's (or part's) summary row (``ids`` None), or the given ids of a block."""
    if ids is not None:
        n = len(ids)
        return pa.table([pa.array([file] * n, pa.string()), ids, where, pa.nulls(n, pa.int64()),
                         pa.nulls(n, pa.int64()), pa.nulls(n, pa.string()), pa.nulls(n, pa.string()),
                         pa.nulls(n, pa.string()), pa.nulls(n, pa.int64())], schema=CHECK_SCHEMA)
    return pa.table([[file], [None], [None], [rows], [with_errors], [problem], [note],
                     [json.dumps(types or {})], [part]], schema=CHECK_SCHEMA)


def check_rows(parts: list[Part], fmt: str, fs: pafs.FileSystem, spec: InputSpec,
               rows_per_block: int) -> Iterator[pa.Table]:
    """What a pre-pass read task yields: the ids the data gives, and a summary row per file or part."""
    if fmt == DOCUMENTS:
        for block in documents_rows([p.file for p in parts], fs, spec, rows_per_block):
            for rid, errors in zip(block.column(ID).to_pylist(), block.column(ERRORS).to_pylist()):
                yield _check_table(rid, 1, int(bool(errors)), note="; ".join(errors) if errors else None)
        return
    for part in parts:
        f = part.file
        quick = jsonl_check(part, fs, spec) if f.kind == "jsonl" else None
        if quick is not None:
            if len(quick.ids):
                yield _check_table(f.rel, 0, 0, ids=quick.ids, where=quick.where)
            yield _check_table(f.rel, quick.rows, quick.with_errors, types=quick.types, part=part.index)
            continue
        rows = with_errors = 0
        types: dict[str, str] = {}
        try:
            for block in file_rows(part, fs, spec, rows_per_block, where=True):
                types = merge_types([types, column_types(block, spec)])
                rows += block.num_rows
                with_errors += pc.sum(pc.greater(pc.list_value_length(block.column(ERRORS)), 0)).as_py() or 0
                given = pc.not_equal(block.column(ID), block.column(WHERE))  # generated ids are unique by design
                if pc.any(given).as_py():
                    picked = block.filter(given)
                    yield _check_table(f.rel, 0, 0, ids=picked.column(ID).combine_chunks(),
                                       where=picked.column(WHERE).combine_chunks())
        except InputError as exc:
            yield _check_table(f.rel, rows, with_errors, problem=str(exc), part=part.index)
            continue
        yield _check_table(f.rel, rows, with_errors, types=types, part=part.index)


BYTES_PER_BUCKET = 512 << 20  # input bytes per id bucket: each bucket's ids are counted by one task


def bucket_of(ids: pa.Array, buckets: int) -> pa.Array:
    """Each id's hash bucket: crc32 of its UTF-8 bytes modulo ``buckets`` (the same in every process)."""
    return pa.array([zlib.crc32(i.encode()) % buckets for i in ids.to_pylist()], pa.int64())


def _check_group(parts: list[Part], fmt: str, fs: pafs.FileSystem, spec: InputSpec, buckets: int):
    """A read task's check: its files' summary rows, then its given ids cut into ``buckets`` by hash."""
    tables = list(check_rows(parts, fmt, fs, spec, 4096))
    table = pa.concat_tables(tables) if tables else CHECK_SCHEMA.empty_table()
    summary = table.filter(pc.is_null(table.column(ID)))
    ids = table.filter(pc.is_valid(table.column(ID))).select(["file", ID, "where"])
    if buckets == 1:
        return summary, ids
    bucket = bucket_of(ids.column(ID).combine_chunks(), buckets)
    return (summary, *[ids.filter(pc.equal(bucket, b)) for b in range(buckets)])


def _twice(*tables: pa.Table) -> list[dict]:
    """One bucket's ids from every read task: the places of the first id seen twice ([] when none is)."""
    ids = pa.concat_tables(tables)
    counts = ids.group_by(ID).aggregate([(ID, "count")])
    repeated = counts.filter(pc.greater(counts.column(f"{ID}_count"), 1))
    if not repeated.num_rows:
        return []
    rid = repeated.column(ID)[0].as_py()
    return ids.filter(pc.equal(ids.column(ID), rid)).to_pylist()


def precheck(found: InputFiles, spec: InputSpec, *, split_bytes: int | None = None,
             min_split_bytes: int | None = None) -> Checked:
    """Read the corpus once on the workers (plain Ray tasks, one per read task of the run: ``split_bytes``,
    ``min_split_bytes`` as :func:`~dspy_ray.corpus.source.plan_groups`); raises :class:`InputError` for the
    first unusable file (in path order; a file's first problem in line order) or a duplicate id, naming
    file and line.

    The given ids are hash-partitioned into buckets (one per 512 MB of input) and each bucket counted by
    its own task, so no process holds every id of a large corpus."""
    import ray

    buckets = max(1, min(256, -(-found.bytes // BYTES_PER_BUCKET)))
    check = ray.remote(_check_group).options(num_returns=buckets + 1)
    groups = number_lines(plan_groups(found, read_parallelism(64), split_bytes=split_bytes,
                                      min_split_bytes=min_split_bytes),
                          found.fs)
    outs = [check.remote(group, found.format, found.fs, spec, buckets) for group in groups]
    summaries = [row for out in outs for row in ray.get(out[0]).to_pylist()]
    order = {f.rel: i for i, f in enumerate(found.files)}
    summaries.sort(key=lambda r: (order.get(r["file"], -1), r["part"]))
    bad = _first_problems(summaries)
    if bad:
        more = f" (and {len(bad) - 1} more files with problems)" if len(bad) > 1 else ""
        raise InputError(bad[0]["problem"] + more)
    if found.format != DOCUMENTS:  # a document's id is its path: unique
        count = ray.remote(_twice)
        for places in ray.get([count.remote(*[out[1 + b] for out in outs]) for b in range(buckets)]):
            if places:
                _raise_duplicate(places, order, spec)
    notes = [r for r in summaries if r["note"]]
    return Checked(rows=sum(r["rows"] for r in summaries), rows_with_errors=sum(r["with_errors"] for r in summaries),
                   unreadable=[f"{r['file']}: {r['note']}" for r in notes[:SHOWN]], unreadable_count=len(notes),
                   types=merge_types(json.loads(r["types"] or "{}") for r in summaries))


def _first_problems(summaries: list[dict]) -> list[dict]:
    """Each file's first problem (its parts in order: the first part's is the earliest line)."""
    bad: dict[str, dict] = {}
    for r in summaries:
        if r["problem"] and r["file"] not in bad:
            bad[r["file"]] = r
    return list(bad.values())


def _raise_duplicate(places: list[dict], order: dict[str, int], spec: InputSpec) -> None:
    def key(row):
        _, _, line = row["where"].rpartition(":")
        return order.get(row["file"], -1), int(line) if line.isdigit() else 0

    first, second = sorted(places, key=key)[:2]
    raise InputError(f"duplicate id {first[ID]!r} at {first['where']} and {second['where']}; ids must be unique "
                     f"(fix the data, or drop the {spec.id_column!r} column to generate ids)")
