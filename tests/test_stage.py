"""The stage UDF driven directly (no Ray), against the fault-injecting fake endpoint over real HTTP."""

from __future__ import annotations

import asyncio
import time

import pyarrow as pa
import pytest

from dspy_ray.client.lm import backoff_seconds, build_lm
from dspy_ray.execution.runner import ProgramRunner
from dspy_ray.endpoints.settings import EndpointSettings
from stages.base import DSPyStageUDF, StageInputError
from tasks import get_task
from dspy_ray.testing.fake_llm import FakeLLM

PRIORITIES = {"urgent", "non_urgent", "not_an_emergency"}
CATEGORIES = {"crime", "medical", "fire", "animal", "noise", "other"}


def make_udf(fake: FakeLLM, **stage_kwargs) -> DSPyStageUDF:
    settings = EndpointSettings(base_url=fake.base_url, model="fake-model",
                                timeout_s=stage_kwargs.pop("timeout_s", 10.0),
                                max_attempts=stage_kwargs.pop("max_attempts", 6))
    stage = get_task("triage").stages[0].model_copy(update=stage_kwargs)
    return DSPyStageUDF(**stage.udf_kwargs(settings))


def run(udf: DSPyStageUDF, table: pa.Table) -> pa.Table:
    async def drive():
        return [out async for out in udf(table)]

    outs = asyncio.run(drive())
    return pa.concat_tables(outs)


def calls(n: int, tag: str = "c") -> pa.Table:
    return pa.table({"id": [f"{tag}{i}" for i in range(n)],
                     "transcript": [f"call {tag} {i}: smoke in the hallway" for i in range(n)]})


def test_valid_outputs_and_columns(fake_llm):
    out = run(make_udf(fake_llm), calls(20))
    assert out.num_rows == 20
    assert out.column("id").to_pylist() == [f"c{i}" for i in range(20)]
    assert set(out.column("priority").to_pylist()) <= PRIORITIES
    assert set(out.column("category").to_pylist()) <= CATEGORIES
    assert all(out.column("summary").to_pylist())
    assert out.column("errors").to_pylist() == [[]] * 20


def test_sends_json_schema_with_enums(fake_llm):
    """The request itself carries a JSON schema whose Literal fields became enums (what vLLM and
    llama.cpp constrain decoding with); the fake's own answers prove nothing here."""
    fake_llm.reset_stats()
    out = run(make_udf(fake_llm), calls(3))
    assert out.column("errors").to_pylist() == [[]] * 3
    fmt = fake_llm.stats()["response_format"]
    assert fmt is not None and fmt["type"] == "json_schema", fmt
    props = fmt["json_schema"]["schema"]["properties"]
    assert sorted(props["priority"]["enum"]) == ["non_urgent", "not_an_emergency", "urgent"]
    assert "other" in props["category"]["enum"] and len(props["category"]["enum"]) == 6


def test_many_requests_in_flight_per_actor():
    with FakeLLM(latency=0.3) as fake:
        udf = make_udf(fake, max_in_flight_per_actor=48)
        start = time.perf_counter()
        out = run(udf, calls(144))  # the limit starts at 32 and each rise is taken up over a latency
        elapsed = time.perf_counter() - start
        stats = fake.stats()
    assert out.num_rows == 144
    assert stats["max_in_flight"] >= 40, stats  # not one blocking call at a time
    assert stats["max_in_flight"] <= 48, stats  # the per-actor limit holds
    assert elapsed < 144 * 0.3 / 4  # far from sequential


def test_rate_limits_and_server_errors_are_retried():
    with FakeLLM(p_429=0.3, retry_after=0.05, p_500=0.2, seed=3) as fake:
        out = run(make_udf(fake, max_attempts=12), calls(40))
        stats = fake.stats()
    assert stats["rate_limited"] > 0 and stats["server_error"] > 0
    assert out.column("errors").to_pylist() == [[]] * 40


