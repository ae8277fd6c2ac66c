"""The endpoint limiter (dspy_ray/client/limiter/): capacity found at run time, rare 429s, the ceiling held, no deadlock.

Real HTTP against the fake endpoint, from many threads through ``build_lm``'s LM (the path every
stage, judge and optimizer worker takes); the cross-process test uses real Ray actors.
"""

from __future__ import annotations

import threading
import time

import pytest

from dspy_ray.client.limiter import (
    AimdPolicy,
    EndpointLimiter,
    Signals,
    coordinator_state,
    endpoint_key,
    endpoint_limiter,
)
from dspy_ray.client.limiter.policy import INITIAL_IN_FLIGHT
from dspy_ray.client.limiter.slots import REFUSED_RISE_S
from dspy_ray.client.lm import build_lm
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.testing.fake_llm import FakeLLM

LATENCY = 0.2


class Overloaded(Exception):
    """What the LM client raises for a 429 (the limiter reads its ``status``)."""

    status = 429


def settings_for(fake: FakeLLM, **kw) -> EndpointSettings:
    return EndpointSettings(base_url=fake.base_url, model="fake-model", **kw)


def drive(lm, threads: int, seconds: float) -> dict[str, int]:
    """``threads`` callers, each sending one request after another for ``seconds``."""
    stop = time.monotonic() + seconds
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def work(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            try:
                lm(messages=[{"role": "user", "content": f"caller {i} call {n}"}])
                key = "ok"
            except Exception:  # noqa: BLE001 - counted
                key = "failed"
            with lock:
                counts[key] += 1
            n += 1

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 60)
    return counts


def job_state(limiter) -> dict | None:
    """The job's state of ``limiter``'s endpoint at the coordinator (None: this process decides alone)."""
    if limiter.coordinator is None:
        return None
    base_url, model = limiter.key.split("|")
    return coordinator_state(base_url, model)


def background_of(limiter) -> float:
    """The background 429 share the limit has learned: the job's (with Ray) or this process's."""
    job = job_state(limiter)
    return job["background"] if job is not None else limiter.policy.background_rate()


def learned_limit(limiter) -> float:
    """The limit found for the endpoint: the job's (with Ray: an idle process gives its share back), else this process's."""
    job = job_state(limiter)
    return job["limit"] if job is not None else limiter.limit


def after(samples: list[dict], seconds: float, until: float) -> list[dict]:
    active = [s for s in samples if s["requests"] > 0]
    t0 = active[0]["seconds"]
    return [s for s in active if seconds <= s["seconds"] - t0 <= until]


@pytest.mark.slow
@pytest.mark.parametrize("capacity", [32, 128])
def test_finds_the_capacity_of_an_endpoint_that_rejects_what_it_cannot_hold(capacity):
    with FakeLLM(latency=LATENCY, capacity=capacity, reject_over=0, retry_after=1.0, sample_interval=0.05) as fake:
        lm = build_lm(settings_for(fake, max_attempts=30))
        drive(lm, threads=2 * capacity + 16, seconds=9.0)
        samples, stats = fake.samples(), fake.stats()
    steady = after(samples, 4.0, 9.0)  # capacity found within 4 s, then held
    mean_in_flight = sum(s["in_flight"] for s in steady) / len(steady)
    requests = steady[-1]["requests"] - steady[0]["requests"]
    rejected = steady[-1]["rate_limited"] - steady[0]["rate_limited"]
    assert mean_in_flight >= 0.8 * capacity, (mean_in_flight, lm.limiter.state())
    assert rejected <= 0.03 * requests, (rejected, requests, lm.limiter.state())
    assert 0.75 * capacity <= learned_limit(lm.limiter) <= 1.25 * capacity + 2, lm.limiter.state()
    assert stats["over_capacity"] > 0  # it did have to find the edge


@pytest.mark.slow
@pytest.mark.parametrize("capacity", [32, 128])
def test_finds_the_capacity_of_an_endpoint_that_queues(capacity):
    with FakeLLM(latency=LATENCY, capacity=capacity, sample_interval=0.05) as fake:
        lm = build_lm(settings_for(fake))
        drive(lm, threads=3 * capacity, seconds=8.0)
        samples = fake.samples()
    steady = after(samples, 4.0, 8.0)
    busy = sum(s["in_flight"] for s in steady) / len(steady)
    queued = sum(s["queued"] for s in steady) / len(steady)
    assert busy >= 0.9 * capacity, (busy, lm.limiter.state())  # the endpoint is kept full ...
    assert queued <= 0.8 * capacity, (queued, lm.limiter.state())  # ... without piling up a queue
    assert learned_limit(lm.limiter) <= 1.8 * capacity, lm.limiter.state()


