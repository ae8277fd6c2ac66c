"""The job's coordinator: ONE Ray actor per job (:class:`LimitService`) for all its endpoints.

Inside it, one :class:`LimitCoordinator` per endpoint (base URL + model) merges the signals that
every process of the job reports for that endpoint, runs its :class:`~.policy.AimdPolicy` and
splits the limit into shares.  Below the actor: the calls a process makes to it (join, the
batched report, the state for reports and plots), and what a process does when it is gone.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from dspy_ray.client.limiter.policy import INITIAL_IN_FLIGHT, AimdPolicy, Signals
from dspy_ray.client.limiter.slots import IDLE_GRACE_S, EndpointLimiter, Report, endpoint_key, idle_floor

logger = logging.getLogger(__name__)

MEMBER_TIMEOUT_S = 30.0  # a process silent this long gives its share back (it may be busy, not dead)
SERVICE_NAME = "dspy-endpoint-limits"


@dataclass
class _Member:
    """What the coordinator knows of one process calling the endpoint."""

    granted: float
    demand: int = 0  # in the last report
    held: int = 0  # requests in flight at the last report (a process keeps them while its share shrinks)
    heard: float = field(default_factory=time.monotonic)  # when its latest report came
    window_peak: int = 0  # peaks over the policy's current round
    window_demand: int = 0
    last_report: int = 0  # the number of its latest report
    decided: int = 0  # the number of its latest report the policy has decided with
    idle_since: float | None = None  # when it reported idle, None while it is busy
    weight: float = 1.0  # its share in proportion to this when the limit cannot cover every member's demand (_split)
    grace: float = IDLE_GRACE_S  # how long it keeps its share once idle (its EndpointLimiter.idle_grace)


class LimitCoordinator:
    """Runs one endpoint's limit for every process of a Ray job and splits it into shares.

    Held by the job's :class:`LimitService`, one per endpoint.  Each process reports its
    :class:`Signals` every ``SYNC_INTERVAL_S`` (:mod:`.registry`); the merged
    signals drive one :class:`AimdPolicy`.  A process's share follows its demand; a share
    grows only out of what the other processes neither are granted nor still hold in flight,
    so the ceiling holds for the job at every moment.
    """

    def __init__(self, key: str, ceiling: int, adaptive: bool = True, initial: int = INITIAL_IN_FLIGHT):
        self.key = key
        self.policy = AimdPolicy(ceiling, initial, adaptive=adaptive)
        self.members: dict[str, _Member] = {}
        self.pending = Signals()
        self.pending_reports = 0
        self.reported: set[str] = set()  # the members heard from since the last policy step
        self.clock = time.monotonic  # (tests step it)
        self.started = self.clock()
        self.rise: tuple[float, float] | None = None  # (when, over how long) the policy last raised the limit much
        # (seconds, limit, demand, peak in flight, answered ok, 429s) per policy step, for plots and tests.
        self.history: collections.deque[tuple[float, float, int, int, int, int]] = collections.deque(maxlen=20_000)

    def join(self, member: str) -> dict[str, float]:
        """A new process of the job: no share until it reports a demand.

        A share granted at join would be held by a process that may not call for a long while (a stage
        actor waiting for its first rows reports nothing), and the processes that do call could not
        grow into it until it timed out (``MEMBER_TIMEOUT_S``).  Its first call reports at once.
        """
        now = self.clock()
        self._prune(now)
        self.members[member] = _Member(granted=0.0, heard=now)
        return {"share": 0.0, "background": self.policy.background_rate()}

    def report(self, member: str, signals: dict[str, Any], number: int = 0) -> dict[str, float]:
        """Add one process's signals (its report ``number``); its share, and the latest of its reports the
        policy has decided with (``decided``: a quick local cut on 429s holds until then)."""
        now = self.clock()
        state = self.members.get(member)
        if state is None:
            self.join(member)
            state = self.members[member]
        state.heard = now
        state.last_report = number
        idle = bool(signals.get("idle", False))
        state.weight = max(0.01, float(signals.get("weight", 1.0)))
        incoming = Signals(**{name: value for name, value in signals.items()
                              if name not in ("idle", "weight", "grace", "in_flight")})
        # Idle now: it holds nothing.  It keeps the demand it had while busy (and so its share) for its grace
        # (IDLE_GRACE_S; a batch stage says 0), then wants nothing (_release_idle); its interval's peaks still
        # go to the policy.
        # A Serve replica goes idle between requests many times a second: a share given back at every
        # such gap, and granted again at the next report, left it 2 slots half the time.  Calls answered
        # since the last report: it was busy meanwhile (it says nothing of short busy spells, see
        # EndpointLimiter._waking), so the grace starts again.
        if idle:
            state.held, state.grace = 0, float(signals.get("grace", IDLE_GRACE_S))
            if state.idle_since is None or incoming.answered or incoming.errors:
                state.idle_since = now
        else:
            state.demand, state.idle_since = incoming.demand, None
            state.held = int(signals.get("in_flight", incoming.peak_in_flight))  # a report without it: the peak
        state.window_peak = max(state.window_peak, incoming.peak_in_flight)
        state.window_demand = max(state.window_demand, incoming.demand)
        self.pending.merge(Signals(ok=incoming.ok, overloads=incoming.overloads, errors=incoming.errors,
                                   latency_sum=incoming.latency_sum, latency_hist=incoming.latency_hist))
        self.pending_reports += 1
        self.reported.add(member)
        # One policy step per round of reports, not per report: once every busy member has reported (a
        # process reports only while it calls, so one that waits for rows or has finished would hold a
        # round back), or after as many reports as there are members (one that stopped without a word).
        busy = [name for name, m in self.members.items() if m.idle_since is None and m.last_report]
        if self.pending_reports >= len(self.members) or self.reported.issuperset(busy):
            self._prune(now)
            self.pending.peak_in_flight = sum(m.window_peak for m in self.members.values())
            self.pending.demand = sum(m.window_demand for m in self.members.values())
            for m in self.members.values():
                m.window_peak = m.window_demand = 0
                m.decided = m.last_report
            self.policy.rounding = len(self.members)
            before = self.policy.limit
            self.policy.observe(self.pending, now)
            span = self.policy.rise_span(before)
            if span:
                self.rise = (now, span)
            self.history.append((round(now - self.started, 3), round(self.policy.limit, 1), self.pending.demand,
                                 self.pending.peak_in_flight, self.pending.ok, self.pending.overloads))
            self.pending, self.pending_reports = Signals(), 0
            self.reported.clear()
        return {"share": self._share(member), "background": self.policy.background_rate(), "decided": state.decided,
                "paced": self._paced(now)}

    def _paced(self, now: float) -> float:
        """Over how many seconds a process takes up a rise of its share: what is left of one latency from when
        the limit grew much (:meth:`~.slots.EndpointLimiter.set_share`), else 0 (at once: a share that moves
        between processes, or a probe's step).  What is left, not a whole latency from whenever a process
        hears: all of them have taken up the rise when the policy's next window ends and looks at what was in
        flight, so slow start doubles once a latency, not once every latency and a report interval or two."""
        if self.rise is None:
            return 0.0
        return max(0.0, self.rise[0] + self.rise[1] - now)

    def _prune(self, now: float) -> None:
        for name in [n for n, m in self.members.items() if now - m.heard > MEMBER_TIMEOUT_S]:
            del self.members[name]

    def _release_idle(self, now: float) -> None:
        """Processes idle for their grace (IDLE_GRACE_S, or 0 for a batch stage) want nothing and hold one slot at
        most (a Serve replica's floor, for its next request), none for a batch stage (its next call asks first,
        EndpointLimiter._waking): the rest of their share goes to whoever asks."""
        for m in self.members.values():
            if m.idle_since is not None and now - m.idle_since >= m.grace:
                m.demand, m.granted = 0, min(m.granted, idle_floor(m.grace))

    def _share(self, member: str) -> float:
        self._release_idle(self.clock())
        state = self.members[member]
        if state.idle_since is not None and not state.demand:  # idle past its grace: what _release_idle left it
            return state.granted
        limit = self.policy.limit
        # The limit goes to the processes that want slots: an idle one reports again only once it calls again,
        # and what it was granted meanwhile nobody else could use; one that joined and never called wants none.
        demands = {name: m.demand for name, m in self.members.items() if m.demand > 0}
        demands[member] = max(1, state.demand)
        total = sum(demands.values())
        if total <= limit:  # each its demand, and the spare by demand
            wanted = {name: d + (limit - total) * d / total for name, d in demands.items()}
        else:
            wanted = _split(limit, demands, {name: self.members[name].weight for name in demands})
        # A process sends whole requests: whole shares that add up to the limit's whole part (the
        # floors, then one more slot each to the largest remainders), so no slot is lost to rounding.
        whole = {name: math.floor(v) for name, v in wanted.items()}
        largest = sorted(wanted, key=lambda name: (whole[name] - wanted[name], name))
        for name in largest[:max(0, int(limit) - sum(whole.values()))]:
            whole[name] += 1
        target = max(1.0, float(whole[member]))
        if target > state.granted:  # growth only from what the others do not hold (so never past the ceiling)
            # A process whose share just shrank still has its requests in flight until they end.
            others = sum(max(m.granted, m.held) for name, m in self.members.items() if name != member)
            target = max(state.granted, min(target, limit - others))
        state.granted = target
        return target

    def state(self, history: bool = False) -> dict[str, Any]:
        p = self.policy
        return {"history": list(self.history) if history else None, "key": self.key, "limit": p.limit,
                "ceiling": p.ceiling, "latency_floor": p.latency_floor,
                "w_max": p.w_max, "cuts": p.cuts, "reverted": p.reverted, "background": p.background_rate(),
                "members": {n: {"granted": m.granted, "demand": m.demand, "weight": m.weight}
                            for n, m in self.members.items()}}


def _split(limit: float, demands: dict[str, int], weights: dict[str, float]) -> dict[str, float]:
    """``limit`` (less than the demands add up to) split in proportion to weight, none given more than its
    demand: what a member cannot use goes to the others, in the same proportions (weighted max-min).

    Not in proportion to demand: a stage actor's demand jumps each time a block of rows comes, and a
    split that followed it moved slots between processes all the time; each move leaves slots idle
    until the process giving them up has seen its new share and its requests have ended.  By weight
    alone, shares stay put while every process has more rows than its share.

    >>> _split(100, {"a": 100, "b": 300}, {"a": 1.0, "b": 1.0})
    {'a': 50.0, 'b': 50.0}
    >>> _split(100, {"first": 20, "second": 200}, {"first": 4.0, "second": 1.0})
    {'first': 20, 'second': 80.0}
    """
    wanted: dict[str, float] = {}
    left, open_ = float(limit), dict(demands)
    while open_:
        scale = left / sum(weights[name] for name in open_)
        full = {name: d for name, d in open_.items() if weights[name] * scale >= d}
        if not full:
            wanted.update({name: weights[name] * scale for name in open_})
            break
        for name, d in full.items():
            wanted[name] = d
            left -= d
            del open_[name]
    return wanted


class LimitService:
    """The Ray actor of a job's endpoint limits, one per job: one :class:`LimitCoordinator` per endpoint.

    One actor for all endpoints (LM, judge, embedder) of the job, named ``SERVICE_NAME``; each process
    of the job sends one :meth:`report` every ``SYNC_INTERVAL_S`` for all the endpoints it calls.
    """

    def __init__(self) -> None:
        self.endpoints: dict[str, LimitCoordinator] = {}

    def _endpoint(self, key: str, ceiling: int, adaptive: bool) -> LimitCoordinator:
        coordinator = self.endpoints.get(key)
        if coordinator is None:
            coordinator = self.endpoints[key] = LimitCoordinator(key, ceiling, adaptive)
        elif ceiling < coordinator.policy.ceiling:  # two callers disagree: the lower ceiling holds
            coordinator.policy.ceiling = ceiling
            coordinator.policy.limit = min(coordinator.policy.limit, ceiling)
        return coordinator

    def join(self, key: str, member: str, ceiling: int, adaptive: bool = True) -> dict[str, float]:
        return self._endpoint(key, ceiling, adaptive).join(member)

    def report(self, reports: list[Report]) -> list[dict[str, float]]:
        return [self._endpoint(key, ceiling, adaptive).report(member, signals, number)
                for key, member, signals, ceiling, adaptive, number in reports]

    def forget(self, keys: list[str]) -> int:
        """Drop what was learned for ``keys`` (their next report starts afresh); how many were known."""
        return sum(self.endpoints.pop(key, None) is not None for key in keys)

    def state(self, key: str, history: bool = False) -> dict[str, Any] | None:
        coordinator = self.endpoints.get(key)
        return coordinator.state(history) if coordinator is not None else None


# -- talking to the service, from any process of the job ---------------------------------

_service = None  # this process's handle on the job's LimitService (held: Ray collects an unreferenced actor)
_service_retry_at = 0.0  # after the service did not answer: when to try it again


def ensure_coordinator():
    """Create the job's limit service from this process (the driver), so it lives as long as the job.

    It is placed on the driver's node when that node has room (a worker node may be a spot instance
    that goes), and restarted elsewhere if its node is lost all the same: what it learned is then
    learned again, from the next reports.
    """
    return _service_handle(here=True)


def coordinator_state(base_url: str, model: str, history: bool = False) -> dict[str, Any] | None:
    """The job-wide state of an endpoint's limit (for reports and plots); None without a service."""
    handle = _service_handle()
    return _ray_get(handle.state.remote(endpoint_key(base_url, model), history), timeout=30.0)


