"""One call of a DSPy program with this project's policy: the one path for batch, optimize and serve.

* the call runs the module's own (sync) ``forward`` under ``dspy.context(lm=...)``;
* transient LM failures were already retried inside the LM (:mod:`core.lm`);
  what still fails is reported, not raised;
* an output below the reward threshold goes to a fresh ``dspy.Refine``
  (:mod:`core.refine`); when the threshold is never met the best output is
  kept and the outcome says so;
* misconfiguration (bad key, unknown model) is raised: it would fail every call.

Batch stages and Serve replicas ``await runner.predict(inputs)`` (one thread hop
per row); the optimizer's evaluations call ``runner.run(inputs)`` from their own
threads.  Both are the same code, so the score an artifact records is the score
its users get.

    >>> runner = ProgramRunner(program, lm, output_fields=("answer",))   # doctest: +SKIP
    >>> outcome = await runner.predict({"question": "..."})              # doctest: +SKIP
    >>> outcome.prediction, outcome.errors                                # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy
from dspy.utils.exceptions import (
    LMAuthError,
    LMConfigurationError,
    LMError,
    LMNotConfiguredError,
    LMUnsupportedModelError,
)

from core.json_adapter import CachingJSONAdapter
from core.refine import RefineOutcome, refine_call, reward_fields_present

# Raised as-is: the same failure would repeat on every call.
FATAL_ERRORS = (LMAuthError, LMConfigurationError, LMNotConfiguredError, LMUnsupportedModelError)
LM_FAILURE_PREFIX = "LM call failed after retries"

_sized_loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ensure_thread_capacity(workers: int) -> None:
    """Give the running loop a default executor with at least ``workers`` threads.

    Each row in flight holds one thread while its (blocking) LM call runs; the
    stock executor has min(32, CPUs + 4) threads, 6 on a 2-core node.
    """
    loop = asyncio.get_running_loop()
    if _sized_loops.get(loop, 0) >= workers:
        return
    loop.set_default_executor(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dspy-lm"))
    _sized_loops[loop] = workers


class ProgramRunner:
    """Runs one program with retries, Refine and errors-as-data; shared by every caller of a program."""

    def __init__(
        self,
        program: dspy.Module,
        lm: dspy.BaseLM,
        *,
        output_fields: tuple[str, ...],
        adapter: dspy.Adapter | None = None,
        refine_attempts: int = 3,
        refine_threshold: float = 1.0,
        reward_fn: Callable[[dict, Any], float] | None = None,
        max_in_flight: int = 64,
    ):
        self.max_in_flight = max_in_flight
        self.program = program
        self.lm = lm
        self.adapter = adapter or CachingJSONAdapter()
        self.refine_attempts = refine_attempts
        self.refine_threshold = refine_threshold
        self.reward_fn = reward_fn or reward_fields_present(output_fields)

    async def predict(self, inputs: dict[str, Any], program: dspy.Module | None = None) -> RefineOutcome:
        """:meth:`run` in a worker thread; ``program`` overrides the runner's (Serve pins a version per request)."""
        ensure_thread_capacity(self.max_in_flight + 8)
        return await asyncio.to_thread(self.run, inputs, program)

    def run(self, inputs: dict[str, Any], program: dspy.Module | None = None) -> RefineOutcome:
        """One row: first attempt, then Refine for an output below the threshold. Blocks; never raises for bad output."""
        program = program or self.program
        first_error: BaseException | None = None
        prediction, score = None, 0.0
        try:
            with dspy.context(lm=self.lm, adapter=self.adapter):
                prediction = program(**inputs)
            score = self.reward_fn(inputs, prediction)
            if score >= self.refine_threshold:
                return RefineOutcome(prediction, score, [])
        except FATAL_ERRORS:
            raise
        except LMError as exc:
            return RefineOutcome(None, 0.0, [f"{LM_FAILURE_PREFIX}: {describe(exc)}"], lm_failure=True)
        except Exception as exc:  # noqa: BLE001 - unparseable output: Refine's job
            first_error = exc
        if self.refine_attempts <= 1:
            reason = describe(first_error) if first_error else f"reward {score:.2f} < {self.refine_threshold}"
            return RefineOutcome(prediction, score, [f"output failed validation: {reason}"])
        return refine_call(
            program,
            inputs,
            lm=self.lm,
            adapter=self.adapter,
            reward_fn=self.reward_fn,
            attempts=self.refine_attempts - 1,
            threshold=self.refine_threshold,
            fallback=(prediction, score),
            first_error=first_error,
        )


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
