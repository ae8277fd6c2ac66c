"""One call of a DSPy program with this project's policy: the one path for batch, optimize and serve.

* the call runs the module's own (sync) ``forward`` under ``dspy.context(lm=...)``;
* transient LM failures were already retried inside the LM (:mod:`dspy_ray.client.lm`);
  what still fails is reported, not raised;
* an output below the reward threshold goes to a fresh ``dspy.Refine``
  (:mod:`dspy_ray.execution.refine`); when the threshold is never met the best output is
  kept and the outcome says so;
* misconfiguration (bad key, unknown model) is raised: it would fail every call.

Batch stages and Serve replicas ``await runner.predict(inputs)`` (one thread hop
per row, :class:`ThreadHop`); the optimizer's evaluations call ``runner.run(inputs)``
from their own threads.  Both are the same code, so the score an artifact records is the score
its users get.

    >>> runner = ProgramRunner(program, lm, output_fields=("answer",))   # doctest: +SKIP
    >>> outcome = await runner.predict({"question": "..."})              # doctest: +SKIP
    >>> outcome.prediction, outcome.errors                                # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

import dspy
from dspy.utils.exceptions import (
    LMAuthError,
    LMConfigurationError,
    LMError,
    LMNotConfiguredError,
    LMUnsupportedModelError,
)

from dspy_ray.client.json_adapter import CachingJSONAdapter
from dspy_ray.execution.refine import RefineOutcome, refine_call, reward_fields_present
from dspy_ray.client.usage import metered

# Raised as-is: the same failure would repeat on every call.
FATAL_ERRORS = (LMAuthError, LMConfigurationError, LMNotConfiguredError, LMUnsupportedModelError)
LM_FAILURE_PREFIX = "LM call failed after retries"

class ThreadHop:
    """Blocking calls on worker threads, results handed back to their event loop in bursts.

    ``asyncio.to_thread`` costs, per call, a ``ThreadPoolExecutor`` submit, a concurrent
    future chained to an asyncio one and a self-pipe write to wake the loop; at thousands
    of rows a second that is a tenth of a row's CPU.  Here work goes through a
    ``SimpleQueue`` to threads made as needed (up to ``max_threads``: each row in flight
    holds one while its LM call blocks), and finished results wait in a per-loop inbox
    that one ``call_soon_threadsafe`` drains, however many finished meanwhile.
    Context variables travel with each call, as with ``asyncio.to_thread``.
    """

    def __init__(self) -> None:
        self.max_threads = 0
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._queued = 0
        self._inboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def ensure(self, max_threads: int) -> None:
        with self._lock:
            self.max_threads = max(self.max_threads, max_threads)

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """``fn(*args)`` on a worker thread; await the returned future on the running loop."""
        loop = asyncio.get_running_loop()
        inbox = self._inboxes.get(loop)
        if inbox is None:
            inbox = self._inboxes[loop] = _Inbox(loop)
        future = loop.create_future()
        self._work.put((inbox, future, contextvars.copy_context(), fn, args))
        with self._lock:
            self._queued += 1
            spawn = self._queued > self._idle and self._threads < max(1, self.max_threads)
            if spawn:
                self._threads += 1
        if spawn:
            threading.Thread(target=self._worker, name="dspy-row", daemon=True).start()
        return future

    def _worker(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            inbox, future, context, fn, args = self._work.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            try:
                result, error = context.run(fn, *args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            inbox.put(future, result, error)


class _Inbox:
    """Results finished on worker threads, for one event loop; drained in one loop callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.done: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def put(self, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        self.done.append((future, result, error))
        with self.lock:
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # the loop is closed: nobody awaits these any more
            pass

    def drain(self) -> None:
        with self.lock:
            self.scheduled = False
        while self.done:
            future, result, error = self.done.popleft()
            if future.cancelled():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


_HOP = ThreadHop()


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
        _HOP.ensure(self.max_in_flight + 8)
        return await _HOP.run(self.run, inputs, program)

    def run(self, inputs: dict[str, Any], program: dspy.Module | None = None) -> RefineOutcome:
        """One row: first attempt, then Refine for an output below the threshold. Blocks; never raises for bad output.

        The outcome's ``usage`` counts every LM call the row made (:mod:`dspy_ray.client.usage`).
        """
        with metered() as usage:
            outcome = self._run(inputs, program or self.program)
        outcome.usage = usage
        return outcome

    def _run(self, inputs: dict[str, Any], program: dspy.Module) -> RefineOutcome:
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
