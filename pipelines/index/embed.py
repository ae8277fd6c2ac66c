"""Step 3 of a build: embed the passages whose text has no vector in the embedding store yet.

What to embed is planned here from the passage parts' ``hash`` columns only (:func:`plan_embedding`:
each hash the store lacks, at its first row); Ray tasks read those rows' texts from the parts
(:func:`~pipelines.index.parts.embedding_rows`) and feed a Ray Data actor pool (:mod:`stages.embed`),
many requests in flight.  Each actor writes its batch's vectors to the embedding store as one whole
shard before it hands the batch on (:class:`~dspy_ray.retrieval.store.ShardSink`), so neither a text
nor a vector comes to this process: only (hash, error) rows, for the progress line and the failures;
a killed build loses only the batches in flight.  An index folder the workers cannot open (an
in-process ``memory://`` store) has its texts read and its vectors written here instead, in shards
of ``--shard-rows``.  A passage whose embedding fails after retries is recorded with its error (left
out of the index, retried by the next ``--resume``)::

    >>> step = EmbedStep(options, IndexDir.at(options.index), summary, say)       # doctest: +SKIP
    >>> result = step.run(read.parts, settings, dim=384)                          # doctest: +SKIP
    >>> len(result.embedded), result.failures                                     # doctest: +SKIP
    (463, {})
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dspy_ray.client.embeddings import EmbeddingConfigError
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.retrieval.manifest import BUILD_STATE
from dspy_ray.retrieval.store import (
    EmbeddingStore,
    ShardSink,
    StoreNotSharedError,
    StoreWriter,
    as_matrix,
    workers_reach,
)
from dspy_ray.util.fs import write_bytes
from pipelines.index.base import IndexDir, IndexOptions, IndexSummary, now
from pipelines.index.parts import PassageParts, embedding_rows


@dataclass
class Embedded:
    """What the embedding step did: the hashes embedded now, and hash -> error for those that failed."""

    embedded: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class EmbeddingPlan:
    """What to embed: each hash the store lacks once, as rows of the parts (row numbers within each part)."""

    hashes: pa.Array
    rows: list[tuple[str, np.ndarray]]  # (part, its rows to embed, sorted), parts in order

    def items(self, per_block: int) -> list[tuple[str, np.ndarray]]:
        """(part, rows) of at most ``per_block`` rows each: the embedding dataset's blocks."""
        return [(path, rows[i:i + per_block]) for path, rows in self.rows for i in range(0, len(rows), per_block)]


def plan_embedding(parts: PassageParts, done: set[str]) -> EmbeddingPlan:
    """The rows to embed: of each hash not in ``done``, its first row; from the parts' hash columns only."""
    hashes = parts.column("hash")
    table = pa.table({"hash": hashes, "row": pa.array(np.arange(len(hashes), dtype=np.int64))})
    if done:
        table = table.filter(pc.invert(pc.is_in(table.column("hash"), value_set=pa.array(list(done), pa.string()))))
    first = table.group_by("hash", use_threads=False).aggregate([("row", "min")])
    order = pc.sort_indices(first.column("row_min"))
    first = first.take(order)
    rows = first.column("row_min").to_numpy()
    starts = np.cumsum([0, *parts.counts])
    of = np.searchsorted(starts, rows, side="right") - 1  # the part of each row
    cuts = np.searchsorted(of, np.arange(len(parts.paths) + 1))
    planned = [(path, rows[cuts[i]:cuts[i + 1]] - starts[i]) for i, path in enumerate(parts.paths)
               if cuts[i + 1] > cuts[i]]
    return EmbeddingPlan(first.column("hash").combine_chunks(), planned)


