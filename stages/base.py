"""The stage adapter: any DSPy module as a Ray Data actor stage.

A stage is two pieces, as in Ray's LLM batch stages:

* :class:`DSPyStageUDF` - per-actor state (LM, program, adapter) built once in
  ``__init__``, and an ``async __call__`` that keeps many rows in flight at once;
* :class:`DSPyStage` - a pydantic config that says which program to run on which
  columns, and how Ray runs it.  A task declares its stages in a few lines
  (``tasks/triage.py``)::

      DSPyStage(name="triage", program=ProgramSpec("triage", CallTriager),
                input_fields={"transcript": "transcript"},
                output_fields=("priority", "category", "summary"))

Data flow for one batch (``errors`` is a list of strings per row)::

    {"id": ["a", "b"], "transcript": ["fire!", ""], "errors": [[], ["transcript is empty"]]}
      -> the triage stage ->
    {..., "priority": ["urgent", None], "category": ["fire", None], "summary": ["...", None],
     "errors": [[], ["transcript is empty", "triage: skipped: input 'transcript' is empty"]]}

Output columns are typed from the program's signatures (:mod:`stages.columns`):
a ``list[str]`` output is an Arrow ``list<string>`` column, an ``int`` an int64.

Every input row comes out exactly once.  What fails after retries becomes an
entry in ``errors``; only misconfiguration (bad credentials, unknown model) is
raised, because it would fail every row the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import dspy
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from core.lm import build_lm
from core.loading import ProgramSpec, load_program
from core.runner import ProgramRunner
from core.settings import EndpointSettings
from core.signatures import program_fields
from stages.columns import to_column

logger = logging.getLogger(__name__)

ERRORS_COLUMN = "errors"


class StageInputError(KeyError):
    """A batch lacks a column the stage needs."""


class DSPyStageUDF:
    """Runs one DSPy program over batches, many rows in flight per actor.

    ``lm_factory`` is injected so the UDF can be driven without Ray or a server
    in tests: ``async for out in udf(batch)``.
    """

    def __init__(
        self,
        *,
        stage_name: str,
        program: ProgramSpec,
        artifact: str | None,
        artifact_dir: str,
        resources: dict[str, str],
        input_fields: dict[str, str],
        output_fields: tuple[str, ...],
        lm_settings: dict[str, Any],
        embed_settings: dict[str, Any] | None = None,
        max_in_flight: int = 64,
        refine_attempts: int = 3,
        refine_threshold: float = 1.0,
        reward_fn: Callable[[dict, dspy.Prediction], float] | None = None,
        lm_factory: Callable[[EndpointSettings], dspy.BaseLM] = build_lm,
    ):
        self.stage_name = stage_name
        self.input_fields = dict(input_fields)
        self.output_fields = tuple(output_fields)
        self.settings = EndpointSettings(**lm_settings)
        self.lm = lm_factory(self.settings)  # configured once per actor, used via dspy.context per call
        # The one loader: resources opened once per actor, sidecar and signatures checked.
        embed = EndpointSettings(**embed_settings) if embed_settings else None
        loaded = load_program(program, artifact, resources=program.open_resources(resources, embed),
                              artifact_dir=artifact_dir)
        _, outputs = program_fields(loaded.program, program.output_types)
        self.output_types = {f: outputs.get(f, (str, ""))[0] for f in self.output_fields}
        self.runner = ProgramRunner(
            loaded.program,
            self.lm,
            output_fields=self.output_fields,
            refine_attempts=refine_attempts,
            refine_threshold=refine_threshold,
            reward_fn=reward_fn or program.reward,
            max_in_flight=max_in_flight,
        )
        self.max_in_flight = max_in_flight
        self._semaphore: asyncio.Semaphore | None = None
        self._semaphore_loop: asyncio.AbstractEventLoop | None = None

    # -- batch level -------------------------------------------------------

    def _check_columns(self, table: pa.Table) -> None:
        missing = [col for col in self.input_fields.values() if col not in table.column_names]
        if missing:
            raise StageInputError(
                f"stage {self.stage_name!r} needs column(s) {missing}; the batch has {table.column_names}"
            )

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        self._check_columns(batch)
        loop = asyncio.get_running_loop()
        if self._semaphore_loop is not loop:  # a semaphore belongs to one event loop
            self._semaphore, self._semaphore_loop = asyncio.Semaphore(self.max_in_flight), loop
        columns = {arg: batch.column(col).to_pylist() for arg, col in self.input_fields.items()}
        n = batch.num_rows
        tasks = [
            asyncio.ensure_future(self._run_row(i, {arg: values[i] for arg, values in columns.items()}))
            for i in range(n)
        ]
        results: list[tuple[dict[str, Any], list[str]] | None] = [None] * n
        for index, outputs, errors in await asyncio.gather(*tasks):
            if results[index] is not None:
                raise RuntimeError(f"stage {self.stage_name!r}: row {index} produced twice")
            results[index] = (outputs, errors)
        if any(r is None for r in results):
            raise RuntimeError(f"stage {self.stage_name!r}: {results.count(None)} row(s) produced no output")
        yield self._merge(batch, results)

    def _merge(self, batch: pa.Table, results: list[tuple[dict[str, Any], list[str]]]) -> pa.Table:
        previous = (
            batch.column(ERRORS_COLUMN).to_pylist() if ERRORS_COLUMN in batch.column_names else [None] * len(results)
        )
        out = batch
        errors = [list(prev or []) + new for prev, (_, new) in zip(previous, results)]
        for field in self.output_fields:
            values, bad = to_column([outputs.get(field) for outputs, _ in results], self.output_types[field])
            for i in bad:
                errors[i].append(f"{self.stage_name}: output {field!r} does not fit its declared type; stored null")
            out = _set_column(out, field, values)
        return _set_column(out, ERRORS_COLUMN, pa.array(errors, type=pa.list_(pa.string())))

    # -- row level ---------------------------------------------------------

    async def _run_row(self, index: int, inputs: dict[str, Any]) -> tuple[int, dict[str, Any], list[str]]:
        empty = [arg for arg, value in inputs.items() if value is None or (isinstance(value, str) and not value.strip())]
        if empty:
            return index, {}, [f"{self.stage_name}: skipped: input {empty[0]!r} is empty"]
        async with self._semaphore:
            outcome = await self.runner.predict(inputs)
        outputs = {f: outcome.prediction.get(f) for f in self.output_fields} if outcome.prediction else {}
        return index, outputs, [f"{self.stage_name}: {e}" for e in outcome.errors]


class DSPyStage(BaseModel):
    """How Ray runs a :class:`DSPyStageUDF`: which program on which columns, with what resources."""

    udf_class: ClassVar[type[DSPyStageUDF]] = DSPyStageUDF

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field("", description="Stage name used in errors and logs (default: the program's name)")
    program: ProgramSpec = Field(..., description="The program to run, and how to build it")
    artifact: str | None = Field(None, description="Optimized program JSON (path or URI) or 'best'/'latest'")
    artifact_dir: str = Field("artifacts", description="Artifact registry for 'best'/'latest'")
    resources: dict[str, str] = Field(default_factory=dict, description="Resource settings (e.g. index path)")
    input_fields: dict[str, str] = Field(..., description="Program argument -> dataset column")
    output_fields: tuple[str, ...] = Field(..., description="Prediction fields written as columns")
    num_actors: int = Field(2, ge=1, description="Actors in this stage's pool")
    # DSPy's HTTP client keeps at most 100 connections per LM: more rows per actor would only queue.
    max_in_flight_per_actor: int = Field(64, ge=1, le=100, description="Concurrent rows per actor (<= 100)")
    # Small batches: a batch is handed back only when its slowest row is done.
    batch_size: int = Field(16, ge=1, description="Rows per batch handed to an actor")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per actor (the work is I/O bound)")
    refine_attempts: int = Field(3, ge=1, description="dspy.Refine attempts when output fails validation")
    refine_threshold: float = Field(1.0, description="Reward an output must reach to be accepted")

    def stage_name(self) -> str:
        return self.name or self.program.name

    def udf_kwargs(self, lm_settings: EndpointSettings, max_in_flight: int | None = None,
                   embed_settings: EndpointSettings | None = None) -> dict[str, Any]:
        return {
            "stage_name": self.stage_name(),
            "program": self.program,
            "artifact": self.artifact,
            "artifact_dir": self.artifact_dir,
            "resources": self.resources,
            "input_fields": self.input_fields,
            "output_fields": self.output_fields,
            # A constructor argument, never runtime_env (Ray logs that): the actor needs the real key.
            "lm_settings": lm_settings.with_key(),
            "embed_settings": embed_settings.with_key() if embed_settings is not None else None,
            "max_in_flight": max_in_flight or self.max_in_flight_per_actor,
            "refine_attempts": self.refine_attempts,
            "refine_threshold": self.refine_threshold,
        }

    def apply(self, ds, lm_settings: EndpointSettings, max_in_flight: int | None = None,
              embed_settings: EndpointSettings | None = None):
        """Add this stage to a Ray Dataset: one actor pool, async UDF, pyarrow batches."""
        from ray.data import ActorPoolStrategy

        in_flight = max_in_flight or self.max_in_flight_per_actor
        # Enough batches running per actor that its in-flight budget stays full
        # while the slowest rows of a batch finish.
        tasks = max(2, -(-in_flight // self.batch_size) * 2)
        return ds.map_batches(
            self.udf_class,
            fn_constructor_kwargs=self.udf_kwargs(lm_settings, in_flight, embed_settings),
            batch_size=self.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            num_cpus=self.num_cpus,
            compute=ActorPoolStrategy(
                size=self.num_actors,
                max_tasks_in_flight_per_actor=tasks,
                max_concurrent_calls_per_actor=tasks,
                enable_true_multi_threading=True,
            ),
        )


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
