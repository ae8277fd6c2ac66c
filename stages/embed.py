"""The embedding stage: passages in, unit vectors out, on a Ray Data actor pool over :class:`EmbeddingClient`.

Like :mod:`stages.base`, two pieces: :class:`EmbedStageUDF` (one client per
actor, an ``async __call__`` with many requests in flight) and
:class:`EmbedStage` (a pydantic config saying how Ray runs it).  How many requests
are in flight is the endpoint's adaptive limit (:mod:`dspy_ray.client.limiter`, shared
by every actor of the job, at most ``EMBED_MAX_IN_FLIGHT``); each actor is also capped
at its own ``max_in_flight``.  Data flow for one batch (``dim`` = the model's dimension)::

    {"hash": ["9f..", "c4.."], "embedding_text": ["Priority Codes\\nEcho calls ...", ""]}
      -> the embed stage ->
    {"hash": ["9f..", "c4.."], "vector": [[0.01, ...], None],            # fixed_size_list<float32>[dim]
     "error": [None, "empty text: nothing to embed"]}

Given ``store`` (an index build's embedding store, :class:`~dspy_ray.retrieval.store.ShardSink`),
the actor writes the batch's vectors there itself, as one whole shard, before handing the batch
on, and what comes out is only which rows are done and why the others failed::

    {"hash": ["9f..", "c4.."], "error": [None, "empty text: nothing to embed"]}

Every input row comes out exactly once, in input order.  A passage that still
fails after retries gets its ``error`` and a null vector (no vector in the store);
misconfiguration (bad key, unknown model, a store this node cannot see) raises, as
every row would fail the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from dspy_ray.client.embeddings import EmbeddingClient
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.retrieval.store import ShardSink


class EmbedStageInputError(KeyError):
    """A batch lacks a column the stage needs."""


def vector_column(vectors: np.ndarray, ok: np.ndarray) -> pa.Array:
    """``fixed_size_list<float32>[dim]`` with nulls where ``ok`` is False."""
    n, dim = vectors.shape
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    mask = pa.array(~ok) if not ok.all() else None
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask) if n else pa.nulls(0, pa.list_(pa.float32(), dim))


class EmbedStageUDF:
    """Embeds one text column per batch; ``client_factory`` is injected so tests can drive it without Ray."""

    def __init__(self, *, settings: dict[str, Any], max_in_flight: int, text_column: str = "embedding_text",
                 kind: str = "passage", store: dict[str, Any] | None = None,
                 client_factory: Callable[..., EmbeddingClient] = EmbeddingClient):
        self.text_column, self.kind = text_column, kind
        # The settings dict carries the real key (constructor argument, never runtime_env).
        self.client = client_factory(EndpointSettings(**settings), max_in_flight=max_in_flight)
        self.sink = ShardSink(**store) if store else None  # ShardSink.config(...): write vectors to the store here

    @staticmethod
    def get_required_input_keys(text_column: str = "embedding_text") -> dict[str, str]:
        return {"hash": "content hash of the text (the embedding store's key)", text_column: "text to embed"}

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        missing = [c for c in self.get_required_input_keys(self.text_column) if c not in batch.column_names]
        if missing:
            raise EmbedStageInputError(f"stage 'embed' needs column(s) {missing}; the batch has {batch.column_names}")
        if self.sink is not None:
            await asyncio.to_thread(self.sink.check)  # before any request: a store this node cannot see
        texts = batch.column(self.text_column).to_pylist()
        result = await self.client.aembed(texts, kind=self.kind)
        if len(result.errors) != batch.num_rows:  # one-to-one is enforced, not hoped for
            raise RuntimeError(f"stage 'embed': {len(result.errors)} results for {batch.num_rows} rows")
        errors = pa.array(result.errors, type=pa.string())
        if self.sink is None:
            yield pa.table({"hash": batch.column("hash"), "vector": vector_column(result.vectors, result.ok),
                            "error": errors})
            return
        ok = np.asarray(result.ok, dtype=bool)
        if ok.any():  # written whole before the rows are reported done: a lost actor loses no reported row
            hashes = batch.column("hash").filter(pa.array(ok)).to_pylist()
            await asyncio.to_thread(self.sink.write, hashes, np.asarray(result.vectors)[ok])
        yield pa.table({"hash": batch.column("hash"), "error": errors})


class EmbedStage(BaseModel):
    """How Ray runs :class:`EmbedStageUDF`: actors, batch size, in-flight requests."""

    udf_class: ClassVar[type[EmbedStageUDF]] = EmbedStageUDF

    model_config = ConfigDict(extra="forbid")

    num_actors: int = Field(2, ge=1, description="Actors in the pool")
    # Rows per batch: several requests' worth, so each actor keeps its in-flight budget busy.
    batch_size: int = Field(256, ge=1, description="Passages handed to an actor at once")
    max_in_flight_per_actor: int = Field(64, ge=1, description="At most this many /v1/embeddings requests per actor "
                                         "at once; below it the endpoint's shared adaptive limit decides")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per actor (the work is I/O bound)")
    text_column: str = Field("embedding_text", description="Column holding the text to embed")

    def apply(self, ds, settings: EndpointSettings, max_in_flight: int | None = None,
              store: dict[str, Any] | None = None):
        """Add this stage to a Ray Dataset (pyarrow batches, async UDF, one actor pool); with ``store``
        (:meth:`ShardSink.config <dspy_ray.retrieval.store.ShardSink.config>`) the actors write the vectors."""
        from ray.data import ActorPoolStrategy

        in_flight = max_in_flight or self.max_in_flight_per_actor
        requests_per_batch = max(1, -(-self.batch_size // settings.batch_size))
        # Enough batches per actor that its request budget stays full while a batch's slowest request finishes.
        tasks = max(2, -(-in_flight // requests_per_batch) * 2)
        return ds.map_batches(
            self.udf_class,
            fn_constructor_kwargs={"settings": settings.with_key(), "max_in_flight": in_flight,
                                   "text_column": self.text_column, "store": store},
            batch_size=self.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            num_cpus=self.num_cpus,
            compute=ActorPoolStrategy(size=self.num_actors, max_tasks_in_flight_per_actor=tasks,
                                      max_concurrent_calls_per_actor=tasks),
        )
