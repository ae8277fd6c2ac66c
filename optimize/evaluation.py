"""Evaluating a program on examples: in threads, on the Ray worker pool, or inside DSPy's own optimizers.

Every example runs through :func:`dspy_ray.execution.evaluation.evaluate` - the runner of batch and
Serve, the same evaluation path as Serve's drift monitor - and is scored by the task's metric
(:func:`dspy_ray.execution.evaluation.score_outcome`), so the score an artifact records is the score
its users get.

* :func:`evaluate_program` - one program, many examples, a bounded thread pool;
  the runner and judge are passed in, so it runs without Ray in tests.
* :func:`evaluate_on_ray` - the examples split into chunks, one per worker of
  a :class:`~optimize.workers.WorkerPool`; the program travels as its JSON state.
* :class:`RayEvaluate` - a ``dspy.Evaluate`` whose calls go to
  :func:`evaluate_on_ray`; :func:`ray_evaluation` installs it inside DSPy's
  ``BootstrapFewShotWithRandomSearch``, ``COPRO`` and GEPA for the length of a compile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Hashable, Iterable
from typing import Any, Protocol

import dspy
from pydantic import BaseModel, ConfigDict, Field

from dspy_ray.client.lm import build_lm
from dspy_ray.execution.loading import load_program
from dspy_ray.execution.evaluation import evaluate, score_outcome
from dspy_ray.execution.runner import ProgramRunner
from dspy_ray.execution.scoring import DSPyMetric, EvalSummary, ExampleScore, FieldJudge, TaskMetric
from dspy_ray.endpoints.settings import EndpointSettings
from tasks.base import Task


class EvalContext(BaseModel):
    """Everything an evaluation needs besides the program and the examples (sent to every worker).

    The endpoint settings carry the LM cache's location (``cache``), so every worker opens the same
    store, and answers one worker paid for are free to the others (``docs/optimize.md``).
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    task: Task = Field(..., description="The task: program, metric, refine policy")
    lm: EndpointSettings = Field(..., description="Target endpoint")
    judge: EndpointSettings | None = Field(None, description="Judge endpoint (temperature 0); None = no judge")
    embed: EndpointSettings | None = Field(None, description="Embedding endpoint for resources that need one")
    resources: dict[str, str] = Field(default_factory=dict, description="Resource settings (e.g. an index path)")
    threads: int = Field(8, ge=1, description="Examples in flight per worker (its share of the endpoint budget)")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per worker (the work is I/O bound)")


class EvalRuntime:
    """What one process needs to evaluate: LMs and resources built once, fresh programs on demand."""

    def __init__(self, ctx: EvalContext, lm_factory=build_lm):
        self.ctx = ctx
        self.task = ctx.task
        self.lm = lm_factory(ctx.lm)
        self.judge = FieldJudge(lm_factory(ctx.judge)) if ctx.judge is not None else None
        self.resources = ctx.task.program.open_resources(ctx.resources, ctx.embed)

    def fresh_program(self, state: dict[str, Any] | None = None) -> dspy.Module:
        return load_program(self.task.program, resources=self.resources, state=state).program

    def runner(self, program: dspy.Module) -> ProgramRunner:
        return self.task.runner(program, self.lm, max_in_flight=self.ctx.threads)

    def evaluate(self, program: dspy.Module, examples: list[dspy.Example]) -> list[ExampleScore]:
        return evaluate_program(program, examples, self.task.metric, runner=self.runner(program), judge=self.judge,
                                threads=self.ctx.threads)


def evaluate_program(
    program: dspy.Module,
    examples: list[dspy.Example],
    metric: TaskMetric,
    *,
    runner: ProgramRunner,
    judge: FieldJudge | None = None,
    threads: int = 8,
) -> list[ExampleScore]:
    """Score ``program`` on every example, ``threads`` at a time; one ExampleScore per example, in order.

    Failures are data: an example whose program call fails scores 0 with
    ``program_error`` set.  Misconfiguration (bad key, unknown model) is raised
    by the runner, since every example would fail the same way.
    """
    return evaluate(runner, examples, lambda example, outcome: score_outcome(example, outcome, metric, judge),
                    threads=threads, program=program)


