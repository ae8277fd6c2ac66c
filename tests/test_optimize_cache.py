"""The shared LM cache in optimization: workers share answers (target and judge), a resumed run pays nothing twice.

The fake endpoint runs in few-shot mode (``tests.gold``), so every answer is deterministic and a
cached answer is exactly the one the endpoint would give again.  The test session runs with the
cache off (``tests/conftest.py``); each test here names its own store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dspy_ray.client.cache import LocalStore, close_caches
from dspy_ray.client.usage import total_of
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.execution.loading import load_program
from dspy_ray.testing.fake_llm import FakeLLM
from optimize.config import OptimizeConfig, SearchSettings
from tasks import get_task
from tests.gold import triage_gold

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = get_task("triage")


@pytest.fixture(scope="module")
def gold():
    return triage_gold(["data/triage_train.jsonl", "data/triage_dev.jsonl"])


@pytest.fixture(autouse=True)
def _fresh_stores():
    yield
    close_caches()


def _by_endpoint(usage: dict, model: str) -> dict:
    [data] = [u for endpoint, u in usage.items() if endpoint.endswith(f"|{model}")]
    return data


def test_two_optimize_workers_share_one_store_for_the_target_and_the_judge(ray_local, gold, tmp_path):
    import ray

    from optimize.evaluation import EvalContext
    from optimize.workers import WorkerPool
    from tasks.examples import load_task_data

    _, dev = load_task_data(TRIAGE.data, dev_limit=6)
    state = load_program(TRIAGE.program).program.dump_state()
    with FakeLLM(gold=gold) as target, FakeLLM(field_overrides={"verdict": "partial"}) as judge:
        ctx = EvalContext(
            task=TRIAGE, threads=3, num_cpus=0.01,
            lm=EndpointSettings(base_url=target.base_url, model="fake-model", cache=str(tmp_path / "lm")),
            judge=EndpointSettings(base_url=judge.base_url, model="judge", cache=str(tmp_path / "judge")))
        with WorkerPool(ctx, 2) as pool:
            first, second = pool.actors
            scores = ray.get(first.evaluate_state.remote(state, dev))
            sent = (target.stats()["requests"], judge.stats()["requests"])
            assert sent == (6, 6)
            ray.get(first.close_caches.remote())  # its answers are written off the calls' path: let them land
            again = ray.get(second.evaluate_state.remote(state, dev))  # another process, the same stores
            assert (target.stats()["requests"], judge.stats()["requests"]) == sent  # nothing sent
            usage, stats = ray.get([second.usage.remote(), second.cache_stats.remote()])
    assert [s.model_dump() for s in again] == [s.model_dump() for s in scores]
    assert all(s.judged == {"summary": 0.5} for s in again)  # the judge's cached verdicts were used
    for model in ("fake-model", "judge"):
        assert _by_endpoint(usage, model)["calls"] == 0 and _by_endpoint(usage, model)["cached"] == 6
    assert stats["lm"]["hits"] == 6 and stats["judge"]["hits"] == 6 and stats["lm"]["puts"] == 0
    assert _entries(tmp_path / "lm") == 6 and _entries(tmp_path / "judge") == 6


def test_a_relative_cache_folder_is_pinned_before_it_travels_to_workers(tmp_path, monkeypatch):
    from optimize.run import _pinned_cache

    monkeypatch.chdir(tmp_path)
    settings = EndpointSettings(base_url="http://127.0.0.1:1/v1", cache="lm-cache")
    assert _pinned_cache(settings).cache == str(tmp_path / "lm-cache")  # a worker's cwd need not be ours
    for kept in ("", "off", "s3://bucket/lm", "file:///shared/lm", str(tmp_path / "abs")):
        assert _pinned_cache(settings.model_copy(update={"cache": kept})).cache == kept
    assert _pinned_cache(None) is None


@pytest.mark.slow
def test_a_resumed_run_with_the_cache_pays_nothing_twice(ray_local, gold, tmp_path):
    """Kill the driver midway; the resumed run skips finished trials and sends only calls never answered before.

    The calls of the trials that were running at the kill were answered and stored one by one:
    the resumed run gets them back from the cache.  So every request it sends is a new entry in
    the store (one worker: no two of its calls ask the same thing at once).
    """
    import ray

    from optimize.run import run_optimization

    cache = tmp_path / "lm"
    run_dir = tmp_path / "run"
    flags = ["--train-limit", "100", "--dev-limit", "30", "--val-size", "40", "--num-trials", "12",
             "--minibatch-size", "20", "--threads-per-worker", "4"]
    with FakeLLM(gold=gold, latency=0.15) as fake:
        argv = [sys.executable, "-m", "optimize", "--task", "triage", "--lm-base-url", fake.base_url,
                "--lm-model", "fake-model", "--out", str(tmp_path / "artifacts"), "--run-dir", str(run_dir),
                "--workers", "2", *flags]
        env = {**os.environ, "LM_CACHE": str(cache), "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        _run_until_trials(argv, env, run_dir, 3)
        before = {json.loads(p.read_text())["number"] for p in (run_dir / "trials").glob("*.json")}
        assert 3 <= len(before) < 12
        fake.wait_until_quiet()  # Ray ends the dead driver's workers; their last calls may still land
        paid = _entries(cache)  # every answer the killed run got and stored
        assert paid > 0
        fake.reset_stats()
        cfg = OptimizeConfig(task="triage", workers=1, threads_per_worker=4, out=str(tmp_path / "artifacts"),
                             run_dir=str(run_dir), resume=True, train_limit=100, dev_limit=30,
                             search=SearchSettings(num_trials=12, minibatch_size=20, val_size=40))
        result = run_optimization(cfg, EndpointSettings(base_url=fake.base_url, model="fake-model", cache=str(cache)))
        sent = fake.stats()["requests"]

    assert not before & set(result.trials_evaluated_this_run), "finished trials evaluated again"
    new_entries = _entries(cache) - paid
    assert sent == new_entries, f"{sent} requests sent for {new_entries} new answers: some were paid twice"
    usage = total_of(result.usage.values())
    print(f"killed after {len(before)} trials, {paid} answers stored; "
          f"resumed: {sent} sent, {usage.cached} from the cache")
    assert usage.calls == sent and usage.cached > 0  # the interrupted trials' calls came back from the cache
    after = [json.loads(p.read_text())["number"] for p in (run_dir / "trials").glob("*.json")]
    assert len(after) == len(set(after)) == 12
    assert result.optimized.score > result.baseline.score


def _run_until_trials(argv: list[str], env: dict[str, str], run_dir: Path, trials: int) -> None:
    """Run ``python -m optimize`` and SIGKILL it (a preempted node) once ``trials`` trials are saved."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while len(list((run_dir / "trials").glob("*.json"))) < trials:
            if proc.poll() is not None:
                pytest.fail(f"optimizer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "no trials finished in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _entries(folder: Path) -> int:
    """Answers stored in the local store at ``folder``."""
    store = LocalStore(folder)
    try:
        return len(store)
    finally:
        store.close()
