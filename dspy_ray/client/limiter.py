"""Adaptive concurrency per endpoint: how many requests to keep in flight, found at run time.

Nobody tells the framework how many requests an endpoint holds; too few leaves it idle, too
many gets 429s (a hosted API) or a queue (vLLM, llama.cpp).  The limit is found the way TCP
finds a path's capacity, with the signals an LM endpoint gives:

* it **grows** while calls succeed and latency stays flat: doubling each window at first
  (slow start), later quickly back to just under the last level that failed, then one
  probe above it now and then (1 s, 2 s, 4 s ... 32 s apart while probes keep failing; a
  probe counts as held once the requests in flight reached the level that failed);
* it is **cut** when the endpoint says it is full (more 429 / 503 answers than its
  background rate of them, in one window or added up over a second) or latency rises well
  above its floor (a queue is forming).
  The cut goes to what the endpoint actually served, by Little's law: calls answered per
  second x the latency floor.  A provider that throttles at random is told apart by
  cause and effect: when a cut leaves the share of 429s as it was, that share is
  background, and only 429s beyond it count from then on;
* it **never exceeds the ceiling**, ``max_in_flight`` (``LM_MAX_IN_FLIGHT``), counted over
  every process that calls the endpoint.

One limit per endpoint (base URL + model).  In one process every caller of that endpoint
(both stages of a task in one actor, the judge, the embedding client) shares one
:class:`EndpointLimiter`; with Ray, the processes of a job share one small named actor
(:class:`LimitService`, one :class:`LimitCoordinator` per endpoint) that merges their
signals every 100 ms, runs the limit and hands each process its share (by demand, in whole
slots that add up to the limit).  The hot path makes no Ray call: a process takes and
returns slots locally, reacts to a burst of 429s at once (and holds that cut until the
coordinator has decided with those 429s), and reports in the background.  Without Ray
(tests, a notebook) the same policy runs in the process.

Using it, from threads or from asyncio (the LM client and the embedding client do)::

    limiter = endpoint_limiter(settings)          # EndpointSettings: base_url, model, max_in_flight
    with limiter.slot():                          # blocks while the endpoint is full
        response = send(request)                  # an exception with .status 429/503 = "full"
    async with limiter.aslot():
        response = await asend(request)

Hold a slot for one HTTP attempt, never across a retry's sleep.  An exception leaving the
block is classified by :func:`is_overload`; a call that succeeded contributes its latency.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

OVERLOAD_STATUS = frozenset({429, 503})
SYNC_INTERVAL_S = 0.1  # how often a process reports to its coordinator (and a local policy decides)
MEMBER_TIMEOUT_S = 30.0  # a process silent this long gives its share back (it may be busy, not dead)


def is_overload(exc: BaseException | None) -> bool:
    """An answer that means "the endpoint is full": HTTP 429 or 503 (a quota or billing 429 is not)."""
    if exc is None or getattr(exc, "status", None) not in OVERLOAD_STATUS:
        return False
    return "billing" not in type(exc).__name__.lower()


def overload_threshold(answered: int, background: float) -> float:
    """More 429/503s than this among ``answered`` calls is a signal, not the endpoint's usual noise."""
    mean = answered * background
    return mean + 3.0 * math.sqrt(mean * (1.0 - background)) + 2.0


@dataclass
class Signals:
    """What the callers of one endpoint saw over an interval: the policy's only input."""

    ok: int = 0  # calls answered
    overloads: int = 0  # answered 429 / 503
    errors: int = 0  # other failures (timeouts, 500s, broken connections): no latency, no verdict
    latency_sum: float = 0.0  # seconds, over the ok calls
    peak_in_flight: int = 0
    demand: int = 0  # peak of (in flight + waiting for a slot)

    def merge(self, other: Signals) -> None:
        """Add a later interval: counters add up, gauges keep their peak."""
        self.ok += other.ok
        self.overloads += other.overloads
        self.errors += other.errors
        self.latency_sum += other.latency_sum
        self.peak_in_flight = max(self.peak_in_flight, other.peak_in_flight)
        self.demand = max(self.demand, other.demand)

    @property
    def answered(self) -> int:
        return self.ok + self.overloads