class EmbedStep:
    def __init__(self, options: IndexOptions, index: IndexDir, summary: IndexSummary, say: Callable[[str], None]):
        self.options, self.index, self.summary, self.say = options, index, summary, say

    def run(self, parts: PassageParts, settings: EndpointSettings, dim: int) -> Embedded:
        """Embed what the store lacks, after recording this build's settings (``build.json``) for ``--resume``."""
        store = EmbeddingStore(self.index.location)
        store.drop_partial()  # what a killed build's writers left half-written
        done = store.hashes()
        plan = plan_embedding(parts, done)
        run = self._write_build_state(settings, dim)
        if not len(plan.hashes):
            return Embedded()
        self.say(f"embedding {len(plan.hashes):,} passages ({len(done):,} already in the store) "
                 f"with {settings.model!r}")
        return Embedded(plan.hashes, self._run_stage(store, plan, settings, dim, run))

    def _write_build_state(self, settings: EndpointSettings, dim: int) -> str:
        """Write ``build.json``; its ``run`` token (actors check they see this very file: a shared folder)."""
        run = uuid.uuid4().hex
        write_bytes(self.index.fs, self.index.path(BUILD_STATE), json.dumps({
            "embedder": {"model": settings.model, "dim": dim, "query_prefix": settings.query_prefix,
                         "passage_prefix": settings.passage_prefix},
            "chunking": self.options.chunking.model_dump(), "corpus": self.options.corpus,
            "started_at": now(), "run": run}, indent=2).encode())
        return run

    def _run_stage(self, store: EmbeddingStore, plan: EmbeddingPlan, settings: EndpointSettings,
                   dim: int, run: str) -> dict[str, str]:
        """hash -> error for the passages that failed; the others' vectors are in the store."""
        import ray

        from dspy_ray.util.ray_runtime import init_ray

        init_ray()
        ray.data.DataContext.get_current().enable_progress_bars = False  # _Progress prints one line instead
        stage = self.options.stage
        total = len(plan.hashes)
        # One actor batch per block: Ray Data hands a block's results back when the whole block is done,
        # so smaller blocks mean a steadier stream of results (and of progress) from a slow endpoint.
        per_block = max(1, min(stage.batch_size, -(-total // (2 * stage.num_actors))))
        budget = min(stage.max_in_flight_per_actor, max(1, settings.max_in_flight // stage.num_actors))
        # The workers read the texts and the actors write the store unless the index folder lives in this
        # process only; then the texts are read here and the vectors come back here.
        shared = workers_reach(self.index.location)
        sink = ShardSink.config(self.index.location, dim, self.options.shard_rows, run) if shared else None
        ds = stage.apply(self._texts(plan, per_block, shared), settings, max_in_flight=budget, store=sink)
        progress = _Progress(total, self.say)
        try:
            with store.writer(dim, self.options.shard_rows) as writer:
                failures = self._collect(ds, writer, dim, progress)
        except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's exception; surface a config error plainly
            cause = _config_cause(exc)
            if cause is not None:
                raise cause from None
            raise
        store.drop_partial()  # a batch whose actor was lost mid-write was done again, by another actor
        self.summary.embed_seconds = time.perf_counter() - progress.start
        progress.update(progress.seen, len(failures), final=True)
        return failures

    def _texts(self, plan: EmbeddingPlan, per_block: int, shared: bool):
        """The stage's input (``hash``, ``embedding_text``) as a dataset of ``per_block`` rows a block: read
        from the parts by Ray tasks (``shared``), else here."""
        import ray

        from pipelines.inputs import to_dataset

        location = self.index.location
        items = plan.items(per_block)
        if not shared:
            return to_dataset(pa.concat_tables([embedding_rows(location, path, rows) for path, rows in items]),
                              rows_per_block=per_block)
        blocks = [pa.table({"part": [path], "rows": pa.array([rows], pa.list_(pa.int64()))}) for path, rows in items]
        return ray.data.from_arrow(blocks).map_batches(
            _read_texts, fn_kwargs={"location": location}, batch_size=None, batch_format="pyarrow")

    def _collect(self, ds, writer: StoreWriter, dim: int, progress: _Progress) -> dict[str, str]:
        """Count each batch's rows as it arrives (writing its vectors when they came back); hash -> error for
        the failed rows."""
        failures: dict[str, str] = {}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            ok = pc.is_null(batch.column("error"))
            if "vector" in batch.column_names:  # the actors could not write the store themselves
                good = batch.filter(ok)
                writer.add(good.column("hash").to_pylist(), as_matrix(good.column("vector"), dim))
            bad = batch.filter(pc.invert(ok))
            failures.update(zip(bad.column("hash").to_pylist(), bad.column("error").to_pylist()))
            if not progress.seen:
                self.summary.first_result_s = time.perf_counter() - progress.start
                self.summary.first_result_rows = batch.num_rows
            progress.update(progress.seen + batch.num_rows, len(failures))
        return failures


def _read_texts(block: pa.Table, location: str) -> pa.Table:
    """A Ray task: the texts to embed of one block of the plan ((part, rows) rows)."""
    return pa.concat_tables([embedding_rows(location, path, np.asarray(rows, dtype=np.int64))
                             for path, rows in zip(block.column("part").to_pylist(),
                                                   block.column("rows").to_pylist())])


class _Progress:
    """One stderr line every few seconds: embedded so far, rate, failures."""

    def __init__(self, total: int, say: Callable[[str], None], every_s: float = 10.0):
        self.total, self.say, self.every_s = total, say, every_s
        self.start = self.last = time.perf_counter()
        self.seen = 0

    def update(self, done: int, failed: int, final: bool = False) -> None:
        self.seen = done
        now = time.perf_counter()
        if final or now - self.last >= self.every_s:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.say(f"embedding: {done:,}/{self.total:,} passages ({rate:,.0f}/s), {failed:,} failed")


_SURFACED = (EmbeddingConfigError, StoreNotSharedError)  # misconfiguration: one line, no Ray traceback


def _config_cause(exc: BaseException) -> EmbeddingConfigError | StoreNotSharedError | None:
    seen = set()
    text = str(exc)
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, _SURFACED):
            return type(exc)(str(exc).splitlines()[-1] if "\n" in str(exc) else str(exc))
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    # Ray Data wraps an actor's exception in a UserCodeException whose cause does not survive pickling;
    # the worker's traceback, in the message, still names it.
    for kind in _SURFACED:
        marker = f"{kind.__module__}.{kind.__qualname__}: "
        at = text.rfind(marker)
        if at >= 0:
            return kind(text[at + len(marker):].splitlines()[0])
    return None


def ray_connected() -> bool:
    """Connect first when this runs as a cluster job (RAY_ADDRESS set), so discovery can find the Serve
    embedder; a local run starts Ray only when there is something to embed (a local Ray serves no models)."""
    import ray

    if os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        from dspy_ray.util.ray_runtime import init_ray

        init_ray()
    return ray.is_initialized()
