"""W long-lived Ray actors that do an optimization run's LM work: candidates, trials, evaluations.

Why actors and not tasks: a worker process imports DSPy and builds its LM
clients once (seconds of CPU on a small machine) and keeps them, with their
connection pools, for the whole run.  Ray keeps only about ``num_cpus`` idle
task workers alive, so with tasks a run with more workers than CPUs would
restart processes between phases and pay the imports again and again.

An actor that dies (its node preempted) is restarted by Ray and the call it was
running is retried (``max_restarts``/``max_task_retries``); the calls are pure
functions of their arguments, so a retry is harmless.

    >>> pool = WorkerPool(ctx, size=4)                                         # doctest: +SKIP
    >>> results = pool.map([("a", "evaluate_state", (state, examples))])       # doctest: +SKIP
    >>> pool.shutdown()                                                        # doctest: +SKIP
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from collections.abc import Hashable, Iterable
from typing import Any

import dspy

from dspy_ray.client.cache import close_caches
from dspy_ray.client.json_adapter import CachingJSONAdapter
from dspy_ray.execution.scoring import DSPyMetric
from optimize.candidates import (
    CandidateSet,
    DemoSetPlan,
    MiproCandidateSettings,
    ProposalPlan,
    make_demo_set,
    propose_instruction,
    quiet_dspy,
    summarize_dataset,
)
from dspy_ray.client.usage import merge_by_key, process_usage
from optimize.evaluation import EvalContext, EvalRuntime
from optimize.trial import TrialRequest, TrialResult, run_trial

FLUSH_TIMEOUT_S = 10.0  # how long shutdown waits for the workers to write their pending LM cache entries


class EvalWorker:
    """The actor body: LMs and resources built once (:class:`EvalRuntime`), then any number of calls."""

    def __init__(self, ctx: EvalContext):
        self.runtime = EvalRuntime(ctx)

    def trial(self, request: TrialRequest, candidates: CandidateSet,
              examples_by_id: dict[str, dspy.Example]) -> TrialResult:
        return run_trial(request, candidates, examples_by_id, self.runtime)

    def evaluate_state(self, state: dict[str, Any], examples: list[dspy.Example]) -> list:
        return self.runtime.evaluate(self.runtime.fresh_program(state), examples)

    # -- MIPROv2's candidates (optimize.candidates) -------------------------------------

    def predictors(self) -> list[tuple[str, str]]:
        """(name, original instructions) of each predictor of a fresh program."""
        return [(name, p.signature.instructions) for name, p in self.runtime.fresh_program().named_predictors()]

    def demo_set(self, plan: DemoSetPlan, trainset: list[dspy.Example], max_errors: int | None):
        metric = DSPyMetric(self.runtime.task.metric, name=self.runtime.task.name)
        with quiet_dspy(self.runtime.lm, CachingJSONAdapter()):
            return make_demo_set(plan, self.runtime.fresh_program(), trainset, metric, max_errors)

    def summary(self, trainset: list[dspy.Example], view_data_batch_size: int) -> str | None:
        with quiet_dspy(self.runtime.lm, CachingJSONAdapter()):
            return summarize_dataset(trainset, view_data_batch_size, self.runtime.lm)

    def propose(self, plan: ProposalPlan, demo_candidates, data_summary: str | None,
                settings: MiproCandidateSettings) -> str:
        with quiet_dspy(self.runtime.lm, CachingJSONAdapter()):
            return propose_instruction(plan, self.runtime.fresh_program(), demo_candidates, data_summary, settings,
                                       self.runtime.lm)

    def ready(self) -> bool:
        return True

    def usage(self) -> dict[str, dict[str, Any]]:
        """Every LM call this worker's process made, by endpoint (:func:`dspy_ray.client.usage.process_usage`)."""
        return process_usage()

    def close_caches(self) -> None:
        """Write the answers this process's LM cache still holds in memory, and let go of its stores."""
        close_caches()

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """This process's LM cache counters (hits, misses, puts, errors, ...) by role, for roles with a cache."""
        lms = {"lm": self.runtime.lm, "judge": self.runtime.judge.lm if self.runtime.judge is not None else None}
        return {role: lm.cache_store.stats().as_dict() for role, lm in lms.items()
                if lm is not None and getattr(lm, "cache_store", None) is not None}


