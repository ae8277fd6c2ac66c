"""The stage adapter: any DSPy module as a Ray Data actor stage.

A stage is two pieces, as in Ray's LLM batch stages:

* :class:`DSPyStageUDF` - per-actor state (LM, program, adapter) built once in
  ``__init__``, and an ``async __call__`` that keeps many rows in flight at once (each row
  awaited on the actor's event loop when the program defines ``aforward``, else on a worker
  thread: :class:`dspy_ray.execution.runner.ProgramRunner`);
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
``lm_usage`` is one struct column with a field per stage: what the row's LM calls
cost (:mod:`dspy_ray.client.usage`)::

    {"lm_usage": [{"triage": {"calls": 1, "retries": 0, "prompt_tokens": 412,
                              "completion_tokens": 38, "cost_usd": 0.000085, "cached": 0}}, ...]}

``cached`` counts the row's answers served from the LM cache (:mod:`dspy_ray.client.cache`):
a row answered entirely from it has ``calls`` 0 and no tokens or cost.

How many rows run at once is not a setting: the endpoint's limit (:mod:`dspy_ray.client.limiter`,
found at run time and shared by every actor calling the endpoint) hands each actor its
share, and the actor admits a few more rows than that share, so its LM calls queue for
a slot (the demand the limit grows on) and the endpoint never waits for a batch to finish.

Every input row comes out exactly once.  What fails after retries becomes an
entry in ``errors``; only misconfiguration (bad credentials, unknown model) is
raised, because it would fail every row the same way.  The one exception is a
run's budget (``--max-tokens``, ``--max-cost``): once it is spent, the first stage
starts no new row and leaves the rows it did not start out of its output, so
``--resume`` runs them later.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import dspy
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from dspy_ray.client.lm import build_lm
from dspy_ray.execution.loading import ProgramSpec, load_program
from dspy_ray.execution.runner import ProgramRunner
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.execution.signatures import program_fields
from dspy_ray.client.usage import Usage
from dspy_ray.util.gc_tuning import settle_heap
from stages.columns import to_column

logger = logging.getLogger(__name__)

ERRORS_COLUMN = "errors"
USAGE_COLUMN = "lm_usage"
USAGE_TYPE = pa.struct([("calls", pa.int64()), ("retries", pa.int64()), ("prompt_tokens", pa.int64()),
                        ("completion_tokens", pa.int64()), ("cost_usd", pa.float64()), ("cached", pa.int64())])
TICK_S = 0.05  # how often an actor re-reads its share (admission) and reports usage to a budget's meter
# Blocks an actor holds at once, at least.  A block is passed on only once its slowest row is done, and a row
# refused with a 429 waits out its Retry-After (often a second: ten latencies of an endpoint answering in 0.1 s).
# With two, the other block of a stage's actor ran dry meanwhile: against an endpoint refusing past 128 in flight
# at 0.1 s, 70-76% of C/L with two, 80-86% with four (benchmarks/endpoint_capacity.py --latency 0.1).
MIN_BLOCKS_PER_ACTOR = 4


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
        max_in_flight: int | None = None,
        refine_attempts: int = 3,
        refine_threshold: float = 1.0,
        reward_fn: Callable[[dict, dspy.Prediction], float] | None = None,
        lm_factory: Callable[[EndpointSettings], dspy.BaseLM] = build_lm,
        run_meter: str | None = None,
        budget_gate: bool = False,
        share_weight: float = 1.0,
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
            max_in_flight=self._admission_ceiling(max_in_flight),
        )
        self.max_in_flight = max_in_flight  # an optional cap per actor; None: the endpoint's limit decides
        self.limiter = getattr(self.lm, "limiter", None)
        if self.limiter is not None:  # this stage's weight in the split of the endpoint's limit; no idle grace
            self.limiter.weight, self.limiter.idle_grace = share_weight, 0.0
        self.budget_gate = budget_gate
        self.stop_reason: str | None = None  # the run's budget is spent: start no new row
        self._meter = _run_meter(run_meter)
        self._unreported, self._unreported_rows = Usage(), 0
        self._loop_state: _Admission | None = None
        settle_heap()  # the actor's setup heap: frozen, out of every later collection (:mod:`dspy_ray.util.gc_tuning`)

    def _admission_ceiling(self, cap: int | None) -> int:
        """Most rows one actor ever runs at once (one worker thread each for a program without an async path):
        the endpoint's ceiling and a margin."""
        ceiling = self.settings.max_in_flight
        most = ceiling + max(8, ceiling // 4)
        return min(most, cap) if cap else most

    def _admission_target(self) -> int:
        """Rows to run now: this actor's share of the endpoint's limit, and a few more ready to take a slot."""
        if self.limiter is None:
            return self.max_in_flight or 64
        share = int(self.limiter.share)
        # Rows waiting out a Retry-After or a backoff hold no slot: admit as many others meanwhile.
        target = share + self.limiter.resting() + max(2, share // 16)
        return max(1, min(target, self.max_in_flight) if self.max_in_flight else target)

    # -- batch level -------------------------------------------------------

    def _check_columns(self, table: pa.Table) -> None:
        missing = [col for col in self.input_fields.values() if col not in table.column_names]
        if missing:
            raise StageInputError(
                f"stage {self.stage_name!r} needs column(s) {missing}; the batch has {table.column_names}"
            )

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        self._check_columns(batch)
        admission = self._admission()
        admission.begin()
        try:
            async for out in self._call(admission, batch):
                yield out
        finally:
            admission.end()  # the last call out stops the ticker: no Ray call once the actor has no task

    async def _call(self, admission: _Admission, batch: pa.Table) -> AsyncIterator[pa.Table]:
        columns = {arg: batch.column(col).to_pylist() for arg, col in self.input_fields.items()}
        n = batch.num_rows
        tasks = [
            asyncio.ensure_future(self._run_row(admission, i, {arg: values[i] for arg, values in columns.items()}))
            for i in range(n)
        ]
        results: list[tuple[dict[str, Any], list[str], Usage] | None] = [None] * n
        withheld = [False] * n
        for index, outcome in await asyncio.gather(*tasks):
            if results[index] is not None or withheld[index]:
                raise RuntimeError(f"stage {self.stage_name!r}: row {index} produced twice")
            if outcome is None:
                withheld[index] = True
            else:
                results[index] = outcome
        missing = sum(1 for r, w in zip(results, withheld) if r is None and not w)
        if missing:
            raise RuntimeError(f"stage {self.stage_name!r}: {missing} row(s) produced no output")
        await self._report_usage()  # a run with a budget hears of this batch's spending at once
        if any(withheld):  # the budget is spent: rows not started stay out, for --resume
            keep = pa.array([not w for w in withheld])
            batch = batch.filter(keep)
            results = [r for r in results if r is not None]
        yield self._merge(batch, results)

    # -- admission: how many rows run at once ------------------------------------

    def _admission(self) -> _Admission:
        loop = asyncio.get_running_loop()
        if self._loop_state is None or self._loop_state.loop is not loop:  # futures belong to one event loop
            self._loop_state = _Admission(loop, self._admission_target, self._tick)
        return self._loop_state

    async def _tick(self, count: int) -> None:
        if self.limiter is not None and self._loop_state is not None:
            # Rows waiting to start are demand the endpoint's limit should hear about.
            self.limiter.note_queued(id(self), len(self._loop_state.waiting))
            if self.limiter.pump is not None:  # the report to the job's coordinator, from this event loop
                self.limiter.pump()
        await self._report_usage()

    async def _report_usage(self) -> None:
        """Send what rows spent since the last report to the run's meter (only a run with a budget has one);
        learn whether the budget is spent.  The run's summary reads the ``lm_usage`` column instead."""
        if self._meter is None or (not self._unreported.calls and not self._unreported_rows):
            return
        usage, rows = self._unreported, self._unreported_rows
        self._unreported, self._unreported_rows = Usage(), 0
        try:
            reason = await self._meter.add.remote(self.stage_name, usage.as_dict(), rows)
        except Exception as exc:  # noqa: BLE001 - the meter is the driver's; without it, no budget
            logger.warning("stage %s: run meter unreachable (%s)", self.stage_name, type(exc).__name__)
            self._meter = None
            return
        if reason and self.budget_gate and self.stop_reason is None:
            self.stop_reason = reason
            logger.warning("stage %s: budget reached (%s): starting no new rows", self.stage_name, reason)

    def _merge(self, batch: pa.Table, results: list[tuple[dict[str, Any], list[str], Usage]]) -> pa.Table:
        previous = (
            batch.column(ERRORS_COLUMN).to_pylist() if ERRORS_COLUMN in batch.column_names else [None] * len(results)
        )
        out = batch
        errors = [list(prev or []) + new for prev, (_, new, _) in zip(previous, results)]
        for field in self.output_fields:
            values, bad = to_column([outputs.get(field) for outputs, _, _ in results], self.output_types[field])
            for i in bad:
                errors[i].append(f"{self.stage_name}: output {field!r} does not fit its declared type; stored null")
            out = _set_column(out, field, values)
        out = _set_column(out, ERRORS_COLUMN, pa.array(errors, type=pa.list_(pa.string())))
        return _set_usage(out, self.stage_name, [usage for _, _, usage in results])

    # -- row level ---------------------------------------------------------

    async def _run_row(self, admission: _Admission, index: int, inputs: dict[str, Any]
                       ) -> tuple[int, tuple[dict[str, Any], list[str], Usage] | None]:
        """One row's outputs, errors and usage; None when the budget is spent before it started."""
        empty = [arg for arg, value in inputs.items() if value is None or (isinstance(value, str) and not value.strip())]
        if empty:
            return index, ({}, [f"{self.stage_name}: skipped: input {empty[0]!r} is empty"], Usage())
        if self.stop_reason is not None:
            return index, None
        await admission.enter()
        try:
            if self.stop_reason is not None:
                return index, None
            outcome = await self.runner.predict(inputs)
        finally:
            admission.leave()
        self._unreported.add(outcome.usage)
        self._unreported_rows += 1
        outputs = {f: outcome.prediction.get(f) for f in self.output_fields} if outcome.prediction else {}
        return index, (outputs, [f"{self.stage_name}: {e}" for e in outcome.errors], outcome.usage)


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
    max_in_flight_per_actor: int | None = Field(
        None, ge=1, description="Cap on rows in flight per actor; None: the endpoint's adaptive limit decides")
    batch_size: int = Field(16, ge=1, description="Rows per batch handed to an actor")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per actor (the work is I/O bound)")
    refine_attempts: int = Field(3, ge=1, description="dspy.Refine attempts when output fails validation")
    refine_threshold: float = Field(1.0, description="Reward an output must reach to be accepted")

    def stage_name(self) -> str:
        return self.name or self.program.name

    def udf_kwargs(self, lm_settings: EndpointSettings, max_in_flight: int | None = None,
                   embed_settings: EndpointSettings | None = None, run_meter: str | None = None,
                   budget_gate: bool = False, share_weight: float = 1.0) -> dict[str, Any]:
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
            "run_meter": run_meter,
            "budget_gate": budget_gate,
            "share_weight": share_weight,
        }

    def apply(self, ds, lm_settings: EndpointSettings, max_in_flight: int | None = None,
              embed_settings: EndpointSettings | None = None, *, rows_per_block: int | None = None,
              actors_on_endpoint: int | None = None, run_meter: str | None = None, budget_gate: bool = False,
              share_weight: float = 1.0):
        """Add this stage to a Ray Dataset: one actor pool, async UDF, pyarrow batches.

        ``actors_on_endpoint``: every actor of the run that calls the endpoint (all stages);
        ``rows_per_block``: the dataset's block size.  Each actor is given enough blocks at once
        to hold twice its even share of the endpoint's ceiling, and at least ``MIN_BLOCKS_PER_ACTOR``,
        so the endpoint stays busy while a batch waits for its slowest row (the limiter, not the batch,
        decides what runs).
        ``share_weight``: this stage's actors' weight in the split of the endpoint's limit when it cannot run
        every stage's rows at once (the run gives earlier stages more).
        """
        from ray.data import ActorPoolStrategy

        cap = max_in_flight or self.max_in_flight_per_actor
        per_actor = cap or max(1, lm_settings.max_in_flight // max(1, actors_on_endpoint or self.num_actors))
        rows_per_task = max(self.batch_size, rows_per_block or self.batch_size)
        tasks = max(MIN_BLOCKS_PER_ACTOR, -(-2 * per_actor // rows_per_task))
        _batches_at_once(-(-2 * per_actor // self.batch_size))
        return ds.map_batches(
            self.udf_class,
            fn_constructor_kwargs=self.udf_kwargs(lm_settings, cap, embed_settings, run_meter, budget_gate,
                                                   share_weight),
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


def _batches_at_once(count: int) -> None:
    """Let Ray Data run ``count`` batches of one task at once through an async UDF (it runs 4: a task of
    many rows then held 4 x batch_size rows in flight, whatever the endpoint's limit: 256 in all at capacity
    512, as Ray Data joins what a read yields into large blocks and hands an actor few tasks).  The stage's
    admission, not this, decides what runs.  Ray Data 2.60 has no public setting for it (the environment
    variable ``RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY`` is read once, at import): the value is read
    when the plan is built, in the driver, so it is raised there, never lowered."""
    from ray.data._internal.planner import plan_udf_map_op

    if count > plan_udf_map_op.DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY:
        plan_udf_map_op.DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY = count


class _Admission:
    """Rows admitted to run in one event loop: at most ``target()`` at once, the rest wait in order.

    A ticker re-reads the target (the endpoint's share moves) and runs the stage's periodic work (the
    limiter's report, the usage meter: Ray calls), only while a call of the stage is running.  The
    event loop is Ray Data's and its thread outlives the actor's tasks: a Ray call from it after the
    last one, while the worker is torn down, crashes the worker (SIGSEGV in Ray's core worker).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, target: Callable[[], int],
                 tick: Callable[[int], Any]):
        self.loop, self.target, self.active = loop, target, 0
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self._tick = tick
        self.calls = 0  # calls of the stage (batches) running in this loop
        self._ticker: asyncio.Task | None = None

    def begin(self) -> None:
        """A call of the stage starts: the ticker runs while any does."""
        self.calls += 1
        if self._ticker is None:
            self._ticker = self.loop.create_task(self._run_ticker())

    def end(self) -> None:
        self.calls -= 1
        if self.calls == 0 and self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def enter(self) -> None:
        if not self.waiting and self.active < self.target():
            self.active += 1
            return
        future = self.loop.create_future()
        self.waiting.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.leave()  # admitted while being cancelled
            raise

    def leave(self) -> None:
        self.active -= 1
        self.wake()

    def wake(self) -> None:
        target = self.target()
        while self.waiting and self.active < target:
            future = self.waiting.popleft()
            if not future.done():
                self.active += 1
                future.set_result(None)

    async def _run_ticker(self) -> None:
        count = 0
        while True:
            await asyncio.sleep(TICK_S)
            count += 1
            self.wake()
            try:
                await self._tick(count)
            except Exception:  # noqa: BLE001 - never let the ticker die
                logger.exception("stage ticker failed")


def _run_meter(name: str | None):
    """The run's meter actor (usage per stage, the budget), when the driver made one."""
    if not name:
        return None
    import ray

    return ray.get_actor(name)


def _set_usage(table: pa.Table, stage: str, usages: list[Usage]) -> pa.Table:
    """Put this stage's usage in the ``lm_usage`` struct column (one field per stage)."""
    mine = pa.StructArray.from_arrays([
        pa.array([u.calls for u in usages], pa.int64()), pa.array([u.retries for u in usages], pa.int64()),
        pa.array([u.prompt_tokens for u in usages], pa.int64()),
        pa.array([u.completion_tokens for u in usages], pa.int64()),
        pa.array([u.cost_usd for u in usages], pa.float64()),
        pa.array([u.cached for u in usages], pa.int64())], fields=list(USAGE_TYPE))
    names, arrays = [], []
    if USAGE_COLUMN in table.column_names:
        existing = table.column(USAGE_COLUMN).combine_chunks()
        for field, array in zip(existing.type, existing.flatten()):
            if field.name != stage:
                names.append(field.name)
                arrays.append(array)
    column = pa.StructArray.from_arrays([*arrays, mine], names=[*names, stage])
    return _set_column(table, USAGE_COLUMN, column)


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
