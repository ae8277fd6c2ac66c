"""Tokens, calls and cost: the ``lm_usage`` column, the run summary, the price table, optimize's report and
estimate, and the budget stop (``--max-tokens`` / ``--max-cost``) followed by ``--resume``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspy_ray.client.chat_http import error_for
from dspy_ray.endpoints.settings import EndpointSettings, price_table, resolve_settings
from dspy_ray.client.usage import Budget, RunMeter, Usage, total_of
from pipelines.inputs import InputSpec
from pipelines.runner import run_pipeline
from tasks import get_task
from tests.batch_helpers import chat_scripts, read_output, scripted_http_server, write_calls
from dspy_ray.testing.fake_llm import FakeLLM

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = get_task("triage")
CALL = "Call {i}: a car is on fire on Elm St"


def test_usage_per_row_and_stage_and_the_run_summary(ray_local, tmp_path):
    src = write_calls(tmp_path / "calls.jsonl", 24, text=CALL)
    with FakeLLM(latency=0.01, p_429=0.15, retry_after=0.01, seed=2) as fake:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model", price_in=2.0, price_out=8.0)
        result = run_pipeline(InputSpec(str(src), text_column="transcript"), str(tmp_path / "out"),
                              TRIAGE.stages_for(overrides={"num_actors": 1}), settings)
        stats = fake.stats()
    table = read_output(tmp_path / "out")
    usage = table.column("lm_usage").to_pylist()
    assert set(usage[0]) == {"triage", "extract_details"}
    per_stage = {stage: Usage() for stage in usage[0]}
    for row in usage:
        for stage, data in row.items():
            assert data["calls"] >= 1 and data["prompt_tokens"] > 0 and data["completion_tokens"] > 0
            assert data["cost_usd"] == pytest.approx((2.0 * data["prompt_tokens"] + 8.0 * data["completion_tokens"]) / 1e6)
            per_stage[stage].add(Usage.from_dict(data))
    # Every request the endpoint saw is on some row: retries (the 429s) included.
    assert sum(u.calls for u in per_stage.values()) == stats["requests"]
    assert sum(u.retries for u in per_stage.values()) == stats["rate_limited"] > 0
    # The run summary says the same, per stage and in total.
    for stage, u in per_stage.items():
        assert result.usage[stage]["calls"] == u.calls
        assert result.usage[stage]["prompt_tokens"] == u.prompt_tokens
        assert result.usage[stage]["cost_usd"] == pytest.approx(u.cost_usd)
    text = result.summary()
    assert "LM usage this run:" in text and "triage:" in text and "extract_details:" in text
    assert "retries" in text and "$" in text and "calls/row" in text


def test_price_table_from_the_environment_or_a_file(tmp_path):
    assert price_table(env={"MODEL_PRICES": '{"m": [0.15, 0.6], "n": {"in": 1, "out": 2}}'}, dotenv_path=None) == \
        {"m": (0.15, 0.6), "n": (1.0, 2.0)}
    table_file = tmp_path / "prices.json"
    table_file.write_text('{"fake-model": [3, 15]}')
    settings = resolve_settings("LM", flags={"model": "fake-model"}, env={"MODEL_PRICES": str(table_file)},
                                dotenv_path=None)
    assert (settings.price_in, settings.price_out) == (3.0, 15.0)
    # The role's own prices win over the table; a model not in it has none.
    own = resolve_settings("LM", flags={"model": "fake-model"}, dotenv_path=None,
                           env={"MODEL_PRICES": str(table_file), "LM_PRICE_IN": "1", "LM_PRICE_OUT": "2"})
    assert (own.price_in, own.price_out) == (1.0, 2.0)
    other = resolve_settings("LM", flags={"model": "other"}, env={"MODEL_PRICES": str(table_file)}, dotenv_path=None)
    assert other.price_in is None and other.price_out is None
    dotenv = tmp_path / ".env"
    dotenv.write_text("MODEL_PRICES={\"fake-model\": [0.5, 1.5]}\n")
    assert resolve_settings("LM", flags={"model": "fake-model"}, env={}, dotenv_path=dotenv).price_in == 0.5
    with pytest.raises(ValueError, match="MODEL_PRICES"):
        price_table(env={"MODEL_PRICES": '{"m": "cheap"}'}, dotenv_path=None)


def test_budget_arithmetic_and_meter():
    meter = RunMeter(max_tokens=1000)
    assert meter.add("a", Usage(calls=1, prompt_tokens=600, completion_tokens=100).as_dict(), rows=1) is None
    reason = meter.add("b", Usage(calls=1, prompt_tokens=250, completion_tokens=60).as_dict(), rows=1)
    assert reason and "--max-tokens 1,000" in reason
    assert meter.report()["total"]["calls"] == 2
    assert Budget(max_cost=0.01).reached(Usage(cost_usd=0.02)).startswith("$0.0200 >= --max-cost")
    assert Budget().reached(Usage(prompt_tokens=10**9)) is None


def test_cached_answers_are_counted_apart_and_cost_nothing():
    """An answer from the LM cache adds cached=1 and no calls, tokens or cost: a budget counts only what was paid."""
    from pipelines.runner import RunResult

    paid = Usage(calls=2, prompt_tokens=300, completion_tokens=40, cost_usd=0.01)
    total = total_of([paid, Usage(cached=1), Usage(cached=1).as_dict()])
    assert (total.calls, total.cached, total.tokens, total.cost_usd) == (2, 2, 340, 0.01)
    assert Usage.from_dict(total.as_dict()) == total
    assert Usage.from_dict({"calls": 1, "cost_usd": None}).cached == 0  # a row written before the field existed
    assert total.describe().startswith("2 calls sent (0 retries), 2 answered from the cache, 300 prompt")
    meter = RunMeter(max_tokens=100)
    assert meter.add("a", Usage(cached=500).as_dict(), rows=500) is None  # free answers never spend the budget
    result = RunResult("out", 3, 3, 0, 1.0, usage={"triage": {**Usage(calls=1, cached=2).as_dict(), "rows": 3}})
    assert "1 calls sent (0 retries), 2 answered from the cache" in result.summary()


def test_http_errors_map_to_dspy_errors_as_lm15_does():
    from dspy.utils.exceptions import (
        ContextWindowExceededError,
        LMAuthError,
        LMBillingError,
        LMRateLimitError,
        LMServerError,
        LMUnsupportedModelError,
    )

    assert isinstance(error_for(429, "{}", retry_after=1.5, model="m"), LMRateLimitError)
    quota = '{"error": {"message": "no credit", "code": "insufficient_quota"}}'
    assert isinstance(error_for(429, quota, retry_after=None, model="m"), LMBillingError)
    assert isinstance(error_for(401, '{"error": {"message": "bad key"}}', retry_after=None, model="m"), LMAuthError)
    missing = '{"error": {"message": "The model `x` does not exist", "code": "model_not_found"}}'
    assert isinstance(error_for(404, missing, retry_after=None, model="m"), LMUnsupportedModelError)
    long = '{"error": {"message": "too long", "code": "context_length_exceeded"}}'
    assert isinstance(error_for(400, long, retry_after=None, model="m"), ContextWindowExceededError)
    assert isinstance(error_for(502, "<html>bad gateway</html>", retry_after=None, model="m"), LMServerError)


def _cli(args: list[str], ray_local, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
                   "PYTHONPATH": str(ROOT), **env}
    environment.pop("LM_BASE_URL", None)
    return subprocess.run([sys.executable, "-m", "pipelines.triage", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_budget_stop_writes_finished_rows_exits_3_and_resume_finishes_the_rest(ray_local, tmp_path):
    n = 240
    src = write_calls(tmp_path / "calls.jsonl", n, text=CALL)
    out = tmp_path / "out"
    with FakeLLM(latency=0.05) as fake:
        # At most 16 rows in flight: the budget is passed by what was in flight when it was reached (docs/batch.md),
        # so this bounds the overshoot; with no cap, a fast endpoint can start every row first.
        base = ["--input", str(src), "--output", str(out), "--lm-base-url", fake.base_url, "--lm-model", "fake-model",
                "--num-actors", "1", "--concurrency", "16"]
        # --max-cost needs a price: refused before any LM call.
        refused = _cli([*base, "--max-cost", "0.01"], ray_local)
        assert refused.returncode == 2 and "LM_PRICE_IN" in refused.stderr
        assert fake.stats()["requests"] == 0

        first = _cli([*base, "--max-tokens", "30000"], ray_local)
        assert first.returncode == 3, first.stdout + first.stderr[-3000:]
        assert "stopped: budget reached" in first.stdout and "--resume" in first.stdout
        written = read_output(out).column("id").to_pylist()
        assert 0 < len(written) < n and len(set(written)) == len(written)
        assert f"{n - len(written)} rows left" in first.stdout
        sent_first = set(fake.stats()["inputs"])

        fake.reset_stats()
        second = _cli([*base, "--resume"], ray_local)
        assert second.returncode == 0, second.stdout + second.stderr[-3000:]
        assert f"({len(written)} already done, skipped)" in second.stdout
        stats = fake.stats()
    ids = read_output(out).column("id").to_pylist()
    assert len(ids) == n and set(ids) == {f"call-{i:05d}" for i in range(n)}  # nothing lost, nothing twice
    # The resumed run sent only the rows the first left out: two stages, one prompt each.
    assert len(stats["inputs"]) == 2 * (n - len(written))
    assert not set(stats["inputs"]) & sent_first  # no row of the first run is sent again
    assert len(sent_first) == 2 * len(written)  # and every row the first run started, it wrote


def test_optimize_estimate_shows_cost(tmp_path, capsys, monkeypatch):
    from optimize.__main__ import main

    monkeypatch.setenv("LM_PRICE_IN", "0.15")
    monkeypatch.setenv("LM_PRICE_OUT", "0.60")
    with FakeLLM() as fake:
        rc = main(["--pipeline", "triage", "--lm-base-url", fake.base_url, "--lm-model", "fake-model",
                   "--out", str(tmp_path), "--auto", "light", "--max-calls", "100"])
        assert fake.stats()["requests"] == 0
    err = capsys.readouterr().err
    assert rc == 3 and "cost: about $" in err and "at most $" in err
    assert "exceed --max-calls 100" in err and "cost: about $" in err.split("exceed --max-calls")[0].splitlines()[-1]


def test_optimize_reports_usage_and_cost(ray_local, tmp_path, capsys):
    from optimize.config import OptimizeConfig, SearchSettings
    from optimize.run import print_report, run_optimization
    from tests.gold import triage_gold

    with FakeLLM(gold=triage_gold(["data/triage_train.jsonl", "data/triage_dev.jsonl"]), latency=0.005) as fake:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model", max_in_flight=32,
                                    price_in=1.0, price_out=4.0)
        cfg = OptimizeConfig(pipeline="triage", optimizer="bootstrap", workers=2, threads_per_worker=4,
                             out=str(tmp_path / "artifacts"), train_limit=20, dev_limit=10,
                             search=SearchSettings(max_bootstrapped_demos=2, max_labeled_demos=2, val_size=10))
        result = run_optimization(cfg, settings)
        stats = fake.stats()
    print_report(result)
    shown = capsys.readouterr()
    total = total_of(result.usage.values())
    assert total.calls == stats["requests"] > 0
    assert total.cost_usd == pytest.approx((1.0 * total.prompt_tokens + 4.0 * total.completion_tokens) / 1e6)
    assert "LM usage this run:" in shown.out and "$" in shown.out
    assert "cost: about $" in shown.err  # the estimate, priced


@pytest.mark.slow
def test_lean_client_reads_lengths_chunks_and_reconnects():
    """The lean HTTP client against a scripted server: Content-Length, chunked with a trailer, a 429 that
    closes the connection (a new one follows), and a kept-alive connection the server dropped."""
    from dspy.utils.exceptions import LMRateLimitError

    from dspy_ray.client.chat_http import ChatHTTP

    scripts = chat_scripts()
    port, seen = scripted_http_server(scripts)
    client = ChatHTTP(f"http://127.0.0.1:{port}/v1", api_key="k", timeout_s=5.0, model="m")
    assert client.complete(b'{"n": 1}')["choices"][0]["message"]["content"] == "hi"
    assert client.complete(b'{"n": 2}')["choices"][0]["message"]["content"] == "hi"
    with pytest.raises(LMRateLimitError) as error:
        client.complete(b'{"n": 3}')
    assert error.value.retry_after == 2.0
    assert client.complete(b'{"n": 4}')["choices"][0]["message"]["content"] == "hi"  # new connection, after a 100
    assert client.complete(b'{"n": 5}')["choices"][0]["message"]["content"] == "hi"  # dropped, sent again once
    assert [r["n"] for r in seen] == [1, 2, 3, 4, 5, 5]
