"""The batch pipeline's input: the shared corpus reader (:mod:`dspy_ray.corpus`), and two small helpers.

A run reads its corpus on the Ray Data workers (:func:`dspy_ray.corpus.source.corpus_dataset`, with the
pre-pass :func:`dspy_ray.corpus.precheck.precheck` before any LM call).  :func:`load_corpus` reads a
small corpus into one table in this process (a questions file, ``--limit`` rows), with the same rows
and the same :class:`InputError`\\ s::

    >>> table = load_corpus(InputSpec("data/sample_calls.jsonl", text_column="transcript"))  # doctest: +SKIP
    >>> table.column_names[-1]                                                              # doctest: +SKIP
    'errors'
"""

from __future__ import annotations

import pyarrow as pa

from dspy_ray.corpus import ERRORS, ID, TABLE_FORMATS, InputError, InputSpec, discover
from dspy_ray.corpus.documents.base import DOCUMENT_KINDS
from dspy_ray.corpus.local import read_table

FORMATS = {**TABLE_FORMATS, **DOCUMENT_KINDS}

__all__ = ["ERRORS", "FORMATS", "ID", "InputError", "InputSpec", "load_corpus", "to_dataset"]


def load_corpus(spec: InputSpec) -> pa.Table:
    """Read, validate and normalize a small input in this process; raises InputError for file-level problems."""
    return read_table(discover(spec), spec)


def to_dataset(table: pa.Table, *, rows_per_block: int = 64):
    """``ray.data.from_arrow`` cut into blocks of about ``rows_per_block`` rows, so actors share the work
    (for a table that is small by nature: ``--limit`` rows, the passages of a small index)."""
    import ray

    blocks = [table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)]
    return ray.data.from_arrow(blocks)
