"""The async program path: a program with ``aforward`` runs on the event loop (no thread per row), with the
same retries, limit, Refine, errors, cache and usage as the thread path; any other program keeps its thread."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import dspy
import pyarrow as pa
import pytest
from dspy.utils.exceptions import LMRateLimitError

from dspy_ray.client.cache import close_caches
from dspy_ray.client.chat_http import ChatHTTP
from dspy_ray.client.lm import build_lm
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.execution.runner import ProgramRunner, runs_async
from dspy_ray.testing.fake_llm import FakeLLM
from programs.triage import CallTriager, TriageCall
from stages.base import DSPyStageUDF
from tasks import get_task
from tests.batch_helpers import HI, chat_scripts, scripted_http_server

OUTPUTS = ("priority", "category", "summary")


class ForwardOnly(dspy.Module):
    """A user's module with only ``forward``: no async path."""

    def __init__(self):
        super().__init__()
        self.triage = dspy.Predict(TriageCall)

    def forward(self, transcript: str) -> dspy.Prediction:
        return self.triage(transcript=transcript)


class SyncInside(dspy.Module):
    """Async on the outside, a forward-only module inside: ``acall`` on it fails in DSPy 3.4."""

    def __init__(self):
        super().__init__()
        self.inner = ForwardOnly()

    def forward(self, transcript: str) -> dspy.Prediction:
        return self.inner(transcript=transcript)

    async def aforward(self, transcript: str) -> dspy.Prediction:
        return await self.inner.acall(transcript=transcript)


@pytest.fixture(scope="module")
def fake():
    with FakeLLM() as f:
        yield f


@pytest.fixture
def clean(fake):
    fake.configure(latency=0.0, p_429=0.0, p_500=0.0, p_malformed=0.0, retry_after=0.0)
    fake.reset_stats()
    yield fake
    close_caches()


def make_udf(fake: FakeLLM, program: type[dspy.Module] = CallTriager, **stage_kwargs) -> DSPyStageUDF:
    settings = EndpointSettings(base_url=fake.base_url, model="fake-model",
                                max_attempts=stage_kwargs.pop("max_attempts", 6),
                                cache=stage_kwargs.pop("cache", "off"))
    stage = get_task("triage").stages[0]
    spec = dataclasses.replace(stage.program, cls=program)
    return DSPyStageUDF(**stage.model_copy(update={"program": spec, **stage_kwargs}).udf_kwargs(settings))


def run(udf: DSPyStageUDF, table: pa.Table) -> pa.Table:
    async def drive():
        return [out async for out in udf(table)]

    return pa.concat_tables(asyncio.run(drive()))


def calls(n: int, tag: str = "c") -> pa.Table:
    return pa.table({"id": [f"{tag}{i}" for i in range(n)],
                     "transcript": [f"call {tag} {i}: smoke in the hallway" for i in range(n)]})


def test_which_programs_run_async():
    assert runs_async(CallTriager()) and runs_async(dspy.Predict(TriageCall))  # the shipped one defines aforward
    assert not runs_async(ForwardOnly())  # forward only: Module.acall would fail, so a worker thread runs it
    assert not runs_async(dspy.Refine(module=dspy.Predict(TriageCall), N=2, reward_fn=lambda a, p: 1.0,
                                      threshold=1.0))  # no aforward in DSPy 3.4


def test_async_rows_run_on_the_loop_with_no_thread_per_row():
    with FakeLLM(latency=0.3) as fake:
        udf = make_udf(fake, max_in_flight_per_actor=48)
        udf.lm.limiter  # noqa: B018 - made before counting: the limiter's ticker thread is the process's, not a row's
        before = threading.active_count()
        most = [before]

        async def drive():
            async def watch():
                while True:
                    most.append(threading.active_count())
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(watch())
            try:
                return [out async for out in udf(calls(144))]  # enough for the limit's ramp from 32 to reach 40
            finally:
                watcher.cancel()

        out = pa.concat_tables(asyncio.run(drive()))
        stats = fake.stats()
    assert out.column("errors").to_pylist() == [[]] * 144
    assert set(out.column("priority").to_pylist()) <= {"urgent", "non_urgent", "not_an_emergency"}
    assert stats["max_in_flight"] >= 40, stats  # many rows in flight at once ...
    assert max(most) <= before + 2, (before, max(most))  # ... and no thread for each


