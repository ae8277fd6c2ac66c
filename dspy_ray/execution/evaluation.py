"""A program run over labelled examples, each outcome scored: the one evaluation path of optimize and serve.

Every example runs through :class:`dspy_ray.execution.runner.ProgramRunner` - the same call,
retries and Refine policy as batch and Serve - ``threads`` at a time, and ``score`` turns each
(example, outcome) into a result.  The optimizer scores with the task's metric
(:func:`score_outcome`); Serve's drift monitor with its live judge.

    >>> scores = evaluate(runner, dev, lambda example, outcome: ..., threads=8)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import dspy

from dspy_ray.execution.refine import RefineOutcome
from dspy_ray.execution.runner import ProgramRunner
from dspy_ray.execution.scoring import ExampleScore, FieldJudge, TaskMetric, score_prediction

T = TypeVar("T")


def evaluate(
    runner: ProgramRunner,
    examples: list[dspy.Example],
    score: Callable[[dspy.Example, RefineOutcome], T],
    *,
    threads: int = 8,
    program: dspy.Module | None = None,
) -> list[T]:
    """``score(example, outcome)`` of every example, in example order; ``program`` overrides the runner's.

    Misconfiguration (bad key, unknown model) is raised by the runner, since every example would fail the
    same way; any other failure reaches ``score`` as an outcome without a prediction.
    """
    if not examples:
        return []

    def one(example: dspy.Example) -> T:
        return score(example, runner.run(dict(example.inputs()), program))

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(examples))), thread_name_prefix="eval") as pool:
        return list(pool.map(one, examples))


def score_outcome(example: dspy.Example, outcome: RefineOutcome, metric: TaskMetric,
                  judge: FieldJudge | None = None) -> ExampleScore:
    """The task metric's score of one outcome; a failed call scores 0 with ``program_error`` set (data, not raised)."""
    if outcome.prediction is None:
        return ExampleScore(example_id=str(example.get("id", "")), lm_failure=outcome.lm_failure,
                            program_error=outcome.errors[0] if outcome.errors else "no output")
    return score_prediction(example, outcome.prediction, metric, judge)
