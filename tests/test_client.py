"""The client family: one retry policy for chat and embeddings, and one endpoint limiter for both.

The policy is tested as the pure function it is (no server, no waiting); the rest drives real HTTP
against the fake endpoint (``dspy_ray.testing.fake_llm``), which serves chat and ``/v1/embeddings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest
from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMAuthError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
)

from dspy_ray.client.embeddings import EmbeddingClient, EmbeddingConfigError
from dspy_ray.client.limiter import endpoint_limiter
from dspy_ray.client.limiter.policy import INITIAL_IN_FLIGHT
from dspy_ray.client.lm import build_lm
from dspy_ray.client.retry import (
    RetryPolicy,
    acall_with_retries,
    call_with_retries,
    parse_retry_after,
    policy_for,
)
from dspy_ray.client.usage import metered
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.testing.fake_llm import FakeLLM


class Status(Exception):
    """An HTTP error answer as the clients raise them: ``status`` and ``retry_after`` attributes."""

    def __init__(self, status: int, retry_after: float | None = None):
        super().__init__(f"HTTP {status}")
        self.status, self.retry_after = status, retry_after


async def _no_sleep(_: float) -> None:
    return None


def _settings(fake: FakeLLM, model: str = "fake-model", **kw) -> EndpointSettings:
    # The limiter is one per endpoint (base URL + model) and process: a model name per test keeps a
    # port the OS hands out again from meeting an earlier test's limiter.
    return EndpointSettings(base_url=fake.base_url, model=model, **kw)


# -- the policy: a pure function ---------------------------------------------------------


def test_retry_after_is_honoured_in_seconds_or_as_a_date_and_capped():
    policy = RetryPolicy(max_attempts=6)
    assert all(policy.next_wait(1, Status(429, retry_after=3.0)) >= 3.0 for _ in range(50))
    assert policy.next_wait(1, Status(503, retry_after=10_000.0)) == policy.max_retry_after_s
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after(httpx.Headers({"Retry-After": "1.5"})) == 1.5  # any case
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25.0 <= parse_retry_after({"retry-after": soon}) <= 30.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_only_transient_failures_are_retried():
    policy = RetryPolicy(max_attempts=6)
    retried = [Status(s) for s in (408, 409, 429, 500, 502, 503, 504, 599)] + [
        LMRateLimitError("slow down"), LMServerError("oops"), LMTimeoutError("late"), LMTransportError("reset"),
        httpx.ConnectError("refused"), httpx.ReadTimeout("late"), TimeoutError(), ConnectionResetError()]
    final = [Status(s) for s in (400, 401, 403, 404, 413, 422)] + [
        LMAuthError("bad key", status=401), ContextWindowExceededError(message="too long", status=400),
        ValueError("a bug"), KeyError("field")]
    assert all(policy.next_wait(1, e) is not None for e in retried), retried
    assert all(policy.next_wait(1, e) is None for e in final), final


def test_at_most_max_attempts_with_growing_jittered_backoff():
    policy = RetryPolicy(max_attempts=4)
    assert policy.next_wait(3, Status(503)) is not None and policy.next_wait(4, Status(503)) is None
    for attempt in (1, 3, 6, 12):
        waits = [RetryPolicy(max_attempts=20).next_wait(attempt, Status(500)) for _ in range(200)]
        top = min(policy.max_backoff_s, policy.base_s * 2 ** (attempt - 1))
        assert all(0.0 <= w <= top for w in waits) and len(set(waits)) > 100  # full jitter under the curve
        assert max(waits) > top / 2


def test_the_loops_hold_a_slot_per_attempt_and_none_while_waiting():
    events: list[str] = []

    @contextlib.contextmanager
    def slot():
        events.append("slot")
        try:
            yield
        finally:
            events.append("free")

    def send():
        events.append("send")
        if events.count("send") < 3:
            raise Status(429, retry_after=0.01)
        return "ok"

    failures = []
    result = call_with_retries(send, RetryPolicy(max_attempts=5), slot=slot, sleep=lambda s: events.append("wait"),
                               on_failure=lambda attempt, exc, wait: failures.append((attempt, wait is not None)))
    assert result == "ok" and failures == [(1, True), (2, True)]
    assert events == ["slot", "send", "free", "wait"] * 2 + ["slot", "send", "free"]

    @contextlib.asynccontextmanager
    async def aslot():
        events.append("slot")
        try:
            yield
        finally:
            events.append("free")

    async def asend():
        events.append("send")
        raise Status(400)

    events.clear()
    with pytest.raises(Status):  # a bad request: one attempt, no wait
        asyncio.run(acall_with_retries(asend, RetryPolicy(max_attempts=5), slot=aslot, sleep=_no_sleep))
    assert events == ["slot", "send", "free"]


# -- chat and embeddings: the same policy ---------------------------------------------------


def test_chat_and_embeddings_use_the_same_policy(monkeypatch):
    seen: list[tuple[str, int]] = []
    next_wait = RetryPolicy.next_wait

    def spy(self, attempt, error):
        seen.append((type(error).__name__, attempt))
        return next_wait(self, attempt, error)

    monkeypatch.setattr(RetryPolicy, "next_wait", spy)
    with FakeLLM(p_500=1.0) as fake:
        settings = _settings(fake, max_attempts=3)
        lm, client = build_lm(settings), EmbeddingClient(settings, sleep=_no_sleep)
        assert lm.retry_policy is client.retry_policy is policy_for(settings)
        with metered() as usage, pytest.raises(LMServerError):
            lm("hello")
        result = asyncio.run(client.aembed(["hello"]))
        stats = fake.stats()
        client.close()
    assert [a for name, a in seen if name == "LMServerError"] == [1, 2, 3]
    assert [a for name, a in seen if name == "EmbeddingRequestError"] == [1, 2, 3]
    assert (usage.calls, usage.retries) == (3, 2) == (stats["requests"], stats["server_error"] - 1)
    assert "HTTP 500" in result.errors[0] and client.retries == 2 and stats["embeddings"]["requests"] == 3


def test_chat_waits_for_retry_after_and_counts_its_retries():
    with FakeLLM(p_429=1.0, retry_after=0.3) as fake:
        lm = build_lm(_settings(fake, max_attempts=3))
        started = time.monotonic()
        with metered() as usage, pytest.raises(LMRateLimitError):
            lm("hello")
        elapsed = time.monotonic() - started
        assert fake.stats()["requests"] == 3
    assert elapsed >= 0.6  # two waits, each at least the Retry-After
    assert (usage.calls, usage.retries) == (3, 2)


def test_embeddings_do_not_retry_a_bad_request_or_bad_key():
    with FakeLLM(embed_max_chars=10, embed_api_key="sk-right") as fake:
        client = EmbeddingClient(_settings(fake, api_key="sk-right", batch_size=8), sleep=_no_sleep)
        result = asyncio.run(client.aembed(["short", "far too long for it"]))
        assert result.errors[0] is None and "HTTP 400" in result.errors[1]
        assert fake.stats()["embeddings"]["requests"] == 3 and client.retries == 0  # the batch, then its halves
        client.close()
        wrong = EmbeddingClient(_settings(fake, api_key="sk-wrong"), sleep=_no_sleep)
        with pytest.raises(EmbeddingConfigError, match="HTTP 401"):
            asyncio.run(wrong.aembed(["hello"]))
        assert fake.stats()["embeddings"]["unauthorized"] == 1
        wrong.close()


# -- embeddings go through the endpoint's shared limiter -----------------------------------------


def test_embeddings_in_flight_never_exceed_the_limiters_ceiling():
    with FakeLLM(latency=0.05) as fake:
        settings = _settings(fake, "ceiling-4", max_in_flight=4, batch_size=1)
        client = EmbeddingClient(settings)
        assert client.limiter is endpoint_limiter(settings)
        result = asyncio.run(client.aembed([f"passage {i}" for i in range(40)]))
        stats = fake.stats()
        client.close()
    assert result.failed == 0 and stats["embeddings"]["ok"] == 40
    assert stats["max_in_flight"] <= 4 and client.limiter.peak_in_flight <= 4, stats


def test_chat_and_embeddings_of_one_endpoint_share_one_limit():
    with FakeLLM(latency=0.05) as fake:
        settings = _settings(fake, "shared-3", max_in_flight=3, batch_size=1)
        lm, client = build_lm(settings), EmbeddingClient(settings)
        assert lm.limiter is client.limiter

        def chat(i: int) -> None:
            for n in range(4):
                lm(f"caller {i} call {n}")

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        result = client.embed([f"passage {i}" for i in range(24)])
        for t in threads:
            t.join(timeout=60)
        stats = fake.stats()
        client.close()
    assert result.failed == 0 and stats["requests"] == 16 and stats["embeddings"]["ok"] == 24
    assert stats["max_in_flight"] <= 3, stats


def test_429s_from_the_embeddings_endpoint_cut_the_limit(monkeypatch):
    # A lone process's limiter (its own policy, starting at INITIAL_IN_FLIGHT), whatever Ray an earlier test left
    # running in this process: a coordinated one starts with no share until the job's service grants one.
    monkeypatch.setattr("dspy_ray.client.limiter.registry.ray_initialized", lambda: False)
    limits: list[float] = []

    async def embed_watching_the_limit(client: EmbeddingClient):
        async def watch() -> None:
            while True:
                limits.append(client.limiter.limit)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        try:
            return await client.aembed([f"passage {i}" for i in range(64)])
        finally:
            watcher.cancel()

    with FakeLLM(p_429=1.0, retry_after=0.01, latency=0.01) as fake:
        settings = _settings(fake, "cut", max_in_flight=64, batch_size=1, max_attempts=1)
        client = EmbeddingClient(settings)
        before = client.limiter.limit
        result = asyncio.run(embed_watching_the_limit(client))
        client.close()
    assert result.failed == 64 and all("HTTP 429" in e for e in result.errors)
    deadline = time.monotonic() + 5
    while client.limiter.state()["overloads"] < 64 and time.monotonic() < deadline:
        time.sleep(0.05)  # the limiter's reporter adds each interval to its totals
    # Every 429 reached the limiter as "full", and it cut (what it does after, the policy's tests cover).
    assert client.limiter.state()["overloads"] >= 64
    assert min(limits) < before == INITIAL_IN_FLIGHT, (before, min(limits))


@pytest.mark.parametrize("uvloop", ["1", "0"])
def test_the_fake_answers_alike_on_either_event_loop(monkeypatch, uvloop):
    # The fake runs on uvloop where it is installed (less CPU beside the client it serves), else on asyncio's own
    # loop; FAKE_LLM_UVLOOP=0 chooses the latter.  Both serve the same answers, faults and stats.
    monkeypatch.setenv("FAKE_LLM_UVLOOP", uvloop)
    with FakeLLM(p_429=0.5, retry_after=0.0, seed=7) as fake:
        codes = [httpx.post(f"{fake.base_url}/chat/completions", timeout=10,
                            json={"model": "fake", "messages": [{"role": "user", "content": f"call {i}"}]}).status_code
                 for i in range(20)]
        stats = fake.stats()
    assert set(codes) == {200, 429} and stats["requests"] == 20
    assert stats["rate_limited"] == codes.count(429) and stats["ok"] == codes.count(200)
