"""Read a small corpus, or the first ``--limit`` rows of a large one, into one table in this process.

For what is small by nature (a questions file, a ``--limit 5`` trial run): the same rows the workers
read, the same problems raised, duplicate ids checked here.  A whole corpus goes through
:func:`dspy_ray.corpus.source.corpus_dataset` instead.
"""

from __future__ import annotations

import pyarrow as pa

from dspy_ray.corpus.listing import InputFiles
from dspy_ray.corpus.rows import (
    WHERE,
    column_types,
    conform,
    documents_rows,
    file_rows,
    merge_types,
)
from dspy_ray.corpus.spec import DOCUMENTS, ID, InputError, InputSpec

BLOCK = 1 << 30  # one block per file: types are inferred over the whole file, as the readers always did


def read_table(found: InputFiles, spec: InputSpec) -> pa.Table:
    """Every row (at most ``spec.limit``), in path order; :class:`InputError` on a bad file or duplicate id."""
    blocks, rows = [], 0
    if found.format == DOCUMENTS:
        files = found.files[: spec.limit] if spec.limit else found.files
        blocks = list(documents_rows(files, found.fs, spec, BLOCK, where=True))
    else:
        for f in found.files:
            for block in file_rows(f, found.fs, spec, BLOCK if spec.limit is None else spec.limit, where=True):
                blocks.append(block)
                rows += block.num_rows
                if spec.limit is not None and rows >= spec.limit:
                    break
            if spec.limit is not None and rows >= spec.limit:
                break
    types = merge_types(column_types(b, spec) for b in blocks)
    table = pa.concat_tables([conform(b, types) for b in blocks], promote_options="permissive")
    if spec.limit is not None:
        table = table.slice(0, spec.limit)
    _check_unique(table, spec)
    return table.drop_columns([WHERE])


def _check_unique(table: pa.Table, spec: InputSpec) -> None:
    seen: dict[str, str] = {}
    for rid, where in zip(table.column(ID).to_pylist(), table.column(WHERE).to_pylist()):
        if rid in seen:
            raise InputError(f"duplicate id {rid!r} at {seen[rid]} and {where}; ids must be unique "
                             f"(fix the data, or drop the {spec.id_column!r} column to generate ids)")
        seen[rid] = where
