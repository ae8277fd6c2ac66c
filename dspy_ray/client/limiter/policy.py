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
# Requests in flight before anything is known of an endpoint: slow start doubles from here.  32, not 16 (TCP's
# initial window grew for the same reason): each doubling waits for a latency of answers, and from 16 the first
# 1.5 s of an 8-s run against a capacity of 512 used less than a fifth of it.
INITIAL_IN_FLIGHT = 32


def is_overload(exc: BaseException | None) -> bool:
    """An answer that means "the endpoint is full": HTTP 429 or 503 (a quota or billing 429 is not)."""
    if exc is None or getattr(exc, "status", None) not in OVERLOAD_STATUS:
        return False
    return "billing" not in type(exc).__name__.lower()


# Latencies are also counted in buckets, four to an octave from 0.5 ms (the last one open-ended), so a
# window's typical latency is its median: a few calls that hang for seconds are not a queue forming.
LATENCY_BUCKETS = 72
_BUCKET_BASE_S = 0.0005


def latency_bucket(seconds: float) -> int:
    """The bucket of a call's latency (see :data:`LATENCY_BUCKETS`)."""
    if seconds <= _BUCKET_BASE_S:
        return 0
    return min(LATENCY_BUCKETS - 1, int(4.0 * math.log2(seconds / _BUCKET_BASE_S)))


def median_latency(histogram: list[int]) -> float | None:
    """The median of a latency histogram (interpolated within its bucket); None when it is empty."""
    total = sum(histogram)
    if not total:
        return None
    half, seen = total / 2.0, 0
    for bucket, count in enumerate(histogram):
        if count and seen + count >= half:
            return _BUCKET_BASE_S * 2.0 ** ((bucket + (half - seen) / count) / 4.0)
        seen += count
    return None  # pragma: no cover - the loop always returns


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
    latency_hist: list[int] | None = None  # the ok calls' latencies by bucket (latency_bucket), when counted
    peak_in_flight: int = 0
    demand: int = 0  # peak of (in flight + waiting for a slot)

    def merge(self, other: Signals) -> None:
        """Add a later interval: counters add up, gauges keep their peak."""
        self.ok += other.ok
        self.overloads += other.overloads
        self.errors += other.errors
        self.latency_sum += other.latency_sum
        if other.latency_hist:
            if self.latency_hist is None:
                self.latency_hist = [0] * LATENCY_BUCKETS
            for bucket, count in enumerate(other.latency_hist):
                self.latency_hist[bucket] += count
        self.peak_in_flight = max(self.peak_in_flight, other.peak_in_flight)
        self.demand = max(self.demand, other.demand)

    @property
    def answered(self) -> int:
        return self.ok + self.overloads

    def typical_latency(self) -> float | None:
        """The window's median latency when counted by bucket, else its mean; None without an answer."""
        if not self.ok:
            return None
        median = median_latency(self.latency_hist) if self.latency_hist else None
        return median if median is not None else self.latency_sum / self.ok