def forget_at_service(keys: list[str]) -> None:
    """Tell the job's service, if this process has one, to drop what it learned for ``keys``."""
    if _service is None or not keys or not ray_initialized():
        return
    try:
        _ray_get(_service.forget.remote(keys), timeout=30.0)
    except Exception as exc:  # noqa: BLE001 - gone with its job: nothing left to forget
        logger.debug("endpoint limits: forget at the service failed (%s)", type(exc).__name__)


def ray_initialized() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


def _ray_get(ref, timeout: float):
    import ray

    return ray.get(ref, timeout=timeout)


def _service_handle(here: bool = False):
    global _service
    if _service is None:
        import ray

        options: dict[str, Any] = {"name": SERVICE_NAME, "get_if_exists": True}
        if here:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        # Restarted (empty) when its node is lost; a report to it meanwhile fails and is not retried:
        # its sender decides locally and tries again a second later.
        actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(LimitService)
        _service = actor.options(**options).remote()
    return _service


def attach(limiter: EndpointLimiter) -> None:
    """Join ``limiter``'s endpoint at the service and take the share it grants (none: decide alone)."""
    try:
        handle = _service_handle()
        answer = _ray_get(handle.join.remote(limiter.key, limiter.member, limiter.ceiling, limiter.adaptive),
                          timeout=30.0)
    except Exception as exc:  # noqa: BLE001 - no coordinator: this process decides alone
        logger.warning("endpoint limiter: no coordinator (%s); this process decides its own limit",
                       type(exc).__name__)
        return
    limiter.coordinator = handle
    limiter.set_share(float(answer["share"]))


