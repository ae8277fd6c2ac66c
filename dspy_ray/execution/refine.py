"""Validation retries with ``dspy.Refine``, safe under concurrency.

``dspy.Refine`` keeps a failure budget on the instance (``fail_count``) and
decrements it on every failed attempt, so one instance shared by the rows of a
long-lived actor leaks that budget from row to row.  Here every refined call
gets its own ``Refine`` over the shared (read-only) program, so nothing carries
over between rows.

The first attempt of each row is a plain call (:class:`dspy_ray.execution.runner.ProgramRunner`);
only rows whose output fails the reward come here, run Refine's remaining
attempts (with its LM-written feedback between attempts) on a worker thread
(the row's own; a row of a program that runs async hops to one: ``dspy.Refine`` has no
async path in DSPy 3.4), and keep the best output when the threshold is never met.

    >>> reward = reward_fields_present(("answer",))
    >>> reward({}, {"answer": "42"}), reward({}, {"answer": " "})
    (1.0, 0.0)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dspy

from dspy_ray.client.usage import Usage
from programs.fields import field_of

_NEW_REFINE = threading.Lock()


@dataclass
class RefineOutcome:
    """What one row produced: the prediction (None when nothing usable came back), its reward and errors."""

    prediction: Any | None
    score: float
    errors: list[str] = field(default_factory=list)
    lm_failure: bool = False  # the endpoint failed after retries (not the output)
    usage: Usage = field(default_factory=Usage)  # every LM call the row made: first attempt, Refine, retries


def is_present(value: Any) -> bool:
    """A usable output value: not None and, for text, not blank (0, False and [] are answers)."""
    if value is None:
        return False
    return bool(value.strip()) if isinstance(value, str) else True


def reward_fields_present(output_fields: tuple[str, ...]) -> Callable[[dict, Any], float]:
    """Reward = share of output fields that came back non-empty (1.0 when all did).

    Literal fields need no check here: the adapter already refuses a value
    outside the Literal, which counts as a failed attempt.
    """

    def reward(args: dict, pred: Any) -> float:
        present = sum(1 for name in output_fields if is_present(field_of(pred, name)))
        return present / len(output_fields) if output_fields else 1.0

    reward.__name__ = "reward_fields_present"
    return reward


def refine_call(
    program: dspy.Module,
    inputs: dict[str, Any],
    *,
    lm: dspy.BaseLM,
    adapter: dspy.Adapter,
    reward_fn: Callable[[dict, Any], float],
    attempts: int,
    threshold: float,
    fallback: tuple[Any | None, float] = (None, 0.0),
    first_error: BaseException | None = None,
) -> RefineOutcome:
    """Run ``attempts`` more tries through a fresh ``dspy.Refine``; never raises for bad outputs."""
    try:
        # Refine reads its module's source (``inspect.getsource``: an ``ast.parse`` of the file), which
        # CPython 3.11 cannot do on two threads at once (SystemError: AST constructor recursion depth mismatch).
        with _NEW_REFINE:
            refine = dspy.Refine(module=program, N=attempts, reward_fn=reward_fn, threshold=threshold)
        with dspy.context(lm=lm, adapter=adapter):
            prediction = refine(**inputs)
    except Exception as exc:  # noqa: BLE001 - an error entry, not a lost row
        prediction, error = None, exc
    else:
        error = None
    best, best_score = fallback
    if prediction is not None:
        score = reward_fn(inputs, prediction)
        if score >= best_score or best is None:
            best, best_score = prediction, score
    if best is not None and best_score >= threshold:
        return RefineOutcome(best, best_score, [])
    reason = error or first_error
    detail = f" (last error {type(reason).__name__}: {' '.join(str(reason).split())[:200]})" if reason else ""
    if best is None:
        return RefineOutcome(None, 0.0, [f"no valid output after {attempts + 1} attempts{detail}"])
    return RefineOutcome(
        best,
        best_score,
        [f"output below validation threshold after {attempts + 1} attempts: best reward "
         f"{best_score:.2f} < {threshold}; kept the best output{detail}"],
    )