def test_exhausted_retries_become_row_errors():
    with FakeLLM(p_500=1.0) as fake:
        out = run(make_udf(fake, max_attempts=2), calls(5))
        stats = fake.stats()
    assert out.num_rows == 5
    for errors in out.column("errors").to_pylist():
        assert len(errors) == 1 and errors[0].startswith("triage: LM call failed after retries")
    assert stats["server_error"] == 10  # 5 rows x 2 attempts, bounded
    assert out.column("priority").to_pylist() == [None] * 5


def test_hung_request_times_out_and_is_retried():
    with FakeLLM(p_hang=0.5, seed=11) as fake:
        start = time.perf_counter()
        out = run(make_udf(fake, timeout_s=0.5, max_attempts=10), calls(4))
        stats = fake.stats()
    assert stats["hung"] > 0
    assert time.perf_counter() - start < 30  # a hang costs one timeout, not the whole block
    assert out.column("errors").to_pylist() == [[]] * 4


def test_malformed_output_is_refined_and_refine_state_does_not_leak():
    with FakeLLM(p_malformed=1.0) as fake:
        udf = make_udf(fake, refine_attempts=3)
        bad = run(udf, calls(6, "bad"))
        fake.configure(p_malformed=0.0)
        good = run(udf, calls(6, "good"))
    for errors in bad.column("errors").to_pylist():
        assert len(errors) == 1 and "after 3 attempts" in errors[0], errors
    # Same actor, same program: earlier failures did not use up later rows' attempts.
    assert good.column("errors").to_pylist() == [[]] * 6


def test_intermittent_malformed_output_recovers_through_refine():
    with FakeLLM(p_malformed=0.3, seed=7) as fake:
        out = run(make_udf(fake, refine_attempts=4), calls(40))
        stats = fake.stats()
    assert stats["malformed"] > 0
    failed = [e for e in out.column("errors").to_pylist() if e]
    assert len(failed) <= 2, failed  # P(4 malformed in a row) is under 1%


def test_empty_and_null_inputs_are_skipped_with_error(fake_llm):
    table = pa.table({"id": ["a", "b", "c"], "transcript": ["fire!", "", None],
                      "errors": [[], ["transcript is empty"], ["transcript is null"]]})
    out = run(make_udf(fake_llm), table)
    errors = out.column("errors").to_pylist()
    assert errors[0] == []
    assert errors[1][0] == "transcript is empty" and "skipped" in errors[1][1]
    assert errors[2][0] == "transcript is null" and "skipped" in errors[2][1]
    assert fake_llm.stats()["requests"] == 1


def test_missing_column_names_stage_and_columns(fake_llm):
    with pytest.raises(StageInputError, match=r"stage 'triage' needs column\(s\) \['transcript'\]"):
        run(make_udf(fake_llm), pa.table({"id": ["a"], "text": ["x"]}))


def test_backoff_honours_retry_after_and_grows():
    assert backoff_seconds(1, retry_after=3.0) >= 3.0
    waits = [max(backoff_seconds(attempt, None) for _ in range(200)) for attempt in (1, 3, 6)]
    assert waits[0] <= 0.5 < waits[1] <= 2.0 < waits[2] <= 30.0


def test_any_module_runs_concurrently_through_the_runner():
    import dspy

    from programs.triage import TriageCall

    class SyncOnly(dspy.Module):
        def __init__(self):
            super().__init__()
            self.triage = dspy.Predict(TriageCall)

        def forward(self, transcript):
            return self.triage(transcript=transcript)

    with FakeLLM(latency=0.3) as fake:
        runner = ProgramRunner(SyncOnly(), build_lm(EndpointSettings(base_url=fake.base_url, model="m")),
                               output_fields=("priority", "category", "summary"), max_in_flight=32)

        async def go():
            return await asyncio.gather(*(runner.predict({"transcript": f"t{i}"}) for i in range(32)))

        outcomes = asyncio.run(go())
        stats = fake.stats()
    assert all(o.prediction is not None and not o.errors for o in outcomes)
    assert stats["max_in_flight"] >= 16, stats
