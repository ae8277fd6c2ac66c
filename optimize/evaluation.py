"""Evaluating a program on examples: in threads, on the Ray worker pool, or inside DSPy's own optimizers.

Three layers, each a thin wrapper over the one below:

* :func:`evaluate_program` - one program, many examples, a bounded thread pool,
  every example scored by :func:`optimize.metric.score_prediction`; the LM and
  judge are passed in, so it runs without Ray in tests.
* :func:`evaluate_on_ray` - the examples split into chunks, one per worker of
  a :class:`~optimize.workers.WorkerPool`; the program travels as its JSON state.
* :class:`RayEvaluate` - a ``dspy.Evaluate`` whose calls go to
  :func:`evaluate_on_ray`; :func:`ray_evaluation` installs it inside DSPy's
  ``BootstrapFewShotWithRandomSearch``, ``COPRO`` and GEPA for the length of a compile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import dspy
from pydantic import BaseModel, ConfigDict, Field

from optimize.data import PipelineSpec
from optimize.metric import EvalSummary, ExampleScore, PipelineMetric, SummaryJudge, score_prediction
from stages.config import EndpointSettings

if TYPE_CHECKING:
    from optimize.workers import WorkerPool

logger = logging.getLogger(__name__)


class EvalContext(BaseModel):
    """Everything an evaluation task needs besides the program and the examples."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    spec: PipelineSpec = Field(..., description="Pipeline: program name and scored fields")
    lm: EndpointSettings = Field(..., description="Target endpoint")
    judge: EndpointSettings | None = Field(None, description="Judge endpoint (temperature 0); None = no judge")
    threads: int = Field(8, ge=1, description="Examples in flight per task (its share of the endpoint budget)")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per evaluation task (the work is I/O bound)")


def build_lms(ctx: EvalContext, lm_factory=None) -> tuple[dspy.BaseLM, SummaryJudge | None]:
    from stages.lm import build_lm

    factory = lm_factory or build_lm
    judge = SummaryJudge(factory(ctx.judge)) if ctx.judge is not None else None
    return factory(ctx.lm), judge


def evaluate_program(
    program: dspy.Module,
    examples: list[dspy.Example],
    spec: PipelineSpec,
    *,
    lm: dspy.BaseLM,
    judge: SummaryJudge | None = None,
    threads: int = 8,
    adapter: dspy.Adapter | None = None,
) -> list[ExampleScore]:
    """Score ``program`` on every example, ``threads`` at a time; one ExampleScore per example, in order.

    Failures are data: an example whose program call fails scores 0 with
    ``program_error`` set.  Misconfiguration (bad key, unknown model) is raised,
    since every example would fail the same way.
    """
    from dspy.utils.exceptions import LMError

    from stages.adapter import CachingJSONAdapter
    from stages.predict import FATAL_ERRORS, describe

    adapter = adapter or CachingJSONAdapter()

    def one(example: dspy.Example) -> ExampleScore:
        example_id = str(example.get("id", ""))
        try:
            with dspy.context(lm=lm, adapter=adapter):
                prediction = program(**example.inputs())
        except FATAL_ERRORS:
            raise
        except LMError as exc:
            return ExampleScore(example_id=example_id, program_error=f"LM call failed: {describe(exc)}", lm_failure=True)
        except Exception as exc:  # noqa: BLE001 - unparseable output is this candidate's failure
            return ExampleScore(example_id=example_id, program_error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return score_prediction(example, prediction, spec, judge)

    if not examples:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(examples))), thread_name_prefix="eval") as pool:
        return list(pool.map(one, examples))


def module_from_state(program: str, state: dict[str, Any]) -> dspy.Module:
    """A fresh ``program`` with ``state`` (``dump_state()`` JSON) loaded, checked like a file would be."""
    from programs.loading import check_state_fits, resolve_program_class

    module = resolve_program_class(program)()
    state = {k: v for k, v in state.items() if k != "metadata"}
    check_state_fits(module, state, f"{program} state")
    module.load_state(state)
    return module


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


def evaluate_on_ray(program: dspy.Module, examples: list[dspy.Example], pool: WorkerPool) -> list[ExampleScore]:
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
        self.summaries: list[EvalSummary] = []
        self._lock = threading.Lock()

    def add(self, summary: EvalSummary, seconds: float) -> None:
        with self._lock:
            kind = "full" if summary.n >= self.full_size else "minibatch"
            self.points.append(EvalPoint(step=len(self.points), score=summary.score, n=summary.n, kind=kind,
                                         seconds=seconds))
            self.summaries.append(summary)


class RayEvaluate(dspy.Evaluate):
    """``dspy.Evaluate`` that scores on the Ray worker pool with the pipeline's metric.

    DSPy's optimizers build ``Evaluate(devset=..., metric=..., num_threads=...)``
    themselves; :func:`ray_evaluation` makes that name resolve to this class.  The
    metric they pass must be the run's :class:`PipelineMetric` (the same scoring
    runs in the tasks); judge failures seen in the tasks are added to its tally.
    """

    def __init__(self, *, ctx: EvalContext, pool: WorkerPool, log: EvalLog, **kwargs):
        super().__init__(**kwargs)
        self.ctx, self.pool, self.log = ctx, pool, log

    def __call__(self, program, metric=None, devset=None, *args, **kwargs):
        metric = metric if metric is not None else self.metric
        devset = devset if devset is not None else self.devset
        if not isinstance(metric, PipelineMetric):
            raise TypeError(f"RayEvaluate scores with the pipeline metric; got {metric!r}")
        start = time.perf_counter()
        scores = evaluate_on_ray(program, list(devset), self.pool)
        summary = EvalSummary.of(scores, self.ctx.spec.label_fields)
        with metric._lock:
            metric.tally.calls += len(scores)
            metric.tally.judge_errors += summary.judge_errors
            metric.tally.program_errors += summary.program_errors
        self.log.add(summary, time.perf_counter() - start)
        results = [(ex, dspy.Prediction(**s.outputs), s.score) for ex, s in zip(devset, scores)]
        # dspy.Evaluate reports percentages.
        return dspy.evaluate.evaluate.EvaluationResult(score=round(100 * summary.score, 2), results=results)


@contextlib.contextmanager
def ray_evaluation(ctx: EvalContext, pool: WorkerPool, log: EvalLog):
    """Within the block, DSPy's random-search, COPRO and GEPA optimizers evaluate on Ray."""
    from unittest import mock

    import dspy.teleprompt.copro_optimizer as copro
    import dspy.teleprompt.gepa.gepa_utils as gepa_utils
    import dspy.teleprompt.random_search as random_search

    def factory(*args, **kwargs):
        return RayEvaluate(*args, ctx=ctx, pool=pool, log=log, **kwargs)

    # GEPA's plain evaluations (the valset ones) go to Ray; those that capture traces for reflection
    # stay in the driver, since the traces are Python objects of this process.
    with mock.patch.object(random_search, "Evaluate", factory), mock.patch.object(copro, "Evaluate", factory), \
            mock.patch.object(gepa_utils, "Evaluate", factory):
        yield