@pytest.mark.slow
def test_background_429s_do_not_collapse_the_limit():
    """A provider that throttles 20% of requests at random: cutting does not help, so it is learned as background."""
    with FakeLLM(latency=0.1, p_429=0.2, retry_after=0.05, seed=4) as fake:
        lm = build_lm(settings_for(fake, max_attempts=30))
        counts = drive(lm, threads=96, seconds=8.0)
        stats = fake.stats()
    assert stats["rate_limited"] > 0.1 * stats["requests"]
    assert counts["failed"] == 0
    assert background_of(lm.limiter) > 0.1, lm.limiter.state()
    assert learned_limit(lm.limiter) >= 24, lm.limiter.state()  # not collapsed to a few slots


@pytest.mark.slow
def test_the_ceiling_holds_for_all_processes_together(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Caller:
        def run(self, base_url: str, ceiling: int, seconds: float) -> dict:
            lm = build_lm(EndpointSettings(base_url=base_url, model="fake-model", max_in_flight=ceiling))
            counts = drive(lm, threads=48, seconds=seconds)
            return {**counts, "coordinated": lm.limiter.coordinator is not None}

    with FakeLLM(latency=0.1, sample_interval=0.02) as fake:  # unlimited capacity: only the ceiling limits
        callers = [Caller.remote() for _ in range(3)]
        results = ray.get([c.run.remote(fake.base_url, 20, 6.0) for c in callers])
        samples, stats = fake.samples(), fake.stats()
    assert all(r["coordinated"] and r["ok"] > 0 for r in results), results
    assert stats["max_in_flight"] <= 20, stats["max_in_flight"]
    steady = after(samples, 2.0, 5.5)
    assert sum(s["in_flight"] for s in steady) / len(steady) >= 14  # and it is used


def test_a_process_cut_off_with_no_share_keeps_one_slot():
    """Its share was 0 (the others held every slot) when the service went: a call still goes through."""
    limiter = EndpointLimiter("test|cut-off", ceiling=32)
    limiter.set_share(0)
    limiter.lost_coordinator()
    limiter.tick()  # the local policy's first decision, with nothing answered yet
    done = threading.Event()

    def call() -> None:
        with limiter.slot():
            done.set()

    threading.Thread(target=call, daemon=True).start()
    assert done.wait(5.0), limiter.state()
    assert limiter.limit == 1  # one slot, not more: the others may still hold theirs


@pytest.mark.slow
def test_calls_go_on_while_the_limit_service_is_lost_and_restarted(ray_local):
    """The service's process dies mid-run (its node lost): callers decide locally, then join it again."""
    ray = ray_local
    from dspy_ray.client.limiter import ensure_coordinator

    @ray.remote(num_cpus=0)
    class Caller:
        def run(self, base_url: str, seconds: float) -> dict:
            lm = build_lm(EndpointSettings(base_url=base_url, model="fake-model-lost", max_in_flight=16))
            counts = drive(lm, threads=24, seconds=seconds)
            return {**counts, "coordinated": lm.limiter.coordinator is not None}

    service = ensure_coordinator()
    with FakeLLM(latency=0.05) as fake:
        caller = Caller.remote()
        result = caller.run.remote(fake.base_url, 6.0)
        time.sleep(2.0)
        ray.kill(service, no_restart=False)
        counts = ray.get(result, timeout=120)
        stats = fake.stats()
    assert counts["failed"] == 0 and counts["ok"] > 0, counts
    assert counts["coordinated"], "the caller did not join the restarted service"
    assert stats["max_in_flight"] <= 16 + 1, stats  # its last share, or one slot, while cut off


@pytest.mark.slow
def test_no_deadlock_when_the_endpoint_is_down():
    # Nothing listens: every attempt fails at once; calls end with errors, the limiter keeps no slot.
    down = EndpointSettings(base_url="http://127.0.0.1:9/v1", model="fake-model", max_attempts=2)
    lm = build_lm(down)
    start = time.monotonic()
    counts = drive(lm, threads=40, seconds=1.0)
    assert counts["ok"] == 0 and counts["failed"] > 0
    assert time.monotonic() - start < 30
    assert lm.limiter.in_flight == 0

    # Every request answered 429: the limit falls to its floor, calls fail after their attempts, and it
    # grows back when the endpoint recovers.
    with FakeLLM(latency=0.05, p_429=1.0, retry_after=0.05) as fake:
        lm = build_lm(settings_for(fake, max_attempts=3))
        counts = drive(lm, threads=40, seconds=3.0)
        assert counts["ok"] == 0 and counts["failed"] > 0
        assert learned_limit(lm.limiter) <= 4, lm.limiter.state()
        fake.configure(p_429=0.0)
        counts = drive(lm, threads=40, seconds=4.0)
    assert counts["ok"] > 0 and counts["failed"] == 0
    assert learned_limit(lm.limiter) >= 24, lm.limiter.state()
    assert lm.limiter.in_flight == 0


def test_one_limiter_per_endpoint_in_a_process_and_the_lower_ceiling_wins():
    with FakeLLM() as fake:
        a = endpoint_limiter(settings_for(fake, max_in_flight=64), coordinate=False)
        b = endpoint_limiter(settings_for(fake, max_in_flight=16), coordinate=False)
        other = endpoint_limiter(EndpointSettings(base_url=fake.base_url, model="judge"), coordinate=False)
    assert a is b and a.ceiling == 16 and a.share <= 16
    assert other is not a


def test_forgotten_endpoints_start_afresh_here_and_at_the_service():
    from dspy_ray.client.limiter import LimitService, forget_endpoints

    settings = EndpointSettings(base_url="http://127.0.0.1:9/v1", model="forget-me", max_in_flight=64)
    learned = endpoint_limiter(settings, coordinate=False)
    learned.set_share(40)
    assert endpoint_key(settings.base_url, settings.model) in forget_endpoints()
    fresh = endpoint_limiter(settings, coordinate=False)
    assert fresh is not learned and fresh.share == INITIAL_IN_FLIGHT  # the initial share, not the one learned
    service = LimitService()
    service.join(fresh.key, "a", 64)
    assert service.forget([fresh.key, "never|seen"]) == 1 and service.state(fresh.key) is None


def test_async_callers_share_the_slots():
    import asyncio

    limiter = EndpointLimiter("test|async", ceiling=3, adaptive=False)
    peak = 0

    async def call():
        nonlocal peak
        async with limiter.aslot():
            peak = max(peak, limiter.in_flight)
            await asyncio.sleep(0.01)

    async def main():
        await asyncio.gather(*(call() for _ in range(30)))

    asyncio.run(main())
    assert peak == 3 and limiter.in_flight == 0 and limiter.totals.ok == 0  # totals move on tick()
    limiter.tick()
    assert limiter.totals.ok == 30


def test_policy_never_passes_the_ceiling_and_cuts_to_what_was_served():
    policy = AimdPolicy(ceiling=100, initial=16)
    now = 0.0
    for _ in range(20):  # slow start against an endpoint that answers everything in 0.25 s
        now += 0.3
        level = int(policy.limit)
        policy.observe(Signals(ok=level, latency_sum=level * 0.25, peak_in_flight=level, demand=2 * level), now)
        assert policy.limit <= 100
    assert policy.limit == 100
    # Now it holds 60: 60 answered per 0.25 s, what is sent beyond that answered 429 at once.
    for _ in range(6):
        now += 0.3
        level = int(policy.limit)
        ok, rejected = int(min(level, 60) * 0.3 / 0.25), int(max(0, level - 60) * 0.3 / 0.05)
        policy.observe(Signals(ok=ok, overloads=rejected, latency_sum=ok * 0.25, peak_in_flight=level,
                               demand=200), now)
    assert 55 <= policy.limit <= 75, policy.limit
    assert policy.cuts >= 1


def test_a_few_429s_in_every_window_add_up_to_a_cut():
    """Two 429s per window never pass one window's threshold; over a second they are a leak, and it is cut."""
    policy = AimdPolicy(ceiling=64, initial=32)
    policy.w_max = 33.0  # at the plateau, just under the level that failed last ...
    policy.probe_at = 1e9  # ... and not probing (a probe's first 429 is its verdict: see the test below)
    now = 0.0
    for _ in range(3):  # clean: the endpoint holds 32
        now += 0.25
        policy.observe(Signals(ok=32, latency_sum=32 * 0.2, peak_in_flight=32, demand=64), now)
    before, cuts = policy.limit, policy.cuts
    for _ in range(5):
        now += 0.25
        policy.observe(Signals(ok=30, overloads=2, latency_sum=30 * 0.2, peak_in_flight=32, demand=64), now)
        if policy.cuts > cuts:
            break
    assert policy.cuts == cuts + 1, policy.limit
    assert policy.limit <= 0.9 * before  # deep enough that its effect can be judged
    assert now - 0.75 <= 1.0  # within the leak span


def test_a_quick_local_cut_holds_until_the_policy_has_seen_its_429s():
    limiter = EndpointLimiter("test|backoff", ceiling=64, initial=8)
    for _ in range(8):  # eight requests in flight, three answered 429 at once
        limiter._acquire()
    for _ in range(3):
        limiter._release(None, Overloaded())
    assert limiter.limit < 8 and limiter.backoff is not None
    cut = limiter.limit
    report = limiter.coordinated_report()  # the interval with the 429s goes to the coordinator ...
    limiter.set_share(8.0, decided=report[-1] - 1)  # ... whose answer was decided before it came
    assert limiter.limit == cut
    limiter._release(0.1, None)  # an answer does not pace the limit back up meanwhile
    assert limiter.limit == cut
    limiter.set_share(8.0, decided=report[-1])  # decided with it: the policy's share holds
    assert limiter.limit == 8.0 and limiter.backoff is None


def test_a_rise_of_the_limit_is_taken_up_over_a_latency_and_a_burst_of_429s_stops_it():
    """An endpoint that refuses what is over its capacity refuses a burst whole: after a doubling, twice the
    requests in flight went out at once, and half came back 429.  A rise is spread over a latency instead; the
    first 429s cut it short.  A share that moves between processes (not paced) still moves at once."""
    limiter = EndpointLimiter("test|rise", ceiling=256, initial=16)
    limiter.set_share(64.0)  # not paced: at once
    assert limiter.limit == 64.0
    limiter.set_share(128.0, paced=0.4)  # the policy doubled the limit
    assert 64.0 <= limiter.limit < 70.0  # ... none of the rise at once
    time.sleep(0.2)
    limiter._take_up()  # what a waiting caller's pump does
    assert 80.0 < limiter.limit < 120.0  # about half of it after half the span
    held = [limiter._acquire() for _ in range(int(limiter.limit))]
    for _ in range(3):  # the endpoint is full: three 429s at once
        limiter._release(None, Overloaded())
    assert limiter._rise is None and limiter.backoff is not None
    cut = limiter.limit
    time.sleep(0.25)
    limiter._take_up()
    assert limiter.limit == cut  # the rest of the rise is never sent
    assert len(held) > cut

    one = EndpointLimiter("test|rise-one", ceiling=256, initial=16)
    one.set_share(64.0)
    one.set_share(128.0, paced=0.4)
    one._acquire()
    one._release(None, Overloaded())  # a single refusal: the rise stops where it is, no cut (yet)
    assert one._rise is None and one.backoff is None and 64.0 <= one.limit < 70.0

    fresh = EndpointLimiter("test|rise-fresh", ceiling=256, initial=16)
    fresh.set_share(0.0)
    fresh.set_share(32.0, paced=0.4)  # a process with no slot yet takes one at once, the rest over the span
    assert 1.0 <= fresh.limit < 6.0
    time.sleep(0.45)
    fresh._take_up()
    assert fresh.limit == 32.0


def test_the_coordinator_says_paced_after_the_limit_grew_and_not_otherwise():
    from dspy_ray.client.limiter import LimitCoordinator

    coordinator = LimitCoordinator("test|paced", ceiling=256, initial=16)
    now = [100.0]
    coordinator.clock = lambda: now[0]
    coordinator.join("a")
    busy = {"ok": 16, "latency_sum": 16 * 0.05, "peak_in_flight": 16, "demand": 64}
    answers = []
    for number in range(1, 4):  # windows of 0.2 s, the limit used: slow start doubles it
        now[0] += 0.2
        answers.append((coordinator.policy.limit, coordinator.report("a", busy, number)))
    grew = [answer for before, answer in answers if coordinator.history and answer["share"] > before]
    assert grew and all(answer["paced"] > 0 for answer in grew)
    now[0] += 5.0  # long after: a report that changes nothing is not paced
    idle = {"ok": 0, "peak_in_flight": 0, "demand": 0}
    assert coordinator.report("a", idle, 4)["paced"] == 0.0


def test_the_coordinator_says_which_reports_it_decided_with():
    from dspy_ray.client.limiter import LimitCoordinator

    coordinator = LimitCoordinator("test|decided", ceiling=64)
    coordinator.join("a")
    coordinator.join("b")
    signals = {"ok": 4, "latency_sum": 0.4, "peak_in_flight": 4, "demand": 8}
    # b joined and has not called: it does not hold the policy back, a's report is a round on its own.
    assert coordinator.report("a", signals, 1)["decided"] == 1
    # Both call from now on: a step waits for a report from each.
    assert coordinator.report("b", signals, 1)["decided"] == 0  # no step: a has not reported since
    assert coordinator.report("a", signals, 2)["decided"] == 2  # the step, with b's first report and a's second
    assert coordinator.report("b", signals, 2)["decided"] == 1
    # b goes idle: a's reports are rounds on their own again.
    coordinator.report("b", {"idle": True}, 3)
    assert coordinator.report("a", signals, 3)["decided"] == 3
    assert coordinator.report("a", signals, 4)["decided"] == 4


def test_a_process_that_joined_and_never_called_holds_no_slots():
    """Stage actors join when they start; a later stage's waits for rows and reports nothing meanwhile.
    Whoever joined first, the one that calls gets the limit at its first report, not after a timeout."""
    from dspy_ray.client.limiter import LimitCoordinator

    coordinator = LimitCoordinator("test|joined", ceiling=64, initial=16)
    assert coordinator.join("second-stage")["share"] == 0  # joined first, silent from then on
    assert coordinator.join("first-stage")["share"] == 0
    share = coordinator.report("first-stage", {"peak_in_flight": 0, "demand": 12}, 1)["share"]
    assert share >= 12


def test_an_idle_process_keeps_its_share_for_a_moment_then_gives_it_back():
    """Driver and workers take turns (optimize): the one that goes idle says so, and the other gets the slots
    after IDLE_GRACE_S, not when the idle one is timed out (it runs no code that could report later).
    Within the grace the share stays: a Serve replica goes idle between requests many times a second."""
    from dspy_ray.client.limiter import LimitCoordinator
    from dspy_ray.client.limiter.coordinator import IDLE_GRACE_S

    now = [1000.0]
    coordinator = LimitCoordinator("test|idle", ceiling=64, initial=32)
    coordinator.clock = lambda: now[0]
    coordinator.join("driver")
    coordinator.join("worker")
    busy = {"ok": 8, "latency_sum": 0.8, "peak_in_flight": 16, "demand": 40}
    for n in (1, 2):
        coordinator.report("worker", busy, n)
        driver_share = coordinator.report("driver", {"peak_in_flight": 0, "demand": 0, "idle": True}, n)["share"]
    assert driver_share <= 1  # the idle driver is granted no spare
    worker_share = coordinator.members["worker"].granted
    assert worker_share >= 30
    # The worker's last call ended: it says so at once, and keeps its share for a moment.
    assert coordinator.report("worker", {**busy, "idle": True}, 3)["share"] == worker_share
    now[0] += IDLE_GRACE_S * 0.6
    assert coordinator.report("driver", {**busy, "peak_in_flight": 1}, 3)["share"] <= 64 - worker_share
    # Idle again, with calls answered since its last report: it was busy meanwhile, the grace starts again.
    coordinator.report("worker", {**busy, "idle": True}, 4)
    now[0] += IDLE_GRACE_S * 0.6  # past the grace from its first idle report, not from this one
    assert coordinator.report("driver", {**busy, "peak_in_flight": 1}, 4)["share"] <= 64 - worker_share
    now[0] += IDLE_GRACE_S
    for n in (5, 6):
        share = coordinator.report("driver", {**busy, "peak_in_flight": 1}, n)["share"]
        coordinator.report("worker", {"idle": True}, n)  # idle, nothing answered since
    assert share >= 30  # what the worker held is the driver's now
    assert coordinator.members["worker"].granted <= 1


def spell_recorder(limiter: EndpointLimiter) -> list[bool]:
    """Record what ``limiter`` reports to its coordinator (``idle`` of each report), as registry.sync would
    send it; only the reports made at once (urgent): none is due by the clock in these tests."""
    limiter.coordinator = object()  # as if joined: the share is the coordinator's
    sent: list[bool] = []

    def pump(urgent: bool = False) -> None:
        if urgent:
            sent.append(limiter.coordinated_report()[2]["idle"])

    limiter.pump = pump
    return sent


def test_a_thread_caller_reports_each_idle_spell_once_and_its_return_at_once():
    """The report that an idle process makes is one per idle spell; a thread's call after it says busy again at
    once (nothing could say it later), and keeps the share while the coordinator still does."""
    from dspy_ray.client.limiter.slots import IDLE_GRACE_S

    limiter = EndpointLimiter("test|spells", ceiling=64, initial=16)
    sent = spell_recorder(limiter)
    for _ in range(3):  # three calls, each alone: idle after each
        with limiter.slot():
            pass
    assert sent == [True, False, True, False, True]  # idle, busy again, ...
    assert limiter.share == 16  # came back within the grace: the share is still ours
    limiter.idle_reported -= IDLE_GRACE_S + 0.01  # the idle spell outlasted what the coordinator keeps
    with limiter.slot():
        assert limiter.limit == 1  # one slot until the coordinator answers the busy report
    assert sent[5:] == [False]  # busy again; with one slot there is nothing to give back when it ends


def test_a_batch_stage_gives_its_share_back_as_soon_as_it_is_idle():
    """A batch stage's idle spell ends only when its next rows come (``idle_grace`` 0): the coordinator gives its
    share to the stages still working at once, and its next call says so at once, with no slot until answered."""
    import asyncio

    from dspy_ray.client.limiter import LimitCoordinator

    now = [1000.0]
    coordinator = LimitCoordinator("test|batch-idle", ceiling=64, adaptive=False)
    coordinator.clock = lambda: now[0]
    busy = {"ok": 8, "latency_sum": 0.8, "peak_in_flight": 32, "demand": 100}
    for n in (1, 2):
        coordinator.report("first", busy, n)
        coordinator.report("second", busy, n)
    assert coordinator.members["first"].granted == 32
    assert coordinator.report("first", {"idle": True, "grace": 0.0}, 3)["share"] == 0  # at once, all of it
    assert coordinator.report("second", {**busy, "peak_in_flight": 32}, 3)["share"] >= 63

    limiter = EndpointLimiter("test|batch-spells", ceiling=64, initial=16)
    limiter.idle_grace = 0.0
    sent = spell_recorder(limiter)
    record = limiter.pump
    shares = []

    def pump(urgent: bool = False) -> None:  # the coordinator answers a busy report with a share
        record(urgent)
        if urgent and not sent[-1]:
            shares.append(limiter.share)
            limiter.set_share(8.0)

    limiter.pump = pump

    async def call() -> None:
        async with limiter.aslot():
            await asyncio.sleep(0)

    with limiter.slot():
        pass
    asyncio.run(call())
    assert sent == [True, False, True]  # idle; busy again at once, not after RESERVED_S; idle
    assert shares == [0.0]  # back from idle it asked before sending: no slot was kept for it


def test_an_event_loop_caller_says_nothing_of_short_gaps_and_busy_before_the_grace_ends():
    """A Serve replica goes idle between two requests many times a second.  Calls that come back within
    RESERVED_S of the idle report make no report (one per request cost ~0.7 ms of a sequential request);
    calls still in flight at RESERVED_S say busy then, before the coordinator's grace ends."""
    import asyncio

    from dspy_ray.client.limiter.slots import RESERVED_S

    limiter = EndpointLimiter("test|loop-spells", ceiling=64, initial=16)
    sent = spell_recorder(limiter)

    async def call(seconds: float) -> None:
        async with limiter.aslot():
            await asyncio.sleep(seconds)

    async def main() -> None:
        await call(0)
        assert sent == [True]  # gone idle: said at once
        for _ in range(5):  # short requests, one at a time, within RESERVED_S: nothing said
            await call(0.001)
        assert sent == [True]
        await asyncio.gather(call(RESERVED_S * 1.5), call(RESERVED_S * 1.5))  # in flight past RESERVED_S
        assert sent == [True, False, True]  # busy said at RESERVED_S; idle again at the end
        assert limiter.share == 16

    asyncio.run(main())


def clean(policy: AimdPolicy, now: float, latency: float, level: int | None = None, windows: int = 1) -> float:
    """``windows`` windows of 0.25 s in which the endpoint answers every call of ``level`` in flight."""
    for _ in range(windows):
        now += 0.25
        n = level or int(policy.limit)
        ok = int(n * 0.25 / latency)
        policy.observe(Signals(ok=ok, latency_sum=ok * latency, peak_in_flight=n, demand=2 * n), now)
    return now


def test_one_slow_window_is_noise_two_are_a_queue():
    policy = AimdPolicy(ceiling=256, initial=64)
    policy.w_max = 65.0
    now = clean(policy, 0.0, 0.05, windows=4)
    cuts = policy.cuts
    now = clean(policy, now, 0.12)  # one window at 2.4x the floor: a hiccup
    now = clean(policy, now, 0.05)
    assert policy.cuts == cuts
    now = clean(policy, now, 0.12, windows=2)  # two in a row: a queue
    assert policy.cuts == cuts + 1


def test_a_latency_cut_that_costs_calls_in_proportion_is_undone():
    """Latency rose, but not from a queue: after the cut each slot answers no more than before (fewer
    calls answered in all), so the cut is undone and the floor follows the new latency."""
    policy = AimdPolicy(ceiling=256, initial=64)
    policy.w_max = 65.0
    now = clean(policy, 0.0, 0.05, windows=4)
    policy.held.clear()  # nothing held lately to fall back on: the cut goes to what was served
    start, cuts = policy.limit, policy.cuts
    now = clean(policy, now, 0.12, windows=2)
    before, reverted = policy.cuts, policy.reverted
    assert policy.cuts == cuts + 1 and policy.limit < start
    for _ in range(8):  # each slot keeps answering at the slow pace: throughput fell with the cut
        now = clean(policy, now, 0.12, level=int(policy.limit))
        if policy.reverted > reverted:
            break
    assert policy.reverted == reverted + 1 and policy.limit >= start, (policy.limit, policy.cuts, before)
    assert policy.latency_floor >= 0.1


def test_a_cut_that_leaves_the_429_share_as_it_was_is_undone():
    """20% of calls answered 429 whatever the level: the cut is undone and the share learned as background."""
    policy = AimdPolicy(ceiling=256, initial=64)
    now = clean(policy, 0.0, 0.05, level=64, windows=3)
    limit = policy.limit
    for _ in range(30):
        now += 0.25
        n = int(policy.limit)
        answered = int(n * 0.25 / 0.05)
        policy.observe(Signals(ok=int(answered * 0.8), overloads=answered - int(answered * 0.8),
                               latency_sum=int(answered * 0.8) * 0.05, peak_in_flight=n, demand=2 * n), now)
    assert policy.reverted >= 1 and policy.background_rate() >= 0.15
    assert policy.limit >= limit, policy.limit


def test_a_probes_first_429_is_its_verdict_unless_429s_come_at_random():
    """At the plateau, one step above the level that failed: a single 429 cuts back to the plateau at once, before
    the window ends (held to the usual threshold of three, the probe stood while its refused rows were refused
    again).  Where a background of random 429s was learned, one 429 says nothing of the probe."""
    policy = AimdPolicy(ceiling=256, initial=64)
    policy.w_max = 65.0  # the endpoint refused 65 in flight lately
    now = clean(policy, 0.0, 0.05, windows=2)
    assert policy.limit == 65.0  # the probe, judged by the next window
    cuts = policy.cuts
    policy.observe(Signals(ok=5, overloads=1, latency_sum=5 * 0.05, peak_in_flight=65, demand=130), now + 0.02)
    assert policy.cuts == cuts + 1 and policy.limit == 64.0  # 20 ms into the window, back to what it held
    assert policy.probe_wait == 2.0  # the next probe waits longer

    noisy = AimdPolicy(ceiling=256, initial=64)
    noisy.w_max, noisy.background = 65.0, 0.05
    now = clean(noisy, 0.0, 0.05, windows=2)
    assert noisy.limit == 65.0
    cuts = noisy.cuts
    noisy.observe(Signals(ok=300, overloads=1, latency_sum=300 * 0.05, peak_in_flight=65, demand=130), now + 0.25)
    assert noisy.cuts == cuts and noisy.limit >= 65.0


def test_a_429_soon_after_the_share_grew_undoes_the_increase_at_once():
    """The endpoint refused what the last increase added (slow start's doubling, a probe): with no background of
    429s, the first one takes the limit back to where it was, until the coordinator has decided with it.  Late,
    or where 429s come at random, a single one changes nothing."""
    limiter = EndpointLimiter("test|undo", ceiling=256, initial=16)
    limiter.set_share(64.0)
    limiter.set_share(128.0, paced=0.4)  # slow start doubled
    time.sleep(0.2)
    limiter._take_up()
    assert limiter.limit > 80.0
    held = [limiter._acquire() for _ in range(int(limiter.limit))]
    limiter._release(None, Overloaded())  # one 429
    assert limiter.limit == 64.0 and limiter._rise is None and limiter.backoff is not None
    report = limiter.coordinated_report()
    limiter.set_share(128.0, decided=report[-1] - 1)  # an answer decided before the 429 was seen: the cut holds
    assert limiter.limit == 64.0
    limiter.set_share(64.0, decided=report[-1])  # the coordinator cut, having seen it
    assert limiter.limit == 64.0 and limiter.backoff is None
    assert len(held) > 64

    late = EndpointLimiter("test|undo-late", ceiling=256, initial=16)
    late.set_share(64.0)
    late.set_share(66.0)  # a probe's step, at once
    late._grown = (time.monotonic() - REFUSED_RISE_S - 0.1, late._grown[1])  # ... longer ago than REFUSED_RISE_S
    late._acquire()
    late._release(None, Overloaded())
    assert late.limit == 66.0 and late.backoff is None

    noisy = EndpointLimiter("test|undo-noisy", ceiling=256, initial=16)
    noisy.set_share(64.0, background=0.2)
    noisy.set_share(66.0)
    noisy._acquire()
    noisy._release(None, Overloaded())
    assert noisy.limit == 66.0 and noisy.backoff is None


def test_calls_waiting_to_retry_are_counted_while_they_wait():
    limiter = EndpointLimiter("test|resting", ceiling=8)
    limiter.rest(0.2)
    limiter.rest(5.0)
    assert limiter.resting() == 2
    time.sleep(0.3)
    assert limiter.resting() == 1


def test_a_short_limit_is_split_by_weight_and_capped_by_demand():
    """A batch run's first stage weighs 4x the second when the limit cannot run both stages' rows (the second
    then keeps rows for the slots the first frees as it ends); no member gets more than it wants."""
    from dspy_ray.client.limiter import EndpointLimiter, LimitCoordinator

    coordinator = LimitCoordinator("test|weight", ceiling=100, adaptive=False)
    for name in ("first", "second"):
        coordinator.join(name)

    def shares(first_demand: int, second_demand: int) -> tuple[float, float]:
        for number in range(1, 4):  # a few rounds: a share grows only out of what the other gave back
            a = coordinator.report("first", {"peak_in_flight": 0, "demand": first_demand, "weight": 4.0}, number)
            b = coordinator.report("second", {"peak_in_flight": 0, "demand": second_demand, "weight": 1.0}, number)
        return a["share"], b["share"]

    assert shares(200, 200) == (80.0, 20.0)
    assert shares(10, 200) == (10.0, 90.0)  # what the first cannot use goes to the second
    assert shares(40, 40) == (50.0, 50.0)  # the limit covers both: each its demand, the spare by demand

    limiter = EndpointLimiter("test|weight-report", ceiling=64)
    limiter.weight = 4.0
    assert limiter.coordinated_report()[2]["weight"] == 4.0


def test_a_share_that_shrank_goes_to_the_others_as_its_requests_end():
    """A process whose share shrank keeps its requests in flight until they end; the others get those slots
    once its report says they ended (the requests in flight at that report, not the interval's peak)."""
    from dspy_ray.client.limiter import EndpointLimiter, LimitCoordinator

    coordinator = LimitCoordinator("test|held", ceiling=100, adaptive=False)
    coordinator.join("a")
    a = coordinator.report("a", {"peak_in_flight": 100, "in_flight": 100, "demand": 300}, 1)
    assert a["share"] == 100.0
    coordinator.join("b")
    b = coordinator.report("b", {"peak_in_flight": 0, "in_flight": 0, "demand": 300}, 1)
    assert b["share"] == 0.0  # a holds every slot: nothing to grow from yet
    a = coordinator.report("a", {"peak_in_flight": 100, "in_flight": 100, "demand": 300}, 2)
    assert a["share"] == 50.0  # a's share shrank; its 100 requests are still in flight
    assert coordinator.report("b", {"peak_in_flight": 0, "in_flight": 0, "demand": 300}, 2)["share"] == 0.0
    # Meanwhile 40 of a's requests ended: its interval's peak was still 100, but 60 are in flight now.
    coordinator.report("a", {"peak_in_flight": 100, "in_flight": 60, "demand": 300}, 3)
    assert coordinator.report("b", {"peak_in_flight": 0, "in_flight": 0, "demand": 300}, 3)["share"] == 40.0

    limiter = EndpointLimiter("test|held-report", ceiling=64)
    with limiter.slot():
        assert limiter.coordinated_report()[2]["in_flight"] == 1
    assert limiter.coordinated_report()[2]["in_flight"] == 0


def test_shares_stay_put_while_every_process_has_more_rows_than_its_share():
    """A stage actor's demand jumps with each block of rows; the split follows the weights, not the demands, so
    no slots move (and none sit idle while they move) as long as every process wants more than it is given."""
    from dspy_ray.client.limiter import LimitCoordinator

    coordinator = LimitCoordinator("test|steady", ceiling=100, adaptive=False)
    for name in ("a", "b"):
        coordinator.join(name)
    rounds = [(300, 300), (300, 300), (600, 120), (90, 700), (400, 400)]  # two rounds to settle, then blocks come
    for number, (a_rows, b_rows) in enumerate(rounds, start=1):
        a = coordinator.report("a", {"peak_in_flight": 50, "in_flight": 50, "demand": a_rows}, number)
        b = coordinator.report("b", {"peak_in_flight": 50, "in_flight": 50, "demand": b_rows}, number)
        if number > 1:
            assert (a["share"], b["share"]) == (50.0, 50.0), number
    a = coordinator.report("a", {"peak_in_flight": 50, "in_flight": 30, "demand": 30}, 6)  # a runs out of rows
    assert a["share"] == 30.0
    assert coordinator.report("b", {"peak_in_flight": 50, "in_flight": 50, "demand": 400}, 6)["share"] == 70.0
