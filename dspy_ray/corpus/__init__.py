"""The corpus reader both pipelines share: tables (parquet, jsonl, csv) and documents (txt, md, rst, html, pdf,
docx, eml), files or folders, on local disk or object storage, read on the Ray Data workers.

One module per step:

* :mod:`~dspy_ray.corpus.spec` — :class:`InputSpec` (what to read), :class:`InputError`, the formats;
* :mod:`~dspy_ray.corpus.listing` — :func:`discover`: the files, on the driver (names and sizes only);
* :mod:`~dspy_ray.corpus.rows` — one file to normalized rows (ids, ``errors``), a block at a time;
* :mod:`~dspy_ray.corpus.split` — a large jsonl or parquet file in ranges, one per read task (the same rows);
* :mod:`~dspy_ray.corpus.source` — :func:`corpus_dataset`: a Ray Data datasource whose read tasks run
  :mod:`~dspy_ray.corpus.rows` on the workers;
* :mod:`~dspy_ray.corpus.precheck` — :func:`precheck`: the validation pre-pass on the workers;
* :mod:`~dspy_ray.corpus.local` — :func:`read_table`: a small corpus (or ``--limit`` rows) in one table;
* :mod:`~dspy_ray.corpus.documents` — a file's bytes to documents (text, blocks, headings), for the index
  and for a folder of documents given to the batch pipeline.

    >>> spec = InputSpec("inbox/", text_column="text")               # doctest: +SKIP
    >>> found = discover(spec)                                      # doctest: +SKIP
    >>> checked = precheck(found, spec)                             # doctest: +SKIP
    >>> ds = corpus_dataset(found, spec, rows_per_block=64)         # doctest: +SKIP
"""

from dspy_ray.corpus.listing import InputFile, InputFiles, discover
from dspy_ray.corpus.spec import (
           DOCUMENTS,
           ERRORS,
           ID,
           SUPPORTED,
           TABLE_FORMATS,
           InputError,
           InputSpec,
)

__all__ = ["DOCUMENTS", "ERRORS", "ID", "SUPPORTED", "TABLE_FORMATS", "InputError", "InputFile", "InputFiles",
           "InputSpec", "discover"]
