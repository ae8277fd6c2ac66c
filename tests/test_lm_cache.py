"""The shared LM cache wired into the LM client: one request per distinct greedy call, across calls, runs and servers."""

from __future__ import annotations

import json
import urllib.request

import pydantic
import pytest
from dspy.utils.exceptions import LMError

from dspy_ray.client.cache import close_caches
from dspy_ray.client.lm import build_lm
from dspy_ray.client.usage import Usage, metered
from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from dspy_ray.testing.fake_llm import FakeLLM
from tests.batch_helpers import read_output, write_calls

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def _fresh_stores():
    yield
    close_caches()  # each test's folder is its own; no store outlives it


@pytest.fixture(scope="module")
def fake():
    with FakeLLM() as f:
        yield f


def lm_for(fake, tmp_path, **kw):
    kw.setdefault("cache", str(tmp_path / "lm"))
    return build_lm(EndpointSettings(base_url=fake.base_url, model="fake-model", **kw))


def sent(fake) -> int:
    return fake.stats()["requests"]


# -- the client -------------------------------------------------------------------------------


def test_the_same_call_twice_sends_one_request_and_counts_a_cached_answer(fake, tmp_path):
    lm = lm_for(fake, tmp_path)
    before = sent(fake)
    with metered() as first:
        live = lm(messages=HELLO)
    with metered() as second:
        again = lm(messages=HELLO)
    assert again == live and sent(fake) == before + 1
    assert first.calls == 1 and first.cached == 0 and first.tokens > 0
    assert second == Usage(cached=1)  # no call, no tokens, no cost: a budget counts only what was paid
    # Another LM object (another actor, a later job) on the same store is answered from it too.
    assert lm_for(fake, tmp_path)(messages=HELLO) == live and sent(fake) == before + 1


def test_a_different_message_schema_or_sample_is_sent_again(fake, tmp_path):
    class Short(pydantic.BaseModel):
        answer: str

    class Long(pydantic.BaseModel):
        answer: str
        reason: str

    lm = lm_for(fake, tmp_path)
    lm(messages=HELLO)
    before = sent(fake)
    lm(messages=[{"role": "user", "content": "hello again"}])
    assert sent(fake) == before + 1
    lm(messages=HELLO, response_format=Short)
    lm(messages=HELLO, response_format=Long)
    assert sent(fake) == before + 3
    lm(messages=HELLO, response_format=Long)
    assert sent(fake) == before + 3
    # A sampled call asks for a new sample every time, unless it names its sample (DSPy's rollout_id).
    lm(messages=HELLO, temperature=0.7)
    lm(messages=HELLO, temperature=0.7)
    assert sent(fake) == before + 5
    lm(messages=HELLO, temperature=0.7, rollout_id=1)
    lm(messages=HELLO, temperature=0.7, rollout_id=1)
    assert sent(fake) == before + 6


@pytest.mark.parametrize("fault", [{"p_500": 1.0}, {"p_429": 1.0, "retry_after": 0.01}])
def test_an_error_is_never_cached(tmp_path, fault):
    with FakeLLM(**fault) as bad:
        lm = lm_for(bad, tmp_path, max_attempts=2)
        with pytest.raises(LMError):
            lm(messages=HELLO)
        assert lm.cache_store.stats().puts == 0
        bad.configure(p_500=0.0, p_429=0.0)
        before = sent(bad)
        answer = lm(messages=HELLO)
        assert sent(bad) == before + 1  # the failure left nothing behind: asked again
        assert lm(messages=HELLO) == answer and sent(bad) == before + 1


def test_cache_off_sends_every_call_and_opens_no_store(fake, tmp_path):
    lm = lm_for(fake, tmp_path, cache="off")
    before = sent(fake)
    with metered() as usage:
        lm(messages=HELLO)
        lm(messages=HELLO)
    assert sent(fake) == before + 2 and usage.calls == 2 and usage.cached == 0
    assert lm.cache_store is None and not (tmp_path / "lm").exists()


def test_the_store_is_not_pickled_and_reopens_in_the_copy(fake, tmp_path):
    import pickle

    lm = lm_for(fake, tmp_path)
    lm(messages=HELLO)
    assert "_cache_store" not in lm.__getstate__()
    copy = pickle.loads(pickle.dumps(lm))
    before = sent(fake)
    copy(messages=HELLO)
    assert sent(fake) == before and copy.cache_store is lm.cache_store  # one store per setting per process


# -- settings and flags -----------------------------------------------------------------------


