"""Step 3 of a build: embed the passages whose text has no vector in the embedding store yet.

The passages go through a Ray Data actor pool (:mod:`stages.embed`), many requests in flight.
Each actor writes its batch's vectors to the embedding store as one whole shard before it hands
the batch on (:class:`~dspy_ray.retrieval.store.ShardSink`), so no vector comes back to this
process: only (hash, error) rows, for the progress line and the failures; a killed build loses
only the batches in flight.  An index folder the workers cannot open (an in-process ``memory://``
store) gets the vectors back here instead, written in shards of ``--shard-rows``.  A passage whose
embedding fails after retries is recorded with its error (left out of the index, retried by the
next ``--resume``)::

    >>> step = EmbedStep(options, IndexDir.at(options.index), summary, say)       # doctest: +SKIP
    >>> result = step.run(read.passages, settings, dim=384)                       # doctest: +SKIP
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

import pyarrow as pa
import pyarrow.compute as pc

from dspy_ray.client.embeddings import EmbeddingConfigError
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.retrieval.manifest import BUILD_STATE
from dspy_ray.retrieval.passages import embedding_text
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
from pipelines.index.read import PassageColumns


@dataclass
class Embedded:
    """What the embedding step did: the hashes embedded now, and hash -> error for those that failed."""

    embedded: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)


class EmbedStep:
    def __init__(self, options: IndexOptions, index: IndexDir, summary: IndexSummary, say: Callable[[str], None]):
        self.options, self.index, self.summary, self.say = options, index, summary, say

    def run(self, passages: PassageColumns, settings: EndpointSettings, dim: int) -> Embedded:
        """Embed what the store lacks, after recording this build's settings (``build.json``) for ``--resume``."""
        store = EmbeddingStore(self.index.location)
        store.drop_partial()  # what a killed build's writers left half-written
        done = store.hashes()
        columns = passages.columns
        todo: dict[str, str] = {}
        for h, title, section, text in zip(columns["hash"], columns["title"], columns["section"], columns["text"]):
            if h not in done and h not in todo:
                todo[h] = embedding_text(title, section, text)
        run = self._write_build_state(settings, dim)
        if not todo:
            return Embedded()
        self.say(f"embedding {len(todo):,} passages ({len(done):,} already in the store) with {settings.model!r}")
        return Embedded(set(todo), self._run_stage(store, todo, settings, dim, run))

    def _write_build_state(self, settings: EndpointSettings, dim: int) -> str:
        """Write ``build.json``; its ``run`` token (actors check they see this very file: a shared folder)."""
        run = uuid.uuid4().hex
        write_bytes(self.index.fs, self.index.path(BUILD_STATE), json.dumps({
            "embedder": {"model": settings.model, "dim": dim, "query_prefix": settings.query_prefix,
                         "passage_prefix": settings.passage_prefix},
            "chunking": self.options.chunking.model_dump(), "corpus": self.options.corpus,
            "started_at": now(), "run": run}, indent=2).encode())
        return run

    def _run_stage(self, store: EmbeddingStore, todo: dict[str, str], settings: EndpointSettings,
                   dim: int, run: str) -> dict[str, str]:
        """hash -> error for the passages that failed; the others' vectors are in the store."""
        import ray

        from dspy_ray.util.ray_runtime import init_ray
        from pipelines.inputs import to_dataset

        init_ray()
        ray.data.DataContext.get_current().enable_progress_bars = False  # _Progress prints one line instead
        stage = self.options.stage
        table = pa.table({"hash": list(todo), "embedding_text": list(todo.values())})
        # One actor batch per block: Ray Data hands a block's results back when the whole block is done,
        # so smaller blocks mean a steadier stream of results (and of progress) from a slow endpoint.
        per_block = max(1, min(stage.batch_size, -(-table.num_rows // (2 * stage.num_actors))))
        budget = min(stage.max_in_flight_per_actor, max(1, settings.max_in_flight // stage.num_actors))
        # The actors write the store unless it lives in this process only; then the vectors come back here.
        sink = (ShardSink.config(self.index.location, dim, self.options.shard_rows, run)
                if workers_reach(self.index.location) else None)
        ds = stage.apply(to_dataset(table, rows_per_block=per_block), settings, max_in_flight=budget, store=sink)
        progress = _Progress(table.num_rows, self.say)
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
