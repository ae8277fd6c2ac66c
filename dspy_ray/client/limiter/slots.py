"""A process's view of one endpoint: :class:`EndpointLimiter`, its slots and FIFO waiters.

The hot path makes no Ray call: slots are taken and given back here, under one lock; the share
they add up to comes from the process's own :class:`~.policy.AimdPolicy` (:meth:`EndpointLimiter.tick`)
or from the job's coordinator (:mod:`.coordinator`, through :meth:`EndpointLimiter.set_share`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from dspy_ray.client.limiter.policy import (
    INITIAL_IN_FLIGHT,
    LATENCY_BUCKETS,
    AimdPolicy,
    Signals,
    is_overload,
    latency_bucket,
    overload_threshold,
)

# What a process reports to the coordinator for one endpoint: key, member, signals, ceiling, adaptive,
# and the report's number (see EndpointLimiter.coordinated_report).
Report = tuple[str, str, dict[str, Any], int, bool, int]

PUMP_S = 0.1  # a caller waiting for a slot runs the limiter's pump (the report to the coordinator) this often
REFUSED_RISE_S = 1.0  # a 429 this soon after the share grew undoes the increase at once (_undo_increase)
# The coordinator keeps an idle process's share for IDLE_GRACE_S from when the idle report reached it (later
# than it was sent).  A process that calls again within RESERVED_S of sending it says nothing yet (most idle
# spells are gaps between two requests of a Serve replica), and says it is busy once RESERVED_S has passed
# with calls in flight: the coordinator hears before its grace ends.  Past IDLE_GRACE_S it may have given
# the share away: the process takes one slot until the coordinator answers.
IDLE_GRACE_S = 0.5
RESERVED_S = IDLE_GRACE_S / 2


def idle_floor(grace: float) -> float:
    """The slots an idle process keeps past its grace, as the coordinator counts them and the process assumes:
    one for a Serve replica's next request; none for a batch stage (no grace), whose next call asks first."""
    return 1.0 if grace else 0.0


def endpoint_key(base_url: str, model: str) -> str:
    """The limiter's key: one limit per base URL + model."""
    return f"{base_url.rstrip('/')}|{model}"


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
        elif asyncio._get_running_loop() is self.loop:  # a call ending on the waiter's own loop: no self-pipe write
            self.loop.call_soon(_resolve, self.future)
        else:
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _AsyncSlot:
    """One slot held by an async caller: :meth:`EndpointLimiter.slot`'s steps as a plain async context
    manager (``contextlib.asynccontextmanager`` costs an async generator per call, at every LM call)."""

    __slots__ = ("limiter", "start")

    def __init__(self, limiter: EndpointLimiter):
        self.limiter = limiter
        self.start = 0.0

    async def __aenter__(self) -> None:
        await self.limiter._aacquire()
        self.start = time.perf_counter()

    async def __aexit__(self, kind, exc, tb) -> bool:
        self.limiter._release(None if exc is not None else time.perf_counter() - self.start, exc)
        self.limiter._pump()
        return False


