"""A MIPROv2 trial as a pure function: (candidate indices, example ids) -> TrialResult.

Nothing is shared with the search loop: the trial builds its program from the
candidate set, scores it on the examples it was given and returns everything
it saw.  The driver persists the result and tells the study; a worker can die
at any point and the trial is simply run again.

    >>> request = TrialRequest(number=7, kind="minibatch", params={"0_predictor_instruction": 2,
    ...                        "0_predictor_demos": 1}, example_ids=["call-1", "call-2"])
    >>> result = run_trial(request, candidates, examples_by_id, runtime)       # doctest: +SKIP
    >>> result.summary.score, result.summary.field_accuracy                    # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Literal

import dspy
from pydantic import BaseModel, ConfigDict, Field

from dspy_ray.execution.scoring import EvalSummary, ExampleScore, TaskMetric
from optimize.candidates import CandidateSet
from optimize.evaluation import EvalRuntime

TrialKind = Literal["minibatch", "full"]


class TrialRequest(BaseModel):
    """What one worker evaluates: a candidate combination on some examples."""

    model_config = ConfigDict(frozen=True)

    number: int = Field(..., description="Optuna trial number (full evaluations: their study trial or -1)")
    kind: TrialKind = Field(..., description="minibatch trial or (a chunk of) a full evaluation")
    params: dict[str, int] = Field(..., description="Parameter name -> candidate index")
    example_ids: list[str] = Field(..., description="Examples to score, by id")
    full_eval: int | None = Field(None, description="Full evaluation sequence number (0 = baseline)")
    chunk: int = Field(0, description="Chunk of a full evaluation split across workers")


class TrialResult(BaseModel):
    """Everything a trial measured; persisted as JSON, one file per finished trial."""

    number: int
    kind: TrialKind
    params: dict[str, int]
    full_eval: int | None = None
    chunk: int = 0
    scores: list[ExampleScore]
    summary: EvalSummary
    seconds: float
    worker_pid: int
    finished_at: str

    @property
    def score(self) -> float:
        return self.summary.score


def run_trial(
    request: TrialRequest,
    candidates: CandidateSet,
    examples_by_id: dict[str, dspy.Example],
    runtime: EvalRuntime,
) -> TrialResult:
    """Build the candidate program and score it; depends only on its arguments (and the LM's answers)."""
    start = time.perf_counter()
    program = candidates.apply(runtime.fresh_program(), request.params)
    examples = [examples_by_id[i] for i in request.example_ids]
    scores = runtime.evaluate(program, examples)
    return TrialResult(
        number=request.number,
        kind=request.kind,
        params=dict(request.params),
        full_eval=request.full_eval,
        chunk=request.chunk,
        scores=scores,
        summary=EvalSummary.of(scores, runtime.task.metric),
        seconds=time.perf_counter() - start,
        worker_pid=os.getpid(),
        finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
    )


def merge_chunks(parts: list[TrialResult], metric: TaskMetric) -> TrialResult:
    """One full-evaluation result from its chunks (any order)."""
    parts = sorted(parts, key=lambda r: r.chunk)
    scores = [s for p in parts for s in p.scores]
    first = parts[0]
    return first.model_copy(update={
        "chunk": 0,
        "scores": scores,
        "summary": EvalSummary.of(scores, metric),
        "seconds": max(p.seconds for p in parts),
        "finished_at": max(p.finished_at for p in parts),
    })
