"""One call of a DSPy program with this project's policy: the one path for batch, optimize and serve.

* the call runs the module under ``dspy.context(lm=...)``: awaited on the caller's event loop
  when the program runs async (:func:`runs_async`: it defines ``aforward``), else its own
  (sync) ``forward`` on a worker thread;
* transient LM failures were already retried inside the LM (:mod:`dspy_ray.client.lm`);
  what still fails is reported, not raised;
* an output below the reward threshold goes to a fresh ``dspy.Refine``
  (:mod:`dspy_ray.execution.refine`); when the threshold is never met the best output is
  kept and the outcome says so;
* misconfiguration (bad key, unknown model) is raised: it would fail every call.

Batch stages and Serve replicas ``await runner.predict(inputs)``: no thread at all for a program
that runs async (its LM calls are awaited on the loop: :meth:`dspy_ray.client.lm.ResilientLM.acall`),
one thread hop per row for any other (:class:`ThreadHop`; a thread per row in flight, taking
turns at the GIL).  The optimizer's evaluations call ``runner.run(inputs)`` from their own threads.
Both paths judge the output with the same code, so the score an artifact records is the score
its users get.

    >>> runner = ProgramRunner(program, lm, output_fields=("answer",))   # doctest: +SKIP
    >>> outcome = await runner.predict({"question": "..."})              # doctest: +SKIP
    >>> outcome.prediction, outcome.errors                                # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
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
logger = logging.getLogger(__name__)

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
        """One row on the running event loop; ``program`` overrides the runner's (Serve pins a version per request).

        A program that runs async (:func:`runs_async`) is awaited here, no thread involved; any other
        (a custom ``forward`` only) runs :meth:`run` on a worker thread.
        """
        program = program or self.program
        if runs_async(program):
            try:
                return await self.arun(inputs, program)
            except _SyncOnly:
                pass  # a module inside has no async path: this row, and the program's later ones, on a thread
        _HOP.ensure(self.max_in_flight + 8)
        return await _HOP.run(self.run, inputs, program)

    def run(self, inputs: dict[str, Any], program: dspy.Module | None = None) -> RefineOutcome:
        """One row: first attempt, then Refine for an output below the threshold. Blocks; never raises for bad output.

        The outcome's ``usage`` counts every LM call the row made (:mod:`dspy_ray.client.usage`).
        """
        program = program or self.program
        with metered() as usage:
            try:
                with dspy.context(lm=self.lm, adapter=self.adapter):
                    prediction, error = program(**inputs), None
            except FATAL_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - judged below: an error entry or Refine's job
                prediction, error = None, exc
            outcome = self._judge(program, inputs, prediction, error)
            if not isinstance(outcome, RefineOutcome):
                outcome = outcome()  # Refine's remaining attempts, here on this thread
        outcome.usage = usage
        return outcome

    async def arun(self, inputs: dict[str, Any], program: dspy.Module) -> RefineOutcome:
        """:meth:`run` for a program that runs async: ``await program.acall(...)`` on the running loop.

        ``dspy.Refine`` has no async path in DSPy 3.4: a row whose first output fails validation runs
        Refine's remaining attempts on a worker thread (the row's usage meter goes with it).
        """
        with metered() as usage:
            try:
                with dspy.context(lm=self.lm, adapter=self.adapter):
                    prediction, error = await program.acall(**inputs), None
            except FATAL_ERRORS:
                raise
            except AttributeError as exc:
                if exc.name != "aforward":
                    prediction, error = None, exc
                else:  # a sub-module with only ``forward``, called through ``acall``
                    _sync_only(program, exc)
                    raise _SyncOnly from exc
            except Exception as exc:  # noqa: BLE001 - judged below: an error entry or Refine's job
                prediction, error = None, exc
            outcome = self._judge(program, inputs, prediction, error)
            if not isinstance(outcome, RefineOutcome):
                _HOP.ensure(self.max_in_flight + 8)
                outcome = await _HOP.run(outcome)
        outcome.usage = usage
        return outcome

    def _judge(self, program: dspy.Module, inputs: dict[str, Any], prediction: Any, error: BaseException | None
               ) -> RefineOutcome | Callable[[], RefineOutcome]:
        """The row's outcome after its first attempt, or Refine's remaining attempts (to call) when it fell short."""
        score = 0.0
        if isinstance(error, LMError):
            return RefineOutcome(None, 0.0, [f"{LM_FAILURE_PREFIX}: {describe(error)}"], lm_failure=True)
        if error is None:
            try:
                score = self.reward_fn(inputs, prediction)
            except Exception as exc:  # noqa: BLE001 - a reward that cannot read the output: Refine's job
                error = exc
            else:
                if score >= self.refine_threshold:
                    return RefineOutcome(prediction, score, [])
        if self.refine_attempts <= 1:
            reason = describe(error) if error else f"reward {score:.2f} < {self.refine_threshold}"
            return RefineOutcome(prediction, score, [f"output failed validation: {reason}"])
        return functools.partial(
            refine_call,
            program,
            inputs,
            lm=self.lm,
            adapter=self.adapter,
            reward_fn=self.reward_fn,
            attempts=self.refine_attempts - 1,
            threshold=self.refine_threshold,
            fallback=(prediction, score),
            first_error=error,
        )


class _SyncOnly(Exception):
    """The program turned out to need a thread: a module inside it has no ``aforward``."""


_SYNC_ONLY: weakref.WeakSet = weakref.WeakSet()  # programs found to have a module without an async path


def runs_async(program: dspy.Module) -> bool:
    """Whether ``program`` runs on the event loop: it defines ``aforward`` (``dspy.Predict`` and
    ``dspy.ChainOfThought`` do; ``Module.acall`` fails without one) and no module inside it proved sync-only.

    ``dspy.Refine`` and ``dspy.BestOfN`` have none in DSPy 3.4, nor has a module with only ``forward``:
    those run on a worker thread.
    """
    return callable(getattr(type(program), "aforward", None)) and program not in _SYNC_ONLY


def _sync_only(program: dspy.Module, exc: AttributeError) -> None:
    if program not in _SYNC_ONLY:
        _SYNC_ONLY.add(program)
        logger.warning("%s: a module inside it has no aforward (%s); its rows run on worker threads",
                       type(program).__name__, exc)


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