@dataclass(frozen=True)
class CutOnTrial:
    """A cut made on 429s, waiting for its effect to be judged (:meth:`AimdPolicy._judge_cut`)."""

    before: float  # the limit before the cut
    per_slot: float  # calls answered per second per slot, over about the second before the cut
    level: float  # mean requests in flight over that second
    rate: float  # the share of 429s that made the cut (0 for a cut on latency)
    latency: float = 0.0  # a cut on latency: the latency / floor ratio that made it (0 for a cut on 429s)
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
    MAX_BACKGROUND = 0.5  # a cut on a larger share of 429s is never undone: that endpoint refuses, it is not noise
    LATENCY_SAMPLES = 10  # answers a window needs before its latency says anything (else it runs longer)
    TRIAL_S = 1.0  # a cut's effect is judged over at least this long ...
    TRIAL_LATENCIES = 4  # ... and this many latency floors (a cut on 429s: sooner, once 20 calls are answered)

    def __init__(self, ceiling: int, initial: int = INITIAL_IN_FLIGHT, min_limit: int = 1, adaptive: bool = True):
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
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=16)  # (429s, answered) per window
        self.leak: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, 429s, answered) since a cut
        self.background = 0.0  # share of 429s learned not to be caused by the level (see _judge_cut)
        self.last_cut: CutOnTrial | None = None  # a 429 cut waiting for its effect to be judged
        self.recent_ok: collections.deque[tuple[float, float, int, float]] = collections.deque()  # start, end, ok, level
        self.held: collections.deque[tuple[float, int]] = collections.deque()  # (time, in flight) of clean windows
        self.window = Signals()
        self.window_start: float | None = None
        self.cuts = 0
        self.reverted = 0
        self.slow_windows = 0  # windows in a row with latency above CUT_LATENCY x the floor
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

    def rise_span(self, before: float) -> float:
        """Over how long the callers take up the limit's rise from ``before`` (see ``EndpointLimiter.set_share``):
        one latency for a large one (slow start, the way back to the plateau), 0 (at once) for a probe's step."""
        if self.limit - before <= max(2.0, 0.1 * before):
            return 0.0
        return max(self.MIN_WINDOW_S, self.latency_floor or 0.0)

    # -- deciding ---------------------------------------------------------------

    def observe(self, signals: Signals, now: float) -> float:
        """Add one interval's signals; decide when a window is complete (or overloads are already clear)."""
        if not self.adaptive:
            return self.limit
        if self.window_start is None:
            self.window_start = now
        self.window.merge(signals)
        length = max(self.MIN_WINDOW_S, self.latency_floor or 0.0)
        elapsed = now - self.window_start
        # 429s come back at once and answers only after the latency, so a short window overweights them:
        # only an endpoint with no background of 429s is judged before its window ends.
        early = not self.background and (self.window.overloads > self.overload_threshold(self.window.answered)
                                         or self._probe_refused(self.window))
        # A window ends once it is long enough and has heard enough answers (or has run 4x longer).
        if early or (elapsed >= length and (self.window.ok >= self.LATENCY_SAMPLES or elapsed >= 4 * length)):
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
        ratio = (latency / self.latency_floor if latency is not None and self.latency_floor
                 and w.ok >= self.LATENCY_SAMPLES else 1.0)
        if self._cut_if_full(w, ratio, now) or self._hold(w, ratio):
            return
        self._grow(w, now)

    def _learn(self, w: Signals, start: float, now: float) -> float | None:
        """Track the latency floor and what was served (for cuts), whatever is decided; the window's latency."""
        latency = w.typical_latency()
        if latency is not None:
            floor = self.latency_floor
            self.latency_floor = latency if floor is None else min(floor * self.FLOOR_DRIFT, latency)
        if w.answered:
            self.recent_ok.append((start, now, w.ok, min(self.limit, w.peak_in_flight or self.limit)))
        return latency

    def _on_trial(self, w: Signals, seconds: float) -> bool:
        """A 429 cut's effect decides first: True while too little of it is seen yet, or when it is undone."""
        self.last_cut = self.last_cut.plus(w, seconds)
        # Over several latencies: requests sent together come back together, so one window's count of
        # answers swings by as much as the cut's effect (a window of one latency holds one wave or two).
        span = max(self.TRIAL_S, self.TRIAL_LATENCIES * (self.latency_floor or 0.0))
        if self.last_cut.seconds < span and (self.last_cut.after.answered < 20 or self.last_cut.latency):
            return True
        return self._judge_cut()

    def _cut_if_full(self, w: Signals, ratio: float, now: float) -> bool:
        """Cut when the endpoint says it is full (429s in this window or added up, or a queue); True if cut."""
        if w.answered >= 10:  # every window, cut or not: the background share is never above what they saw
            self.recent.append((w.overloads, w.answered))
        overloaded = w.overloads > self.overload_threshold(w.answered) or self._probe_refused(w)
        # One slow window is noise (a busy client, a few slow answers); two in a row are a queue forming.
        self.slow_windows = self.slow_windows + 1 if ratio > self.CUT_LATENCY else 0
        if overloaded or self.slow_windows >= 2:
            self._cut(now, w.peak_in_flight, by_overloads=overloaded, rate=w.overloads / max(1, w.answered),
                      latency=0.0 if overloaded else ratio)
            return True
        leak = self._leak(now, w)
        if leak is not None:
            self._cut(now, w.peak_in_flight, by_overloads=True, rate=leak, keep=self.LEAK_CUT)
            return True
        return False

    def _probe_refused(self, w: Signals) -> bool:
        """A probe's first 429 is its verdict on an endpoint with no background of them: at or above the level that
        failed last, a refusal says the capacity is still below it.  (Held to the usual threshold, a probe stood
        until its 429s added up to three, and each refused request's row took its slot and was refused in turn: a
        probe cost 5-8 429s, a third of a 5,000-row run's at C = 128.)"""
        return w.overloads > 0 and not self.background and self._probing()

    def _probing(self) -> bool:
        """At or above the level that failed last (a probe's step); False in slow start, before any level failed."""
        return self.w_max is not None and self.limit >= self.w_max

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

    def _cut(self, now: float, peak: int, *, by_overloads: bool, rate: float, keep: float = 1.0,
             latency: float = 0.0) -> None:
        before, recent = self.limit, self._ok_per_s(now)
        # After 429s a probe counts as held only once in flight reached the level that failed; a cut on
        # latency may have been a passing stall, so there each probe that fills the limit counts.
        self.fail_peak = (peak or None) if by_overloads else None
        ok_rate, level = recent if recent is not None else (None, before)
        served = ok_rate * self.latency_floor if ok_rate is not None and self.latency_floor else None
        while self.held and self.held[0][0] < now - 3.0:
            self.held.popleft()
        # What the endpoint served (Little's law) or, after a small excess (a probe), the most it held
        # lately without complaint below the level that failed; after a large one only what it served.
        probing = self._probing()  # self.limit is still ``before`` here
        small = rate < 0.1 or (probing and self.window.overloads <= 5)  # a probe's few 429s in a short window
        # A queue (a cut on latency) is not answered by a 429, so "held without complaint" says nothing there.
        held = max((n for _, n in self.held if n < before), default=0) if small and by_overloads else 0
        target = max(served or 0.0, held) or before * 0.5
        self.limit = max(float(self.min_limit), min(before - 1, keep * before, max(target, before * 0.5)))
        self.leak.clear()
        # A probe that failed waits longer next time; an endpoint refusing most calls (down, out of quota)
        # says nothing of its capacity, so the probes go on at once when it answers again.
        failed_probe = probing and rate <= self.MAX_BACKGROUND
        self.probe_wait = min(self.MAX_PROBE_WAIT_S, self.probe_wait * 2) if failed_probe else 1.0
        # The level that failed, or (after an overshoot) just above what was actually held.
        self.w_max = max(self.limit + 1, min(before, target + 1))
        self.probe_at = now + self.probe_wait
        self.probe_step = 1.0
        self.cooldown_until = now + 2 * max(self.MIN_WINDOW_S, self.latency_floor or 0.0)
        self.cuts += 1
        self.last_cut = (CutOnTrial(before=before, per_slot=ok_rate / level, level=level,
                                    rate=rate if by_overloads else 0.0, latency=latency)
                         if (by_overloads or latency) and ok_rate else None)

    def _judge_cut(self) -> bool:
        """Judge the last 429 cut by its effect; True when it is undone.

        An endpoint at capacity serves as much after the cut as before (the 429s were the
        excess), so each slot answers more calls and the share of 429s falls.  An endpoint
        that throttles at random serves less, in proportion, and refuses the same share:
        only when both say so is that share background, the cut undone and the capacity
        looked for again.
        """
        cut, self.last_cut = self.last_cut, None
        if cut.latency:
            return self._judge_latency_cut(cut)
        w = cut.after
        level = max(1.0, min(self.limit, w.peak_in_flight or self.limit))
        gain = cut.level / level  # > 1: fewer requests held after the cut
        per_slot = w.ok / max(cut.seconds, self.MIN_WINDOW_S) / level
        rate = w.overloads / max(1, w.answered)
        if cut.rate > self.MAX_BACKGROUND and w.overloads and not w.ok:
            # It refuses everything, at any level (down, out of quota): nothing learned of its capacity,
            # so the limit stays cut, and grows from slow start once it answers again.
            self.w_max = self.fail_peak = None
            return False
        if (gain < 1.05 or per_slot >= cut.per_slot * (1 + gain) / 2 or rate < 0.6 * cut.rate
                or cut.rate > self.MAX_BACKGROUND):
            return False  # the cut helped: more answered per slot, or fewer 429s
        self.background = max(self.background, min(cut.rate, w.overloads / max(1, w.answered) + 0.05))
        self.recent.clear()  # windows from before it was learned say nothing of it
        self.limit = max(self.limit, cut.before)
        self.w_max = self.fail_peak = None  # the failures were noise: find the capacity again
        self.reverted += 1
        return True

    def _judge_latency_cut(self, cut: CutOnTrial) -> bool:
        """Judge a cut on latency by its effect; True when it is undone.

        A queue drained by the cut leaves the endpoint answering as many calls as before, with
        fewer in flight.  When the cut cost calls answered in proportion, the requests it removed
        were being worked on, not queued: latency rose for another reason (a slower endpoint, a
        busy client, a few hung calls), so the cut is undone and the floor follows the latency.
        """
        w = cut.after
        latency = w.typical_latency()
        if latency is None or not self.latency_floor or w.ok < self.LATENCY_SAMPLES:
            return False
        if latency <= self.latency_floor * self.HOLD_LATENCY:
            return False  # back near the floor with fewer in flight: the cut drained a queue
        level = max(1.0, min(self.limit, w.peak_in_flight or self.limit))
        gain = cut.level / level  # > 1: fewer requests held after the cut
        kept = (w.ok / max(cut.seconds, self.MIN_WINDOW_S)) / (cut.per_slot * cut.level)  # calls/s after / before
        if gain < 1.05 or kept >= 1.0 - 0.5 * (1.0 - 1.0 / gain):
            return False  # as many answered with fewer in flight: a queue it was
        self.latency_floor = latency
        self.limit = max(self.limit, cut.before)
        self.w_max, self.fail_peak = self.limit + 1, None  # back where it was, probing on from there
        self.reverted += 1
        return True
