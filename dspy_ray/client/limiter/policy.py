"""The AIMD policy: one endpoint's limit from the :class:`Signals` its callers saw; pure logic.

No threads, no clocks of its own, no Ray: a test feeds it windows with times and reads the limit
back (see :class:`AimdPolicy`).  The process's limiter (:mod:`.slots`) and the job's coordinator
(:mod:`.coordinator`) both run this policy.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field, replace

OVERLOAD_STATUS = frozenset({429, 503})


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


@dataclass(frozen=True)
class CutOnTrial:
    """A cut made on 429s, waiting for its effect to be judged (:meth:`AimdPolicy._judge_cut`)."""

    before: float  # the limit before the cut
    per_slot: float  # calls answered per second per slot, over about the second before the cut
    level: float  # mean requests in flight over that second
    rate: float  # the share of 429s that made the cut
    after: Signals = field(default_factory=Signals)  # what the endpoint did since the cut ...
    seconds: float = 0.0  # ... over this long

    def plus(self, window: Signals, seconds: float) -> CutOnTrial:
        """This trial with one more window of its effect."""
        after = replace(self.after)
        after.merge(window)
        return replace(self, after=after, seconds=self.seconds + seconds)


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
        self.background = 0.0  # share of 429s learned not to be caused by the level (see _judge_cut)
        self.last_cut: CutOnTrial | None = None  # a 429 cut waiting for its effect to be judged
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

    def _decide(self, now: float) -> None:
        """One complete window: learn from it, then judge the last cut, cut, hold or grow (first that applies)."""
        w, start = self.window, self.window_start if self.window_start is not None else now
        latency = self._learn(w, start, now)
        if now < self.cooldown_until:  # answers to requests sent before the last cut
            return
        if self.last_cut is not None and self._on_trial(w, now - start):
            return
        ratio = latency / self.latency_floor if latency is not None and self.latency_floor and w.ok >= 5 else 1.0
        if self._cut_if_full(w, ratio, now) or self._hold(w, ratio):
            return
        self._grow(w, now)

    def _learn(self, w: Signals, start: float, now: float) -> float | None:
        """Track the latency floor and what was served (for cuts), whatever is decided; the window's latency."""
        latency = w.latency_sum / w.ok if w.ok else None
        if latency is not None:
            floor = self.latency_floor
            self.latency_floor = latency if floor is None else min(floor * self.FLOOR_DRIFT, latency)
        if w.answered:
            self.recent_ok.append((start, now, w.ok, min(self.limit, w.peak_in_flight or self.limit)))
        return latency

    def _on_trial(self, w: Signals, seconds: float) -> bool:
        """A 429 cut's effect decides first: True while too little of it is seen yet, or when it is undone."""
        self.last_cut = self.last_cut.plus(w, seconds)
        if self.last_cut.after.answered < 20 and self.last_cut.seconds < 1.0:
            return True
        return self._judge_cut()

    def _cut_if_full(self, w: Signals, ratio: float, now: float) -> bool:
        """Cut when the endpoint says it is full (429s in this window or added up, or a queue); True if cut."""
        overloaded = w.overloads > self.overload_threshold(w.answered)
        if overloaded or ratio > self.CUT_LATENCY:
            self._cut(now, w.peak_in_flight, by_overloads=overloaded, rate=w.overloads / max(1, w.answered))
            return True
        if w.answered >= 10:
            self.recent.append((w.overloads, w.answered))
        leak = self._leak(now, w)
        if leak is not None:
            self._cut(now, w.peak_in_flight, by_overloads=True, rate=leak, keep=self.LEAK_CUT)
            return True
        return False

    def _hold(self, w: Signals, ratio: float) -> bool:
        """At the edge (429s beyond the background, or latency rising): neither grow nor cut."""
        # A few such windows in a row are a leak, cut in _cut_if_full.
        return w.overloads > w.answered * self.background_rate() or ratio > self.HOLD_LATENCY

    def _grow(self, w: Signals, now: float) -> None:
        """A clean window: grow, if the callers used what they had (else growing would prove nothing)."""
        self.held.append((now, w.peak_in_flight))  # the endpoint held this many without a 429 beyond the usual
        limit = self.limit
        if w.peak_in_flight < limit - max(1.0, 0.1 * limit) - self.rounding:
            return  # the callers do not use what they have: growing would prove nothing
        if self.w_max is None:
            self.limit = min(self.ceiling, limit * 2)  # slow start
        elif limit < self.w_max - 1:
            self.limit = min(self.w_max - 1, limit + max(1.0, (self.w_max - limit) / 2))  # back to the plateau
        elif now >= self.probe_at:
            self._probe(w, now)
        self.limit = max(float(self.min_limit), self.limit)

    def _probe(self, w: Signals, now: float) -> None:
        """At the plateau and due: one step above the level that failed last (judged by the next window)."""
        limit = self.limit
        # A probe held: in flight reached the level that failed last (with several processes in
        # whole-number shares the limit can be above what is really sent), and no complaint.
        if limit >= self.w_max and w.peak_in_flight >= (self.fail_peak or int(self.w_max)):
            self.fail_peak = None
            self.w_max = max(limit, w.peak_in_flight) + self.probe_step
            self.probe_step = min(self.probe_step * 2, max(1.0, limit / 8))
            self.probe_wait = 1.0
        self.limit = min(self.ceiling, max(limit + 1, self.w_max))
        self.probe_at = now  # judged by the next window

    def _ok_per_s(self, now: float) -> tuple[float, float] | None:
        """Calls answered per second over about the last second, and the mean level they were sent at."""
        while len(self.recent_ok) > 1 and self.recent_ok[0][1] < now - 1.0:
            self.recent_ok.popleft()
        if not self.recent_ok:
            return None
        span = max(self.recent_ok[-1][1] - self.recent_ok[0][0], self.MIN_WINDOW_S)
        level = sum((end - start) * lvl for start, end, _, lvl in self.recent_ok) / span
        return sum(n for _, _, n, _ in self.recent_ok) / span, max(1.0, level)

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
        before, recent = self.limit, self._ok_per_s(now)
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
        self.last_cut = (CutOnTrial(before=before, per_slot=ok_rate / level, level=level, rate=rate)
                         if by_overloads and ok_rate else None)

    def _judge_cut(self) -> bool:
        """Judge the last 429 cut by its effect; True when it is undone.

        An endpoint at capacity serves as much after the cut as before (the 429s were the
        excess), so each slot answers more calls and the share of 429s falls.  An endpoint
        that throttles at random serves less, in proportion, and refuses the same share:
        only when both say so is that share background, the cut undone and the capacity
        looked for again.
        """
        cut, self.last_cut = self.last_cut, None
        w = cut.after
        level = max(1.0, min(self.limit, w.peak_in_flight or self.limit))
        gain = cut.level / level  # > 1: fewer requests held after the cut
        per_slot = w.ok / max(cut.seconds, self.MIN_WINDOW_S) / level
        rate = w.overloads / max(1, w.answered)
        if gain < 1.05 or per_slot >= cut.per_slot * (1 + gain) / 2 or rate < 0.6 * cut.rate:
            return False  # the cut helped: more answered per slot, or fewer 429s
        self.background = max(self.background, min(cut.rate, w.overloads / max(1, w.answered) + 0.05))
        self.limit = max(self.limit, cut.before)
        self.w_max = self.fail_peak = None  # the failures were noise: find the capacity again
        self.reverted += 1
        return True