class AimdPolicy:
    """The limit for one endpoint, from :class:`Signals`; pure logic, no threads or clocks of its own.

    >>> policy = AimdPolicy(ceiling=256, initial=16)
    >>> policy.observe(Signals(ok=16, latency_sum=16 * 0.25, peak_in_flight=16, demand=40), now=0.0)
    16.0
    >>> policy.observe(Signals(ok=16, latency_sum=16 * 0.25, peak_in_flight=16, demand=40), now=0.3)
    32.0
    """

    HOLD_LATENCY = 1.3  # latency above floor x this: stop growing
    CUT_LATENCY = 1.7  # ... above floor x this: a queue is forming, cut
    MIN_WINDOW_S = 0.1
    MAX_PROBE_WAIT_S = 32.0
    LEAK_SPAN_S = 1.0  # 429s beyond the background, added up over this long, also say "full"
    LEAK_CUT = 0.9  # ... and cut at least this deep, so the cut's effect can be judged
    FLOOR_DRIFT = 1.005  # per window: the latency floor follows a lasting change of the endpoint

    def __init__(self, ceiling: int, initial: int = 16, min_limit: int = 1, adaptive: bool = True):
        self.ceiling = max(1, int(ceiling))
        self.min_limit = max(1, min(min_limit, self.ceiling))
        self.adaptive = adaptive
        self.limit = float(min(self.ceiling, initial) if adaptive else self.ceiling)
        self.latency_floor: float | None = None
        self.w_max: float | None = None  # lowest level that failed recently (None: still in slow start)
        self.fail_peak: int | None = None  # requests in flight when the endpoint last complained
        self.probe_wait = 1.0
        self.probe_at = 0.0
        self.probe_step = 1.0
        self.cooldown_until = 0.0
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=16)  # (429s, answered), not cut
        self.leak: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, 429s, answered) since a cut
        self.background = 0.0  # share of 429s learned not to be caused by the level (see _check_cut)
        self.last_cut: dict[str, Any] | None = None  # a 429 cut waiting for its effect to be judged
        self.recent_ok: collections.deque[tuple[float, float, int, float]] = collections.deque()  # start, end, ok, level
        self.held: collections.deque[tuple[float, int]] = collections.deque()  # (time, in flight) of clean windows
        self.window = Signals()
        self.window_start: float | None = None
        self.cuts = 0
        self.reverted = 0
        self.rounding = 0  # slack for shares moving between processes (one per process, set by the coordinator)

    # -- what the callers learn back --------------------------------------------

    def background_rate(self) -> float:
        """The share of 429/503 answers that cutting does not remove (no more than recent windows saw)."""
        if not self.background:
            return 0.0
        overloads = sum(o for o, _ in self.recent)
        answered = sum(n for _, n in self.recent)
        return min(self.background, overloads / answered) if answered >= 50 else self.background

    def overload_threshold(self, answered: int) -> float:
        return overload_threshold(answered, self.background_rate())

    # -- deciding ---------------------------------------------------------------

    def observe(self, signals: Signals, now: float) -> float:
        """Add one interval's signals; decide when a window is complete (or overloads are already clear)."""
        if not self.adaptive:
            return self.limit
        if self.window_start is None:
            self.window_start = now
        self.window.merge(signals)
        length = max(self.MIN_WINDOW_S, self.latency_floor or 0.0)
        early = self.window.overloads > self.overload_threshold(self.window.answered)
        if now - self.window_start >= length or early:
            self._decide(now)
            self.window, self.window_start = Signals(), now
        return self.limit

    def _ok_per_s(self, now: float) -> tuple[float, float] | None:
        """Calls answered per second over about the last second, and the mean level they were sent at."""
        while len(self.recent_ok) > 1 and self.recent_ok[0][1] < now - 1.0:
            self.recent_ok.popleft()
        if not self.recent_ok:
            return None
        span = max(self.recent_ok[-1][1] - self.recent_ok[0][0], self.MIN_WINDOW_S)
        level = sum((end - start) * lvl for start, end, _, lvl in self.recent_ok) / span
        return sum(n for _, _, n, _ in self.recent_ok) / span, max(1.0, level)

    def _decide(self, now: float) -> None:
        w, start = self.window, self.window_start if self.window_start is not None else now
        latency = w.latency_sum / w.ok if w.ok else None
        if latency is not None:
            floor = self.latency_floor
            self.latency_floor = latency if floor is None else min(floor * self.FLOOR_DRIFT, latency)
        if w.answered:
            self.recent_ok.append((start, now, w.ok, min(self.limit, w.peak_in_flight or self.limit)))
        if now < self.cooldown_until:  # answers to requests sent before the last cut
            return
        if self.last_cut is not None:  # a cut on trial: gather its effect, judge it, then carry on
            cut = self.last_cut
            cut["after"].merge(w)
            cut["seconds"] += now - start
            if cut["after"].answered < 20 and cut["seconds"] < 1.0:
                return
            if self._check_cut():
                return
        ratio = latency / self.latency_floor if latency is not None and self.latency_floor and w.ok >= 5 else 1.0
        overloaded = w.overloads > self.overload_threshold(w.answered)
        if overloaded or ratio > self.CUT_LATENCY:
            self._cut(now, w.peak_in_flight, by_overloads=overloaded, rate=w.overloads / max(1, w.answered))
            return
        if w.answered >= 10:
            self.recent.append((w.overloads, w.answered))
        leak = self._leak(now, w)
        if leak is not None:
            self._cut(now, w.peak_in_flight, by_overloads=True, rate=leak, keep=self.LEAK_CUT)
            return
        if w.overloads > w.answered * self.background_rate():
            return  # at the edge: hold (a few such windows in a row are a leak, cut above)
        if ratio > self.HOLD_LATENCY:
            return
        self.held.append((now, w.peak_in_flight))  # the endpoint held this many without a 429 beyond the usual
        limit = self.limit
        if w.peak_in_flight < limit - max(1.0, 0.1 * limit) - self.rounding:
            return  # the callers do not use what they have: growing would prove nothing
        if self.w_max is None:
            self.limit = min(self.ceiling, limit * 2)  # slow start
        elif limit < self.w_max - 1:
            self.limit = min(self.w_max - 1, limit + max(1.0, (self.w_max - limit) / 2))  # back to the plateau
        elif now >= self.probe_at:
            # A probe held: in flight reached the level that failed last (with several processes in
            # whole-number shares the limit can be above what is really sent), and no complaint.
            if limit >= self.w_max and w.peak_in_flight >= (self.fail_peak or int(self.w_max)):
                self.fail_peak = None
                self.w_max = max(limit, w.peak_in_flight) + self.probe_step
                self.probe_step = min(self.probe_step * 2, max(1.0, limit / 8))
                self.probe_wait = 1.0
            self.limit = min(self.ceiling, max(limit + 1, self.w_max))
            self.probe_at = now  # judged by the next window
        self.limit = max(float(self.min_limit), self.limit)

    def _leak(self, now: float, w: Signals) -> float | None:
        """A few 429s in every window, none enough alone: added up over ``LEAK_SPAN_S`` they say "full" too.

        Their share over that span when they do; None when not.
        """
        self.leak.append((now, w.overloads, w.answered))
        while self.leak and self.leak[0][0] < now - self.LEAK_SPAN_S:
            self.leak.popleft()
        overloads = sum(o for _, o, _ in self.leak)
        answered = sum(n for _, _, n in self.leak)
        return overloads / max(1, answered) if overloads > self.overload_threshold(answered) else None

    def _cut(self, now: float, peak: int, *, by_overloads: bool, rate: float, keep: float = 1.0) -> None:
        before, w_max_before, recent = self.limit, self.w_max, self._ok_per_s(now)
        self.fail_peak = peak or None
        ok_rate, level = recent if recent is not None else (None, before)
        served = ok_rate * self.latency_floor if ok_rate is not None and self.latency_floor else None
        while self.held and self.held[0][0] < now - 3.0:
            self.held.popleft()
        # What the endpoint served (Little's law) or, after a small excess (a probe), the most it held
        # lately without complaint below the level that failed; after a large one only what it served.
        held = max((n for _, n in self.held if n < before), default=0) if rate < 0.1 else 0
        target = max(served or 0.0, held) or before * 0.5
        self.limit = max(float(self.min_limit), min(before - 1, keep * before, max(target, before * 0.5)))
        self.leak.clear()
        probing = self.w_max is not None and before >= self.w_max
        self.probe_wait = min(self.MAX_PROBE_WAIT_S, self.probe_wait * 2) if probing else 1.0
        # The level that failed, or (after an overshoot) just above what was actually held.
        self.w_max = max(self.limit + 1, min(before, target + 1))
        self.probe_at = now + self.probe_wait
        self.probe_step = 1.0
        self.cooldown_until = now + 2 * max(self.MIN_WINDOW_S, self.latency_floor or 0.0)
        self.cuts += 1
        self.last_cut = ({"before": before, "w_max": w_max_before, "per_slot": ok_rate / level, "level": level,
                          "rate": rate, "after": Signals(), "seconds": 0.0} if by_overloads and ok_rate else None)

    def _check_cut(self) -> bool:
        """Judge the last 429 cut by its effect; True when it is undone.

        An endpoint at capacity serves as much after the cut as before (the 429s were the
        excess), so each slot answers more calls and the share of 429s falls.  An endpoint
        that throttles at random serves less, in proportion, and refuses the same share:
        only when both say so is that share background, the cut undone and the capacity
        looked for again.
        """
        cut, self.last_cut = self.last_cut, None
        w = cut["after"]
        level = max(1.0, min(self.limit, w.peak_in_flight or self.limit))
        gain = cut["level"] / level  # > 1: fewer requests held after the cut
        per_slot = w.ok / max(cut["seconds"], self.MIN_WINDOW_S) / level
        rate = w.overloads / max(1, w.answered)
        if gain < 1.05 or per_slot >= cut["per_slot"] * (1 + gain) / 2 or rate < 0.6 * cut["rate"]:
            return False  # the cut helped: more answered per slot, or fewer 429s
        self.background = max(self.background, min(cut["rate"], w.overloads / max(1, w.answered) + 0.05))
        self.limit = max(self.limit, cut["before"])
        self.w_max = self.fail_peak = None  # the failures were noise: find the capacity again
        self.reverted += 1
        return True