def test_setting_comes_from_the_role_environment_and_hides_credentials():
    env = {"LM_CACHE": "s3://AKIAX:s3cret@bucket/lm?token=t", "JUDGE_CACHE": "off"}
    lm = resolve_settings("LM", env=env, dotenv_path=None)
    assert lm.cache == env["LM_CACHE"] and resolve_settings("JUDGE", env=env, dotenv_path=None).cache == "off"
    assert resolve_settings("LM", env={}, dotenv_path=None).cache == ""  # the local default folder
    for shown in (repr(lm), str(lm), json.dumps(lm.redacted())):
        assert "s3cret" not in shown and "AKIAX" not in shown and "bucket/lm" in shown
    assert lm.with_key()["cache"] == env["LM_CACHE"]  # an actor gets the real location


def test_no_cache_flags_switch_the_lm_and_judge_off():
    from optimize.__main__ import build_parser as optimize_parser
    from pipelines.cli import build_parser as batch_parser, lm_settings_from_args
    from serve.__main__ import build_parser as serve_parser
    from tasks import get_task

    triage = get_task("triage")
    batch = batch_parser(triage, "test")
    assert lm_settings_from_args(batch.parse_args(["--input", "x", "--output", "y", "--no-cache"])).cache == "off"
    assert batch.parse_args(["--input", "x", "--output", "y"]).cache is True
    opt = optimize_parser(triage)
    assert opt.parse_args(["--task", "triage", "--no-cache"]).cache is False
    assert opt.parse_args(["--task", "triage"]).cache is True
    srv = serve_parser(triage)
    assert srv.parse_args(["--task", "triage"]).cache is False  # serving caches only when asked
    assert srv.parse_args(["--task", "triage", "--cache"]).cache is True


# -- batch: a re-run pays nothing ------------------------------------------------------------


def test_batch_rerun_is_answered_from_the_cache(ray_local, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    src = write_calls(tmp_path / "calls.jsonl", 40)
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "lm"))
    with FakeLLM() as fake:
        def run(out: str) -> tuple[int, str]:
            fake.reset_stats()
            code = main(argv=["--task", "triage", "--input", str(src), "--output", str(tmp_path / out),
                              "--lm-base-url", fake.base_url, "--lm-model", "fake-model", "--num-actors", "1"])
            assert code == 0
            return fake.stats()["requests"], capsys.readouterr().out

        first, first_summary = run("first")
        second, second_summary = run("second")
    assert first >= 80 and second <= first // 100, (first, second)
    assert "answered from the cache" not in first_summary
    assert "answered from the cache" in second_summary, second_summary
    columns = ["id", "priority", "category", "summary", "location", "subject_description", "errors"]
    rows = [sorted(read_output(tmp_path / out).select(columns).to_pylist(), key=lambda r: r["id"])
            for out in ("first", "second")]
    assert rows[0] == rows[1] and len(rows[0]) == 40
    usage = read_output(tmp_path / "second").column("lm_usage").to_pylist()
    assert all(u["triage"]["cached"] >= 1 and u["triage"]["calls"] == 0 for u in usage)


# -- serve: opt-in, and X-Cache says hit --------------------------------------------------------


def _post(url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, json.loads(resp.read()), dict(resp.headers)


@pytest.mark.slow
def test_serve_with_cache_answers_a_repeated_request_from_it(ray_local, free_port, tmp_path):
    from ray import serve

    from serve.app import ServeOptions, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        with FakeLLM() as fake:
            settings = EndpointSettings(base_url=fake.base_url, model="fake-model", cache=str(tmp_path / "lm"))
            options = ServeOptions(program="triage", min_replicas=1, max_replicas=1, cache=True)
            serve.run(build_app(options, settings), name="triage-cached", route_prefix="/")
            url = f"http://127.0.0.1:{port}/triage/predict"
            status, first, headers = _post(url, {"transcript": "smoke in the kitchen"})
            assert status == 200 and headers.get("x-cache") == "miss"
            before = sent(fake)
            status, second, headers = _post(url, {"transcript": "smoke in the kitchen"})
            assert status == 200 and headers.get("x-cache") == "hit" and second == first
            assert sent(fake) == before
            status, out, headers = _post(f"http://127.0.0.1:{port}/triage/batch",
                                         {"items": [{"transcript": "smoke in the kitchen"}, {"transcript": "a dog"}]})
            assert status == 200 and headers.get("x-cache") == "miss"  # one item needed the endpoint
            serve.delete("triage-cached")
    finally:
        serve.shutdown()


def test_serving_caches_only_when_asked():
    from dspy_ray.client.cache.flags import cache_choice
    from serve.options import ServeOptions

    settings = EndpointSettings(base_url="http://127.0.0.1:1/v1", cache="/tmp/lm")
    assert ServeOptions(program="triage").cache is False
    assert cache_choice(settings, False).cache == "off" and cache_choice(settings, True) is settings
    assert cache_choice(None, False) is None