def test_async_rows_meter_usage(clean):
    out = run(make_udf(clean), calls(4))
    usage = [u["triage"] for u in out.column("lm_usage").to_pylist()]
    assert all(u["calls"] == 1 and u["prompt_tokens"] > 0 and u["completion_tokens"] > 0 for u in usage), usage


def test_async_retries_honour_rate_limits_and_server_errors(clean):
    clean.configure(p_429=0.3, retry_after=0.05, p_500=0.2, seed=3)
    out = run(make_udf(clean, max_attempts=12), calls(40))
    stats = clean.stats()
    assert stats["rate_limited"] > 0 and stats["server_error"] > 0
    assert out.column("errors").to_pylist() == [[]] * 40
    assert sum(u["triage"]["retries"] for u in out.column("lm_usage").to_pylist()) > 0


def test_async_exhausted_retries_become_row_errors(clean):
    clean.configure(p_500=1.0)
    out = run(make_udf(clean, max_attempts=2), calls(5))
    assert out.num_rows == 5
    for errors in out.column("errors").to_pylist():
        assert len(errors) == 1 and errors[0].startswith("triage: LM call failed after retries"), errors
    assert clean.stats()["server_error"] == 10  # 5 rows x 2 attempts
    assert out.column("priority").to_pylist() == [None] * 5


def test_async_malformed_output_goes_to_refine(clean):
    clean.configure(p_malformed=1.0)
    udf = make_udf(clean, refine_attempts=3)
    bad = run(udf, calls(6, "bad"))
    for errors in bad.column("errors").to_pylist():
        assert len(errors) == 1 and "after 3 attempts" in errors[0], errors
    assert clean.stats()["malformed"] == 18  # the first attempt on the loop, two more through dspy.Refine
    clean.configure(p_malformed=0.3, seed=7)
    out = run(make_udf(clean, refine_attempts=4), calls(40))
    assert len([e for e in out.column("errors").to_pylist() if e]) <= 2  # P(4 malformed in a row) is under 1%


def test_async_answers_come_from_the_lm_cache(clean, tmp_path):
    udf = make_udf(clean, cache=str(tmp_path / "lm"))
    first = run(udf, calls(5))
    sent = clean.stats()["requests"]
    again = run(udf, calls(5))
    assert clean.stats()["requests"] == sent == 5
    assert again.column("summary").to_pylist() == first.column("summary").to_pylist()
    assert [u["triage"]["cached"] for u in again.column("lm_usage").to_pylist()] == [1] * 5


def test_a_forward_only_module_inside_falls_back_to_a_thread(clean):
    runner = ProgramRunner(SyncInside(), build_lm(EndpointSettings(base_url=clean.base_url, model="m")),
                           output_fields=OUTPUTS)

    async def go():
        return await asyncio.gather(*(runner.predict({"transcript": f"t{i}"}) for i in range(4)))

    outcomes = asyncio.run(go())
    assert all(o.prediction is not None and not o.errors for o in outcomes), outcomes
    assert not runs_async(runner.program)  # found out once: its later rows go straight to a thread


def test_async_client_reads_answers_as_the_sync_one_does():
    """The event loop's HTTP client against a scripted server: Content-Length, chunked with a trailer, a 429
    that closes the connection, a 100 Continue, and a kept-alive connection the server dropped."""
    # The last connection's answer has no length: its body runs to the close.
    scripts = chat_scripts(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + HI)
    port, seen = scripted_http_server(scripts)
    client = ChatHTTP(f"http://127.0.0.1:{port}/v1", api_key="k", timeout_s=5.0, model="m")

    async def go():
        texts = [(await client.acomplete(b'{"n": %d}' % n))["choices"][0]["message"]["content"] for n in (1, 2)]
        with pytest.raises(LMRateLimitError) as error:
            await client.acomplete(b'{"n": 3}')
        assert error.value.retry_after == 2.0
        for n in (4, 5):  # a new connection, after a 100; then dropped, sent again once on a fresh one
            texts.append((await client.acomplete(b'{"n": %d}' % n))["choices"][0]["message"]["content"])
        return texts

    assert asyncio.run(go()) == ["hi"] * 4
    assert [r["n"] for r in seen] == [1, 2, 3, 4, 5, 5]