MAX_REPLACEMENTS = 3  # how often one call may lose its worker (node) before the run gives up


@dataclass(frozen=True)
class _Call:
    method: str
    args: tuple
    replacements: int = 0

    def again(self) -> _Call:
        return _Call(self.method, self.args, self.replacements + 1)


class WorkerPool:
    """``size`` EvalWorker actors and the calls running on them (one per actor at a time)."""

    def __init__(self, ctx: EvalContext, size: int):
        import ray

        self._new = lambda: ray.remote(EvalWorker).options(num_cpus=ctx.num_cpus, max_restarts=3,
                                                            max_task_retries=3).remote(ctx)
        self.size = size
        self.actors = [self._new() for _ in range(size)]
        self.idle = list(self.actors)
        self.pending: dict[Any, tuple[Any, Hashable, _Call]] = {}  # ObjectRef -> (actor, tag, the call)
        self._map_lock = threading.Lock()  # DSPy's optimizers may evaluate from several threads

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def busy(self) -> int:
        return len(self.pending)

    def has_idle(self) -> bool:
        return bool(self.idle)

    def submit(self, tag: Hashable, method: str, *args: Any) -> None:
        """Start ``method(*args)`` on an idle actor; ``tag`` comes back with its result."""
        if not self.idle:
            raise RuntimeError("no idle worker: wait for one first")
        self._start(self.idle.pop(), tag, _Call(method, args))

    def _start(self, actor: Any, tag: Hashable, call: _Call) -> None:
        self.pending[getattr(actor, call.method).remote(*call.args)] = (actor, tag, call)

    def wait_one(self) -> tuple[Hashable, Any]:
        """(tag, result) of the next call to finish; a failed call raises its Ray error.

        A worker lost with its node (dead, or unreachable past Ray's own retries) is replaced by a new
        one and its call started again there, up to ``MAX_REPLACEMENTS`` times; only that call is redone.
        """
        import ray

        while True:
            [ref], _ = ray.wait(list(self.pending), num_returns=1)
            actor, tag, call = self.pending.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError):
                if call.replacements >= MAX_REPLACEMENTS:
                    self.idle.append(actor)
                    raise
                self._start(self._replace(actor), tag, call.again())
                continue
            self.idle.append(actor)
            return tag, result

    def _replace(self, actor: Any) -> Any:
        import ray

        ray.kill(actor, no_restart=True)
        new = self._new()
        self.actors[self.actors.index(actor)] = new
        return new

    def map(self, calls: Iterable[tuple[Hashable, str, tuple]]) -> dict[Hashable, Any]:
        """Run every (tag, method, args) on the pool, at most ``size`` at once; tag -> result."""
        with self._map_lock:
            queue, results = list(calls), {}
            while queue or self.pending:
                while queue and self.idle:
                    tag, method, args = queue.pop(0)
                    self.submit(tag, method, *args)
                tag, result = self.wait_one()
                results[tag] = result
            return results

    def usage(self) -> dict[str, dict[str, Any]]:
        """The workers' LM usage, summed by endpoint (a worker that cannot answer is left out)."""
        import ray

        answers = []
        for actor in self.actors:
            try:
                answers.append(ray.get(actor.usage.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - a dead worker's calls are lost to the report, not to the run
                continue
        return merge_by_key(*answers)

    def shutdown(self) -> None:
        import ray

        # ray.kill skips a process's exit hooks: the idle workers write their pending cache entries first
        # (a busy one is abandoned with its call; waiting for it would hold up a Ctrl-C).
        flushes = [actor.close_caches.remote() for actor in self.idle]
        if flushes:
            ray.wait(flushes, num_returns=len(flushes), timeout=FLUSH_TIMEOUT_S)
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.idle, self.pending = [], [], {}