def retry_due(now: float) -> bool:
    """Whether a limiter without an answering service should try it again now (a second after it failed)."""
    return now >= _service_retry_at


REPORT_TIMEOUT_S = 5.0  # a report unanswered this long: the service is taken for gone

_pending = None  # (sent at, the ObjectRef, its concurrent future) of the latest report in flight


def report_all(coordinated: list[EndpointLimiter], now: float, urgent: bool = False) -> None:
    """Send ``coordinated`` limiters' intervals in one call to the service; never waits for the answer.

    ``urgent`` (a limiter went idle, or calls again after an idle spell): sent even while an earlier
    report is in flight, since nothing else may report for an idle process.  The service runs one
    caller's reports in the order they were sent, so the later one is what it keeps.  Never blocks:
    it may run on a stage's or a replica's event loop.

    Called from the threads that make the calls (:mod:`.registry`), never from a background thread:
    a Ray call from a thread that outlives the worker's task crashes the worker at teardown.  The
    answer (the shares) is applied by Ray's own callback when it comes; apart from urgent ones, one
    report is in flight at a time, and the intervals of the meantime go with the next one.
    """
    global _service, _pending
    if not ray_initialized():  # Ray was shut down in this process: never start it again from here
        for limiter in coordinated:
            limiter.lost_coordinator()
            limiter.coordinated = False
        _service = _pending = None
        return
    if _pending is not None and not urgent:
        sent, _, future = _pending
        if not future.done():
            if now - sent < REPORT_TIMEOUT_S:
                return
            _pending = None
            _unreachable(coordinated, now, f"no answer within {REPORT_TIMEOUT_S:g}s")
            return
    remote = [lim for lim in coordinated if lim.coordinator is not None or retry_due(now)]
    for limiter in coordinated:
        if limiter not in remote:  # cut off: decide locally until the service is tried again
            limiter.tick(now)
    if not remote:
        return
    try:
        handle = _service_handle()
        ref = handle.report.remote([lim.coordinated_report() for lim in remote])
        future = ref.future()
    except Exception as exc:  # noqa: BLE001 - the service is gone (its owner exited): local until it is back
        _unreachable(remote, now, type(exc).__name__)
        return
    _pending = (now, ref, future)
    future.add_done_callback(lambda done: _answered(remote, handle, done, now))


def _answered(coordinated: list[EndpointLimiter], handle, future, sent: float) -> None:
    """The service's answer to a report (run by Ray's callback): set the shares, or go local."""
    try:
        answers = future.result()
    except Exception as exc:  # noqa: BLE001 - gone, or failed: local until it is back
        _unreachable(coordinated, sent, type(exc).__name__)
        return
    for limiter, answer in zip(coordinated, answers):
        limiter.coordinator, limiter.cap = handle, None
        limiter.set_share(answer["share"], answer["background"], answer["decided"], answer.get("paced", 0.0))


def _unreachable(coordinated: list[EndpointLimiter], now: float, why: str) -> None:
    global _service, _service_retry_at
    logger.warning("endpoint limits: coordinator unreachable (%s); deciding locally", why)
    _service, _service_retry_at = None, now + 1.0
    for limiter in coordinated:
        limiter.lost_coordinator()