def chunked(items: list, n: int) -> list[list]:
    """``items`` in at most ``n`` contiguous chunks of near-equal size."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class Pool(Protocol):
    """What evaluation and candidate generation need from the worker pool (:class:`optimize.workers.WorkerPool`)."""

    size: int  # workers: calls that run at once

    def map(self, calls: Iterable[tuple[Hashable, str, tuple]]) -> dict[Hashable, Any]:
        """Run every (tag, worker method, args), ``size`` at a time; tag -> result."""
        ...


def evaluate_on_ray(program: dspy.Module, examples: list[dspy.Example], pool: Pool) -> list[ExampleScore]:
    """Evaluate on every worker of ``pool`` at once (a chunk each); results in example order."""
    state = program.dump_state()
    parts = chunked(examples, pool.size)
    done = pool.map([(i, "evaluate_state", (state, part)) for i, part in enumerate(parts)])
    return [score for i in range(len(parts)) for score in done[i]]


# -- inside DSPy's own optimizers ----------------------------------------------------


class EvalPoint(BaseModel):
    """One evaluation made during a compile, for the trajectory plot."""

    step: int
    score: float
    n: int
    kind: str  # "full" (the whole valset) or "minibatch"
    seconds: float


class EvalLog:
    """Evaluations made by RayEvaluate during one compile (thread-safe: COPRO/GEPA may evaluate concurrently)."""

    def __init__(self, full_size: int):
        self.full_size = full_size
        self.points: list[EvalPoint] = []
        self._lock = threading.Lock()

    def add(self, summary: EvalSummary, seconds: float) -> None:
        with self._lock:
            kind = "full" if summary.n >= self.full_size else "minibatch"
            self.points.append(EvalPoint(step=len(self.points), score=summary.score, n=summary.n, kind=kind,
                                         seconds=seconds))


class RayEvaluate(dspy.Evaluate):
    """``dspy.Evaluate`` that scores on the Ray worker pool with the task's metric.

    DSPy's optimizers build ``Evaluate(devset=..., metric=..., num_threads=...)``
    themselves; :func:`ray_evaluation` makes that name resolve to this class.  The
    metric they pass must be the run's :class:`~dspy_ray.execution.scoring.DSPyMetric` (the same
    scoring runs on the workers); judge failures seen there are added to its tally.
    """

    def __init__(self, *, metric_of: TaskMetric, pool: Pool, log: EvalLog, **kwargs):
        super().__init__(**kwargs)
        self.task_metric, self.pool, self.log = metric_of, pool, log

    def __call__(self, program, metric=None, devset=None, *args, **kwargs):
        metric = metric if metric is not None else self.metric
        devset = devset if devset is not None else self.devset
        if not isinstance(metric, DSPyMetric):
            raise TypeError(f"RayEvaluate scores with the task metric; got {metric!r}")
        start = time.perf_counter()
        scores = evaluate_on_ray(program, list(devset), self.pool)
        summary = EvalSummary.of(scores, self.task_metric)
        with metric._lock:
            metric.tally.calls += len(scores)
            metric.tally.judge_errors += summary.judge_errors
            metric.tally.program_errors += summary.program_errors
        self.log.add(summary, time.perf_counter() - start)
        results = [(ex, dspy.Prediction(**s.outputs), s.score) for ex, s in zip(devset, scores)]
        # dspy.Evaluate reports percentages.
        return dspy.evaluate.evaluate.EvaluationResult(score=round(100 * summary.score, 2), results=results)


@contextlib.contextmanager
def ray_evaluation(metric: TaskMetric, pool: Pool, log: EvalLog):
    """Within the block, DSPy's random-search, COPRO and GEPA optimizers evaluate on Ray."""
    from unittest import mock

    import dspy.teleprompt.copro_optimizer as copro
    import dspy.teleprompt.gepa.gepa_utils as gepa_utils
    import dspy.teleprompt.random_search as random_search

    def factory(*args, **kwargs):
        return RayEvaluate(*args, metric_of=metric, pool=pool, log=log, **kwargs)

    # GEPA's plain evaluations (the valset ones) go to Ray; those that capture traces for reflection
    # stay in the driver, since the traces are Python objects of this process.
    with mock.patch.object(random_search, "Evaluate", factory), mock.patch.object(copro, "Evaluate", factory), \
            mock.patch.object(gepa_utils, "Evaluate", factory):
        yield