class EndpointLimiter:
    """Slots for one endpoint in this process: a local limit (this process's share), FIFO waiters.

    Thread-safe; sync callers block in :meth:`slot`, async callers await :meth:`aslot`.
    The share comes from the policy (in this process) or from the endpoint's coordinator
    actor; between reports the limiter gives slots back at once when 429s pile up (and takes
    them again one per call answered).
    """

    def __init__(self, key: str, ceiling: int, *, adaptive: bool = True, initial: int = INITIAL_IN_FLIGHT):
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
        # Run by the calling threads after each call and while they wait (set by the registry for a
        # coordinated limiter: the report to the job's coordinator, when one is due).
        self.pump: Callable[..., None] | None = None  # called with urgent=True when this limiter went idle
        self._resting: list[float] = []  # when each call now waiting to retry (holding no slot) will try again
        self.idle_reported: float | None = None  # when the latest report sent said idle; None: it said busy
        self._busy_check: asyncio.TimerHandle | None = None  # the event loop's check at RESERVED_S (_waking)
        # The endpoint's limit grew much (slow start, the way back after a cut): (since, from, over) while this
        # process takes up the rise of its share evenly over ``over`` seconds, not at once (see set_share).
        self._rise: tuple[float, float, float] | None = None
        # The share's latest increase: (when, the limit before it), for REFUSED_RISE_S.  On an endpoint with no
        # background of 429s, a 429 then says the increase is what it refused: the limit goes back at once.
        self._grown: tuple[float, float] | None = None
        # This process's weight when the coordinator splits a limit that cannot cover every process's demand:
        # shares go in proportion to it (a batch run's earlier stages weigh more: see
        # pipelines.runner.EARLIER_STAGE_WEIGHT).
        self.weight = 1.0
        # How long the coordinator keeps this process's share once it goes idle: IDLE_GRACE_S for the gaps between
        # a Serve replica's requests; 0 for a batch stage, whose idle spell ends only when its next rows come,
        # while the other stages wait for the slots it would keep.
        self.idle_grace = IDLE_GRACE_S

    # -- calls waiting to retry -------------------------------------------------------

    def rest(self, seconds: float) -> None:
        """A call holds no slot for ``seconds`` before it retries (a 429's Retry-After, a backoff).

        A caller that admits work by this limiter's share (a stage's rows) admits that many more
        meanwhile, so the calls that wait out a Retry-After do not shrink what the endpoint is sent.
        """
        with self._lock:
            heapq.heappush(self._resting, time.monotonic() + max(0.0, seconds))

    def resting(self) -> int:
        """Calls waiting to retry now."""
        if not self._resting:
            return 0
        now = time.monotonic()
        with self._lock:
            while self._resting and self._resting[0] <= now:
                heapq.heappop(self._resting)
            return len(self._resting)

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
            self._pump()
            raise
        self._release(time.perf_counter() - start, None)
        self._pump()

    def aslot(self) -> _AsyncSlot:
        """:meth:`slot` for asyncio code (``async with limiter.aslot():``): waits without blocking the loop."""
        return _AsyncSlot(self)

    def _pump(self) -> None:
        self._take_up()
        pump = self.pump
        if pump is not None:
            # Gone idle: report now, whenever the last report was, so the share goes back to the job
            # (an idle process runs no code that could report later; its share would wait for a timeout).
            # Once per idle spell: the coordinator keeps the share for the grace (idle_grace), and calls that
            # come back within RESERVED_S say nothing (see _waking).  One slot is a Serve replica's floor, kept
            # anyway; a batch stage (no grace) gives that back too.
            pump(urgent=self.idle_reported is None and self.share > idle_floor(self.idle_grace) and self.idle())

    def _waking(self, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """A call after an idle spell that the coordinator was told of: whether to tell it now that this process
        is busy again.  Past its grace (:attr:`idle_grace`) the share may be someone else's: one slot until the
        coordinator answers (none without a grace: the coordinator kept none for it).  Within RESERVED_S, not
        yet: an event loop checks again then, and tells it if calls are still in flight (a thread caller cannot
        be woken then: it tells it now)."""
        age = time.monotonic() - self.idle_reported
        if age >= self.idle_grace and self.coordinator is not None:
            with self._lock:  # a Serve replica's next request has a slot; a batch stage asks first (no grace)
                self.share = min(self.share, idle_floor(self.idle_grace))
                self.limit = min(self.limit, self.share)
        if age >= min(RESERVED_S, self.idle_grace) or loop is None:
            return True
        if self._busy_check is None:
            self._busy_check = loop.call_later(RESERVED_S - age, self._check_busy)
        return False

    def _check_busy(self) -> None:
        """The event loop's check at RESERVED_S after an idle report: calls in flight say so (only while a call
        runs, so this makes no Ray call after a worker's last task)."""
        self._busy_check = None
        if self.idle_reported is not None and not self.idle():
            self._woken()

    def _woken(self) -> None:
        """Tell the coordinator now that this process is busy again, without waiting for the answer."""
        self.idle_reported = None
        if self.pump is not None:
            self.pump(urgent=True)

    def idle(self) -> bool:
        """Nothing in flight, waiting for a slot or to retry, or queued for this endpoint in this process."""
        return (not self.in_flight and not self._waiters and not any(self.queued_elsewhere.values())
                and not self.resting())  # a call waiting out a Retry-After comes back

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

    def _take_or_queue(self, loop: asyncio.AbstractEventLoop | None = None) -> _Waiter | None:
        """A slot now (None), or a waiter in the queue for one (woken on ``loop``, or a thread's lock).  After an
        idle spell the coordinator hears once this call is counted in, in flight or waiting (see _waking)."""
        waking = self.idle_reported is not None and self.pump is not None and self._waking(loop)
        waiter = None
        with self._lock:
            if not self._try():
                waiter = _Waiter(loop)
                self._waiters.append(waiter)
                self._note_demand()
        if waking:
            self._woken()
        return waiter

    def _acquire(self) -> None:
        waiter = self._take_or_queue()
        if waiter is None:
            return
        # Released by the releaser, who counted us in already; meanwhile this thread reports (a share
        # of 0 grows only by a report, and nothing else in a worker may make one): at once when it has
        # none (a process's first call: the coordinator grants nothing before it hears of a demand).
        if self.share < 1:
            self._pump()
        while not waiter.lock.acquire(timeout=PUMP_S):
            self._pump()

    async def _aacquire(self) -> None:
        waiter = self._take_or_queue(asyncio.get_running_loop())
        if waiter is None:
            return
        if self.share < 1:
            self._pump()  # as in _acquire
        try:
            if self.pump is None:
                await waiter.future
            else:
                while True:
                    done, _ = await asyncio.wait((waiter.future,), timeout=PUMP_S)
                    if done:
                        break
                    self._pump()
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
                if s.latency_hist is None:
                    s.latency_hist = [0] * LATENCY_BUCKETS
                s.latency_hist[latency_bucket(latency or 0.0)] += 1
            elif is_overload(exc):
                s.overloads += 1
                if not self.background:  # refused while the limit rises: the rest of the rise waits for the policy
                    self._rise = None
                    self._undo_increase()
                # Many 429s already in this interval: give this slot back now, not at the next report.
                if s.overloads > overload_threshold(s.answered, self.background):
                    self.limit = max(min(1.0, self.share), min(self.limit, self.in_flight + 1) - 1)
                    self.backoff = (self.reports, self.limit)
                    self._rise = None
            else:
                s.errors += 1
            if self._rise is not None:
                self._rising(time.monotonic())
            self._grant()

    def _undo_increase(self) -> None:
        """A 429 soon after the share grew, from an endpoint that refuses nothing at random: back to the limit before
        the increase now, until the coordinator has decided with this 429 (called with the lock held).

        The endpoint was full at the old limit or between it and the new one (slow start's doubling, a probe's step).
        Kept where the rise had reached, every request sent above the capacity meanwhile was refused too, and every
        row that took the slot of a refused one (it waits out Retry-After holding none) was refused in turn: 20-45
        429s in a slow start's last doubling at C = 128, a third to a half of a 5,000-row run's."""
        grown, self._grown = self._grown, None
        if grown is None or time.monotonic() - grown[0] > REFUSED_RISE_S or self.limit <= grown[1]:
            return
        self.limit = max(min(1.0, self.share), grown[1])
        self.backoff = (self.reports, self.limit)

    def _rising(self, now: float) -> None:
        """Take up the share's rise as far as the time since it began allows (called with the lock held)."""
        since, start, over = self._rise
        done = min(1.0, (now - since) / over)
        self.limit = max(self.limit, min(self.share, start + (self.share - start) * done))
        if done >= 1.0 or self.limit >= self.share:
            self._rise = None

    def _take_up(self) -> None:
        """Between calls (a waiter's pump): more of a rise in progress, to the calls waiting for it."""
        if self._rise is not None:
            with self._lock:
                if self._rise is not None:
                    self._rising(time.monotonic())
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

    def set_share(self, share: float, background: float | None = None, decided: int | None = None,
                  paced: float = 0.0) -> None:
        """Use ``share`` from now on; ``decided``: how many of this process's intervals (:attr:`reports`)
        the policy had seen when it decided (None: all of them); ``paced``: the endpoint's limit has just
        grown, take up the rise evenly over this many seconds (its latency)."""
        with self._lock:
            before = self.share
            # 0 is possible with a coordinator: every slot of the job is held by other processes.
            self.share = max(0.0, min(float(self.ceiling), share))
            if self.share > before:
                self._grown = (time.monotonic(), self.limit)
            elif self.share < before:
                self._grown = None
            if self.backoff is not None and (decided is None or self.backoff[0] < decided):
                self.backoff = None
            if self.backoff is not None:  # a quick local cut on 429s holds until the policy saw them
                self._rise = None
                self.limit = min(self.share, self.backoff[1])
            elif (paced > 0 or self._rise is not None) and self.share > self.limit:
                # The total grew.  Requests sent at once into an endpoint that refuses what is over its capacity
                # are refused at once, all of them: twice the requests in flight after a doubling.  Spread over
                # a latency, the first refusals come back while most of the rise is still unsent, and the quick
                # cut in _release stops it there.  (Answers come in waves, so pacing by answers would not do.)
                now = time.monotonic()
                if self._rise is None:
                    self._rise = (now, max(self.limit, min(1.0, self.share)), paced)
                self._rising(now)
            else:  # at once, both ways: down, or a share that moves between processes (the total is the same)
                self._rise = None
                self.limit = self.share
            if background is not None:
                self.background = background
            self._grant()

    def tick(self, now: float | None = None) -> None:
        """One decision of the local policy (a limiter without a coordinator)."""
        now = time.monotonic() if now is None else now
        signals = self.take_interval()
        if self.policy is not None:
            before = self.policy.limit
            limit = self.policy.observe(signals, now)
            if self.cap is not None:  # cut off from the job's coordinator: never more than it last granted
                limit = self.policy.limit = min(limit, self.cap)
            self.set_share(limit, self.policy.background_rate(), paced=self.policy.rise_span(before))

    def coordinated_report(self) -> Report:
        """What the endpoint's coordinator needs from this process since the last report, numbered.

        ``idle`` in the signals: nothing in flight or wanted right now, whatever the interval's peaks were.
        """
        signals = asdict(self.take_interval())
        signals["idle"] = idle = self.idle()
        signals["weight"] = self.weight
        # In flight now, not the interval's peak: what this process still holds of the endpoint.  A share that
        # shrank is given to the others as its requests end, not a report interval after the last one did.
        signals["in_flight"] = self.in_flight
        if idle:
            signals["grace"] = self.idle_grace
        self.idle_reported = time.monotonic() if idle else None
        if self._busy_check is not None:  # this report says how things are now
            self._busy_check.cancel()
            self._busy_check = None
        return self.key, self.member, signals, self.ceiling, self.adaptive, self.reports

    def lost_coordinator(self) -> None:
        """Decide locally until a coordinator answers again: from the current share, and never above it
        (the other processes still hold theirs, so growing alone could pass the ceiling)."""
        # At least one slot: a share of 0 (every slot held by others) grows only by the service's
        # answer, and without one it would never grow (the rows waiting for a slot would wait forever).
        share = max(1.0, self.share)
        if self.policy is not None:
            self.policy.limit = share
        if self.cap is None:
            self.cap = share
        self.coordinator = None

    def state(self) -> dict[str, Any]:
        return {"key": self.key, "limit": self.limit, "share": self.share, "in_flight": self.in_flight,
                "waiting": len(self._waiters), "coordinated": self.coordinator is not None,
                **asdict(self.totals), "peak_in_flight": self.peak_in_flight}  # the gauge, not the window's field