# -- a process's view of one endpoint ---------------------------------------------------


class _Waiter:
    __slots__ = ("lock", "loop", "future", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.granted = False
        self.loop = loop
        self.future = loop.create_future() if loop is not None else None
        self.lock = None if loop is not None else threading.Lock()
        if self.lock is not None:
            self.lock.acquire()

    def wake(self) -> None:
        self.granted = True
        if self.lock is not None:
            self.lock.release()
        else:
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class EndpointLimiter:
    """Slots for one endpoint in this process: a local limit (this process's share), FIFO waiters.

    Thread-safe; sync callers block in :meth:`slot`, async callers await :meth:`aslot`.
    The share comes from the policy (in this process) or from the endpoint's coordinator
    actor; between reports the limiter gives slots back at once when 429s pile up (and takes
    them again one per call answered).
    """

    def __init__(self, key: str, ceiling: int, *, adaptive: bool = True, initial: int = 16):
        self.key = key
        self.ceiling = max(1, int(ceiling))
        self.adaptive = adaptive
        self.member = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self.in_flight = 0
        self.share = float(min(self.ceiling, initial) if adaptive else self.ceiling)  # what we may use
        self.limit = self.share  # what we use now (paced towards the share)
        self.background = 0.0  # the coordinator's background 429 share, for the quick local reaction
        self._interval = Signals()
        self.policy: AimdPolicy | None = AimdPolicy(self.ceiling, initial, adaptive=adaptive)
        self.coordinator = None
        self.totals = Signals()  # since start, for tests and reports
        self.peak_in_flight = 0
        # Work queued for this endpoint outside the limiter (a stage's rows waiting to start), by
        # caller: counted as demand, so callers need not park threads in slot() to ask for more.
        self.queued_elsewhere: dict[int, int] = {}
        self.coordinated = False  # meant to share a coordinator (Ray): report to it, re-attach if it goes away
        self.cap: float | None = None  # the last share granted, while the coordinator does not answer
        self.reports = 0  # intervals handed to the policy so far
        # A quick local cut on a burst of 429s: (the interval it happened in, the limit it left). It holds,
        # and the limit is not paced up, until a share decided with that interval's signals comes back.
        self.backoff: tuple[int, float] | None = None

    # -- taking and giving back slots -----------------------------------------------

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for one request (blocks while the endpoint is full)."""
        self._acquire()
        start = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self._release(None, exc)
            raise
        self._release(time.perf_counter() - start, None)

    @contextlib.asynccontextmanager
    async def aslot(self):
        """:meth:`slot` for asyncio code: waits without blocking the loop."""
        await self._aacquire()
        start = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self._release(None, exc)
            raise
        self._release(time.perf_counter() - start, None)

    def _try(self) -> bool:
        if self.in_flight < int(self.limit) and not self._waiters:
            self.in_flight += 1
            if self.in_flight > self.peak_in_flight:
                self.peak_in_flight = self.in_flight
            self._note_demand()
            return True
        return False

    def _note_demand(self) -> None:
        s = self._interval
        s.peak_in_flight = max(s.peak_in_flight, self.in_flight)
        s.demand = max(s.demand, self.in_flight + len(self._waiters))

    def note_queued(self, caller: int, count: int) -> None:
        """``caller`` (any id) has ``count`` requests waiting to be sent: they count as demand."""
        with self._lock:
            self.queued_elsewhere[caller] = count
            s = self._interval
            s.demand = max(s.demand, self.in_flight + len(self._waiters) + sum(self.queued_elsewhere.values()))

    def _acquire(self) -> None:
        with self._lock:
            if self._try():
                return
            waiter = _Waiter()
            self._waiters.append(waiter)
            self._note_demand()
        waiter.lock.acquire()  # released by the releaser, who counted us in already

    async def _aacquire(self) -> None:
        with self._lock:
            if self._try():
                return
            waiter = _Waiter(asyncio.get_running_loop())
            self._waiters.append(waiter)
            self._note_demand()
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                if waiter.granted:  # granted while being cancelled: give the slot back
                    self.in_flight -= 1
                    self._grant()
                else:
                    self._waiters.remove(waiter)
            raise

    def _grant(self) -> None:
        """Hand free slots to waiters, oldest first (called with the lock held)."""
        while self._waiters and self.in_flight < int(self.limit):
            waiter = self._waiters.popleft()
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self._note_demand()
            waiter.wake()

    def _release(self, latency: float | None, exc: BaseException | None) -> None:
        with self._lock:
            self.in_flight -= 1
            s = self._interval
            if exc is None:
                s.ok += 1
                s.latency_sum += latency or 0.0
                if self.limit < self.share and self.backoff is None:  # pace growth: one more slot per answer
                    self.limit = min(self.share, self.limit + 1)
            elif is_overload(exc):
                s.overloads += 1
                # Many 429s already in this interval: give this slot back now, not at the next report.
                if s.overloads > overload_threshold(s.answered, self.background):
                    self.limit = max(min(1.0, self.share), min(self.limit, self.in_flight + 1) - 1)
                    self.backoff = (self.reports, self.limit)
            else:
                s.errors += 1
            self._grant()

    # -- the share ------------------------------------------------------------------

    def take_interval(self) -> Signals:
        with self._lock:
            signals, self._interval = self._interval, Signals()
            self.reports += 1
            self._note_demand()  # the next interval starts with the current gauges
            self.totals.merge(Signals(ok=signals.ok, overloads=signals.overloads, errors=signals.errors,
                                      latency_sum=signals.latency_sum))
            return signals

    def set_share(self, share: float, background: float | None = None, decided: int | None = None) -> None:
        """Use ``share`` from now on; ``decided``: how many of this process's intervals (:attr:`reports`)
        the policy had seen when it decided (None: all of them)."""
        with self._lock:
            # 0 is possible with a coordinator: every slot of the job is held by other processes.
            self.share = max(0.0, min(float(self.ceiling), share))
            # At once, both ways: the policy already paced the total (and a share that moves between
            # processes does not change it).  A quick local cut on 429s holds until the policy saw them.
            if self.backoff is not None and (decided is None or self.backoff[0] < decided):
                self.backoff = None
            self.limit = self.share if self.backoff is None else min(self.share, self.backoff[1])
            if background is not None:
                self.background = background
            self._grant()

    def tick(self, now: float | None = None) -> None:
        """One decision of the local policy (a limiter without a coordinator)."""
        now = time.monotonic() if now is None else now
        signals = self.take_interval()
        if self.policy is not None:
            limit = self.policy.observe(signals, now)
            if self.cap is not None:  # cut off from the job's coordinator: never more than it last granted
                limit = self.policy.limit = min(limit, self.cap)
            self.set_share(limit, self.policy.background_rate())

    def coordinated_report(self) -> tuple[str, str, dict[str, Any], int, bool, int]:
        """What the endpoint's coordinator needs from this process since the last report, numbered."""
        signals = asdict(self.take_interval())
        return self.key, self.member, signals, self.ceiling, self.adaptive, self.reports

    def lost_coordinator(self) -> None:
        """Decide locally until a coordinator answers again: from the current share, and never above it
        (the other processes still hold theirs, so growing alone could pass the ceiling)."""
        if self.policy is not None:
            self.policy.limit = self.share
        if self.cap is None:
            self.cap = self.share
        self.coordinator = None

    def state(self) -> dict[str, Any]:
        return {"key": self.key, "limit": self.limit, "share": self.share, "in_flight": self.in_flight,
                "waiting": len(self._waiters), "peak_in_flight": self.peak_in_flight,
                "coordinated": self.coordinator is not None, **asdict(self.totals)}


# -- the coordinator: one per endpoint per Ray job -----------------------------------


@dataclass
class _Member:
    granted: float
    demand: int = 0  # in the last report
    held: int = 0  # requests in flight at the last report (a process keeps them while its share shrinks)
    heard: float = field(default_factory=time.monotonic)  # when its latest report came
    window_peak: int = 0  # peaks over the policy's current round
    window_demand: int = 0
    last_report: int = 0  # the number of its latest report
    decided: int = 0  # the number of its latest report the policy has decided with


class LimitCoordinator:
    """Runs one endpoint's limit for every process of a Ray job and splits it into shares.

    Each process reports its :class:`Signals` every ``SYNC_INTERVAL_S``; the merged
    signals drive one :class:`AimdPolicy`.  A process's share follows its demand; a share
    grows only out of what the other processes neither are granted nor still hold in flight,
    so the ceiling holds for the job at every moment.
    """

    def __init__(self, key: str, ceiling: int, adaptive: bool = True, initial: int = 16):
        self.key = key
        self.policy = AimdPolicy(ceiling, initial, adaptive=adaptive)
        self.members: dict[str, _Member] = {}
        self.pending = Signals()
        self.pending_reports = 0
        self.started = time.monotonic()
        # (seconds, limit, demand, peak in flight, answered ok, 429s) per policy step, for plots and tests.
        self.history: collections.deque[tuple[float, float, int, int, int, int]] = collections.deque(maxlen=20_000)

    def join(self, member: str) -> dict[str, float]:
        now = time.monotonic()
        self._prune(now)
        spare = self.policy.limit - sum(max(m.granted, m.held) for m in self.members.values())
        share = max(0.0, min(spare, self.policy.limit / (len(self.members) + 1)))  # 0: wait for the next report
        self.members[member] = _Member(granted=share, heard=now)
        return {"share": share, "background": self.policy.background_rate()}

    def report(self, member: str, signals: dict[str, Any], number: int = 0) -> dict[str, float]:
        """Add one process's signals (its report ``number``); its share, and the latest of its reports the
        policy has decided with (``decided``: a quick local cut on 429s holds until then)."""
        now = time.monotonic()
        state = self.members.get(member)
        if state is None:
            self.join(member)
            state = self.members[member]
        state.heard = now
        state.last_report = number
        incoming = Signals(**signals)
        state.demand = incoming.demand
        state.held = incoming.peak_in_flight
        state.window_peak = max(state.window_peak, incoming.peak_in_flight)
        state.window_demand = max(state.window_demand, incoming.demand)
        self.pending.merge(Signals(ok=incoming.ok, overloads=incoming.overloads, errors=incoming.errors,
                                   latency_sum=incoming.latency_sum))
        self.pending_reports += 1
        # One policy step per round of reports (every member about once), not per report.
        if self.pending_reports >= len(self.members):
            self._prune(now)
            self.pending.peak_in_flight = sum(m.window_peak for m in self.members.values())
            self.pending.demand = sum(m.window_demand for m in self.members.values())
            for m in self.members.values():
                m.window_peak = m.window_demand = 0
                m.decided = m.last_report
            self.policy.rounding = len(self.members)
            self.policy.observe(self.pending, now)
            self.history.append((round(now - self.started, 3), round(self.policy.limit, 1), self.pending.demand,
                                 self.pending.peak_in_flight, self.pending.ok, self.pending.overloads))
            self.pending, self.pending_reports = Signals(), 0
        return {"share": self._share(member), "background": self.policy.background_rate(), "decided": state.decided}

    def _prune(self, now: float) -> None:
        for name in [n for n, m in self.members.items() if now - m.heard > MEMBER_TIMEOUT_S]:
            del self.members[name]

    def _share(self, member: str) -> float:
        limit = self.policy.limit
        demands = {name: max(1, m.demand) for name, m in self.members.items()}
        total = sum(demands.values())
        if total <= limit:
            wanted = {name: d + (limit - total) / len(demands) for name, d in demands.items()}
        else:
            wanted = {name: limit * d / total for name, d in demands.items()}
        # A process sends whole requests: whole shares that add up to the limit's whole part (the
        # floors, then one more slot each to the largest remainders), so no slot is lost to rounding.
        whole = {name: math.floor(v) for name, v in wanted.items()}
        largest = sorted(wanted, key=lambda name: (whole[name] - wanted[name], name))
        for name in largest[:max(0, int(limit) - sum(whole.values()))]:
            whole[name] += 1
        target = max(1.0, float(whole[member]))
        state = self.members[member]
        if target > state.granted:  # growth only from what the others do not hold (so never past the ceiling)
            # A process whose share just shrank still has its requests in flight until they end.
            others = sum(max(m.granted, m.held) for name, m in self.members.items() if name != member)
            target = max(state.granted, min(target, limit - others))
        state.granted = target
        return target

    def state(self, history: bool = False) -> dict[str, Any]:
        p = self.policy
        return {"history": list(self.history) if history else None, "key": self.key, "limit": p.limit, "ceiling": p.ceiling, "latency_floor": p.latency_floor,
                "w_max": p.w_max, "cuts": p.cuts, "reverted": p.reverted, "background": p.background_rate(),
                "members": {n: {"granted": m.granted, "demand": m.demand} for n, m in self.members.items()}}


class LimitService:
    """The Ray actor of a job's endpoint limits: one :class:`LimitCoordinator` per endpoint.

    One process for all endpoints (LM, judge, embedder) of the job; each process of the job
    sends one :meth:`report` every ``SYNC_INTERVAL_S`` for all the endpoints it calls.
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

    def report(self, reports: list[tuple[str, str, dict[str, Any], int, bool, int]]) -> list[dict[str, float]]:
        return [self._endpoint(key, ceiling, adaptive).report(member, signals, number)
                for key, member, signals, ceiling, adaptive, number in reports]

    def state(self, key: str, history: bool = False) -> dict[str, Any] | None:
        coordinator = self.endpoints.get(key)
        return coordinator.state(history) if coordinator is not None else None


# -- one limiter per endpoint per process ---------------------------------------------

_registry: dict[str, EndpointLimiter] = {}
_registry_lock = threading.Lock()
_ticker: threading.Thread | None = None


def endpoint_key(base_url: str, model: str) -> str:
    return f"{base_url.rstrip('/')}|{model}"


SERVICE_NAME = "dspy-endpoint-limits"


def endpoint_limiter(settings: Any, *, coordinate: bool | None = None) -> EndpointLimiter:
    """This process's limiter for ``settings``' endpoint (``base_url`` + ``model``), made on first use.

    ``settings`` is an :class:`dspy_ray.endpoints.settings.EndpointSettings` (or anything with ``base_url``,
    ``model``, ``max_in_flight`` and ``adaptive``).  ``coordinate``: share the limit through a
    Ray actor (default: when Ray is initialized in this process).
    """
    key = endpoint_key(settings.base_url, settings.model)
    ceiling = int(settings.max_in_flight)
    adaptive = bool(getattr(settings, "adaptive", True))
    with _registry_lock:
        limiter = _registry.get(key)
        if limiter is None:
            limiter = EndpointLimiter(key, ceiling, adaptive=adaptive)
            if coordinate is None:
                coordinate = _ray_initialized()
            if coordinate:
                limiter.coordinated = True
                _attach(limiter)
            _registry[key] = limiter
            _start_ticker()
        elif ceiling < limiter.ceiling:  # two callers disagree: the lower ceiling holds
            limiter.ceiling = ceiling
            limiter.set_share(min(limiter.share, ceiling))
            if limiter.policy is not None:
                limiter.policy.ceiling = ceiling
                limiter.policy.limit = min(limiter.policy.limit, ceiling)
    return limiter


def limiters() -> list[EndpointLimiter]:
    with _registry_lock:
        return list(_registry.values())


_service = None  # this process's handle on the job's LimitService (held: Ray collects an unreferenced actor)
_service_retry_at = 0.0


def ensure_coordinator(settings: Any | None = None):
    """Create the job's limit service from this process (the driver), so it lives as long as the job."""
    return _service_handle()


def coordinator_state(base_url: str, model: str, history: bool = False) -> dict[str, Any] | None:
    """The job-wide state of an endpoint's limit (for reports and plots); None without a service."""
    handle = _service_handle()
    return _ray_get(handle.state.remote(endpoint_key(base_url, model), history), timeout=30.0)


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


def _ray_get(ref, timeout: float):
    import ray

    return ray.get(ref, timeout=timeout)


def _service_handle():
    global _service
    if _service is None:
        import ray

        actor = ray.remote(num_cpus=0, max_restarts=0)(LimitService)
        _service = actor.options(name=SERVICE_NAME, get_if_exists=True).remote()
    return _service


def _attach(limiter: EndpointLimiter) -> None:
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


def _tick_all(now: float) -> None:
    """One round: local limiters decide; coordinated ones report together in one call to the service."""
    global _service, _service_retry_at
    coordinated = []
    for limiter in limiters():
        if limiter.coordinated and (limiter.coordinator is not None or now >= _service_retry_at):
            coordinated.append(limiter)
        else:
            limiter.tick(now)
    if not coordinated:
        return
    if not _ray_initialized():  # Ray was shut down in this process: never start it again from here
        for limiter in coordinated:
            limiter.lost_coordinator()
            limiter.coordinated = False
        _service = None
        return
    try:
        handle = _service_handle()
        answers = _ray_get(handle.report.remote([lim.coordinated_report() for lim in coordinated]), timeout=5.0)
    except Exception as exc:  # noqa: BLE001 - the service is gone (its owner exited): local until it is back
        logger.warning("endpoint limits: coordinator unreachable (%s); deciding locally", type(exc).__name__)
        _service, _service_retry_at = None, now + 1.0
        for limiter in coordinated:
            limiter.lost_coordinator()
        return
    for limiter, answer in zip(coordinated, answers):
        limiter.coordinator, limiter.cap = handle, None
        limiter.set_share(answer["share"], answer["background"], answer["decided"])


def _start_ticker() -> None:
    global _ticker
    if _ticker is not None and _ticker.is_alive():
        return
    _ticker = threading.Thread(target=_tick_forever, name="endpoint-limiter", daemon=True)
    _ticker.start()


def _tick_forever() -> None:
    pid = os.getpid()
    while True:
        time.sleep(SYNC_INTERVAL_S)
        if os.getpid() != pid:  # a forked child does not report for its parent
            return
        try:
            _tick_all(time.monotonic())
        except SystemExit:  # Ray raises it in threads while the process shuts down
            return
        except Exception:  # noqa: BLE001 - never let the reporter die
            logger.exception("endpoint limits: tick failed")
