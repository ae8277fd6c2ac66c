"""Ray Serve over real HTTP on a local Ray, against the fake endpoint."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dspy_ray.execution.loading import load_program
from dspy_ray.endpoints.settings import EndpointSettings
from serve.app import ServeOptions, build_app
from serve.drift import DriftMonitor, DriftPolicy, SampleStore, decide
from tasks import get_task
from dspy_ray.testing.fake_llm import FakeLLM

TRIAGE = get_task("triage")

pytestmark = pytest.mark.slow


def http(method: str, url: str, body=None, headers=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        return e.code, payload, dict(e.headers)


@pytest.fixture(scope="module")
def serve_http(ray_local, free_port):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def fake():
    with FakeLLM(latency=0.05) as f:
        yield f


def settings(fake, **kw) -> EndpointSettings:
    return EndpointSettings(base_url=fake.base_url, model=kw.pop("model", "fake-model"), **kw)


def deploy(fake, name="triage", token=None, lm=None, **overrides):
    from ray import serve

    options = ServeOptions(program="triage", min_replicas=1, max_replicas=1, **overrides)
    serve.run(build_app(options, lm or settings(fake), token=token), name=name, route_prefix="/")
    return options


def test_predict_batch_info_docs(serve_http, fake):
    deploy(fake)
    status, out, _ = http("POST", f"{serve_http}/triage/predict", {"transcript": "My garage is on fire"})
    assert status == 200
    assert out["priority"] in {"urgent", "non_urgent", "not_an_emergency"}
    assert out["category"] in {"crime", "medical", "fire", "animal", "noise", "other"}
    status, out, _ = http("POST", f"{serve_http}/triage/batch",
                          {"items": [{"transcript": "dog barking"}, {"transcript": "chest pain"}]})
    assert status == 200 and len(out["results"]) == 2 and all(r["output"] for r in out["results"])
    status, info, _ = http("GET", f"{serve_http}/triage/info")
    assert status == 200 and info["program"] == "triage" and info["model"] == "fake-model"
    status, spec, _ = http("GET", f"{serve_http}/openapi.json")
    schema = spec["components"]["schemas"]["TriageResponse"]["properties"]["priority"]
    assert "urgent" in json.dumps(schema)  # Literal -> enum in the public schema
    assert http("GET", f"{serve_http}/healthz")[0] == 200


def test_metrics_reach_rays_prometheus_export(serve_http, fake):
    """Requests, latency histogram and LM token counters appear on the node's Prometheus endpoint."""
    import ray

    deploy(fake)
    for i in range(3):
        assert http("POST", f"{serve_http}/triage/predict", {"transcript": f"metrics call {i}"})[0] == 200
    port = ray._private.worker._global_node.metrics_export_port
    wanted = {"ray_dspy_serve_requests_total", "ray_dspy_serve_request_latency_seconds_bucket",
              "ray_dspy_serve_lm_calls_total", "ray_dspy_serve_lm_tokens_total"}
    found: dict[str, float] = {}
    deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
    while set(found) != wanted:
        assert time.monotonic() < deadline, f"missing {sorted(wanted - set(found))}"
        time.sleep(2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {}  # one scrape's totals
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and 'program="triage"' in line:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    assert found["ray_dspy_serve_requests_total"] >= 3 and found["ray_dspy_serve_lm_calls_total"] >= 3
    assert found["ray_dspy_serve_lm_tokens_total"] > 0


def scrape(wanted: set[str], program: str = "triage", seconds: float = 90) -> dict[str, float]:
    """One scrape of the node's Prometheus endpoint holding every name in ``wanted``: name{tags} -> value."""
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    deadline = time.monotonic() + seconds  # Ray exports metrics every few seconds
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.split("{", 1)[0] in wanted and f'program="{program}"' in line}
        if {key.split("{", 1)[0] for key in found} == wanted:
            return found
        assert time.monotonic() < deadline, f"missing {sorted(wanted - {k.split('{', 1)[0] for k in found})}"
        time.sleep(2)


def test_cache_hits_are_counted_in_the_replicas_metrics(serve_http, fake, tmp_path):
    deploy(fake, lm=settings(fake, cache=str(tmp_path / "lm")), cache=True)
    body = {"transcript": "cache metrics: smoke in the kitchen"}
    heads = [http("POST", f"{serve_http}/triage/predict", body)[2].get("x-cache") for _ in range(2)]
    assert heads == ["miss", "hit"]
    status, info, _ = http("GET", f"{serve_http}/triage/info")
    assert status == 200 and info["cache"]["hit"] == 1 and info["cache"]["miss"] == 1, info
    assert info["cache"]["lm_cached"] >= 1  # the hit's LM call(s), none sent
    found = scrape({"ray_dspy_serve_cache_responses_total", "ray_dspy_serve_lm_cached_total"})
    hits = sum(v for k, v in found.items() if k.startswith("ray_dspy_serve_cache_responses_total")
               and 'result="hit"' in k)
    assert hits >= 1 and sum(v for k, v in found.items() if k.startswith("ray_dspy_serve_lm_cached_total")) >= 1


def test_bad_body_is_422_naming_the_field(serve_http, fake):
    deploy(fake)
    status, out, _ = http("POST", f"{serve_http}/triage/predict", {"transcrpt": "typo"})
    assert status == 422
    locs = [tuple(d["loc"]) for d in out["detail"]]
    assert ("body", "transcript") in locs and ("body", "transcrpt") in locs
    status, out, _ = http("POST", f"{serve_http}/triage/batch", {"items": []})
    assert status == 422 and out["detail"][0]["loc"] == ["body", "items"]


def test_lm_failure_is_502_with_short_reason(serve_http):
    with FakeLLM(p_500=1.0) as broken:
        deploy(broken, lm=settings(broken, model="m", max_attempts=2))
        status, out, _ = http("POST", f"{serve_http}/triage/predict", {"transcript": "help"})
    assert status == 502
    assert out["detail"].startswith("LM call failed after retries") and "Traceback" not in out["detail"]


def test_overload_gives_503_with_retry_after(serve_http):
    with FakeLLM(latency=2.0) as slow:
        deploy(slow, max_ongoing_requests=2, max_queued_requests=2, retry_after_s=3)
        results: list[tuple[int, dict]] = []

        def call(i):
            status, _, headers = http("POST", f"{serve_http}/triage/predict", {"transcript": f"call {i}"}, timeout=60)
            results.append((status, headers))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]  # bounded load
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
    statuses = [s for s, _ in results]
    assert len(results) == 12
    assert statuses.count(200) >= 2 and 503 in statuses, statuses
    assert all(h.get("retry-after") == "3" or h.get("Retry-After") == "3" for s, h in results if s == 503)


def test_artifact_switch_keeps_serving(serve_http, fake, tmp_path):
    from ray import serve

    program = load_program(TRIAGE.program).program
    program.triage.signature = program.triage.signature.with_instructions("Version two of the triage prompt.")
    artifact = tmp_path / "triage_v2.json"
    program.save(str(artifact))
    options = deploy(fake)
    stop, failures, served = threading.Event(), [], []

    def traffic():
        while not stop.is_set():
            status, _, _ = http("POST", f"{serve_http}/triage/predict", {"transcript": "smoke"})
            (served if status == 200 else failures).append(status)

    worker = threading.Thread(target=traffic)
    worker.start()
    time.sleep(1)
    serve.run(build_app(options.model_copy(update={"artifact": str(artifact)}), settings(fake)), name="triage",
              route_prefix="/")
    time.sleep(1)
    stop.set()
    worker.join(timeout=30)
    status, info, _ = http("GET", f"{serve_http}/triage/info")
    assert info["artifact"] == str(artifact)
    assert served and not failures, failures


def test_bearer_token(serve_http, fake):
    deploy(fake, token="s3cret-token")
    assert http("POST", f"{serve_http}/triage/predict", {"transcript": "x"})[0] == 401
    bad = http("POST", f"{serve_http}/triage/predict", {"transcript": "x"}, {"Authorization": "Bearer nope"})
    assert bad[0] == 401 and "s3cret" not in json.dumps(bad[1])
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive
        ok = http("POST", f"{serve_http}/triage/predict", {"transcript": "x"},
                  {"Authorization": f"{scheme} s3cret-token"})
        assert ok[0] == 200, scheme
    assert http("GET", f"{serve_http}/healthz")[0] == 200  # liveness stays open for load balancers
    # The OpenAPI document declares the scheme and the error answers.
    status, spec, _ = http("GET", f"{serve_http}/openapi.json")
    assert status == 200
    assert any(s.get("scheme", "").lower() == "bearer" for s in spec["components"]["securitySchemes"].values())
    responses = spec["paths"]["/triage/predict"]["post"]["responses"]
    assert {"401", "413", "422", "502", "503"} <= set(responses)


def test_batch_runs_valid_items_and_names_the_field_of_invalid_ones(serve_http, fake):
    deploy(fake)
    items = [{"transcript": "smoke in the hall"}, {"transcrpt": "typo"}, {"transcript": ""},
             {"transcript": "dog barking all night"}, "not an object"]
    status, out, _ = http("POST", f"{serve_http}/triage/batch", {"items": items})
    assert status == 200, out
    results = out["results"]
    assert [r["output"] is not None for r in results] == [True, False, False, True, False]
    assert "items.1.transcript" in results[1]["error"] and "items.1.transcrpt" in results[1]["error"]
    assert "items.2.transcript" in results[2]["error"] and "items.4" in results[4]["error"]
    assert results[0]["error"] is None and results[0]["output"]["priority"]
    # The OpenAPI schema still describes the request body precisely.
    spec = http("GET", f"{serve_http}/openapi.json")[1]
    ref = spec["paths"]["/triage/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.rsplit("/", 1)[-1] in spec["components"]["schemas"]
    assert "TriageRequest" in spec["components"]["schemas"]


def test_errors_never_echo_the_input_and_big_bodies_get_413(serve_http, fake):
    deploy(fake)
    big = "A" * 1_000_000  # over the field's 200,000-character limit, under the 4 MiB body cap
    status, out, _ = http("POST", f"{serve_http}/triage/predict", {"transcript": big})
    raw = json.dumps(out)
    assert status == 422 and len(raw) <= 2048 and "AAAA" not in raw
    assert out["detail"][0]["loc"] == ["body", "transcript"] and out["detail"][0]["ctx"]["max_length"] == 200_000
    status, out, _ = http("POST", f"{serve_http}/triage/batch", {"items": [{"transcript": "x"}] * 500})
    assert status == 422 and len(json.dumps(out)) <= 2048 and "256" in json.dumps(out)
    from http.client import HTTPConnection

    host, port = serve_http.rsplit("//", 1)[1].split(":")
    # 20 MB announced: refused from Content-Length, before the body is read (only its first bytes are sent).
    conn = HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/triage/predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(20_000_000))
    conn.endheaders(b'{"transcript": "' + b"B" * 65536)
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 413 and b"larger than" in body and len(body) < 200
    conn.close()
    # Chunked upload with no Content-Length: cut off once it passes the cap.
    conn = HTTPConnection(host, int(port), timeout=60)

    def chunks():
        yield b'{"transcript": "'
        for _ in range(50):
            yield b"C" * 200_000
        yield b'"}'

    conn.request("POST", "/triage/predict", body=chunks(), headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413, resp.read()[:200]
    conn.close()


# -- drift ---------------------------------------------------------------------


def test_decision_rule():
    policy = DriftPolicy(min_samples=10, drop_points=5)
    assert decide(0.9, 5, 0.9, policy, False).kind == "wait"
    assert decide(0.88, 20, 0.9, policy, False).kind == "ok"
    assert decide(0.80, 20, 0.9, policy, False).kind == "trigger"
    assert decide(0.80, 20, 0.9, policy, True).kind == "busy"
    assert decide(0.80, 20, None, policy, False).kind == "wait"  # no baseline measured yet


def _artifact(artifact_dir: Path, score: float, when: str) -> Path:
    from dspy_ray.execution.artifacts import ArtifactMetadata, save_artifact

    return save_artifact(load_program(TRIAGE.program).program, artifact_dir,
                         ArtifactMetadata(program="triage", model="fake-model", dev_score=score, created_at=when))


class _JobClient:
    """Stands in for Ray's JobSubmissionClient: the 'job' writes a better artifact and succeeds."""

    submitted: list[str] = []

    def __init__(self, artifact_dir: Path):
        self.artifact_dir = artifact_dir

    def submit_job(self, entrypoint: str, runtime_env=None) -> str:
        self.submitted.append(entrypoint)
        _artifact(self.artifact_dir, 0.95, "2026-11-24T00:00:00+00:00")
        return f"job-{len(self.submitted)}"

    def get_job_status(self, job_id: str) -> str:
        return "JobStatus.SUCCEEDED"


def test_drift_trigger_fires_once_and_new_artifact_is_adopted(tmp_path):
    import asyncio

    artifact_dir = tmp_path / "artifacts"
    base = _artifact(artifact_dir, 0.90, "2026-11-01T00:00:00+00:00")
    _JobClient.submitted = []
    with FakeLLM() as target, FakeLLM(field_overrides={"verdict": "good"}) as judge:
        monitor = DriftMonitor(
            ServeOptions(program="triage", artifact=str(base), artifact_dir=str(artifact_dir),
                         drift_db=str(tmp_path / "d.sqlite")).model_dump(),
            policy={"min_samples": 5, "drop_points": 5, "calibration_examples": 4},
            lm=settings(target).with_key(), judge=settings(judge, model="judge").with_key(),
            job_client_factory=lambda: _JobClient(artifact_dir),
        )

        async def sample(n):
            return [await monitor.record({"transcript": f"t{i}"}, {"priority": "urgent"}, str(base)) for i in range(n)]

        healthy = asyncio.run(sample(6))
        assert [d.kind for d in healthy][-1] == "ok" and not _JobClient.submitted
        # The baseline is the same judge's score of the same program on dev inputs: like with like.
        assert monitor.store.baseline(str(base)) == 1.0 and target.stats()["requests"] >= 4
        judge.configure(field_overrides={"verdict": "bad"})  # quality drops on command
        dropped = asyncio.run(sample(20))
    kinds = [d.kind for d in dropped]
    assert kinds.count("trigger") == 1, kinds  # exactly once
    assert len(_JobClient.submitted) == 1 and "--extra-train" in _JobClient.submitted[0]
    assert monitor.current_artifact().endswith("_0.950.json")  # adopted after the job succeeded
    logged = [k for k, _ in monitor.decisions()]
    assert "baseline" in logged and "trigger" in logged and "deployed" in logged
    store = SampleStore(str(tmp_path / "d.sqlite"))
    assert store.rolling(3600)[1] == 26


def test_drift_runs_a_real_reoptimization_job_and_deploys_its_artifact(ray_job_head, tmp_path, monkeypatch):
    """The whole loop: judge scores drop -> one Ray job runs `python -m optimize` -> its artifact is deployed."""
    import asyncio

    from tests.gold import triage_gold

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the throwaway head runs without token auth
    artifact_dir = tmp_path / "artifacts"
    base = _artifact(artifact_dir, 0.25, "2026-11-01T00:00:00+00:00")  # about what the zero-shot program scores
    transcripts = [json.loads(line)["transcript"]
                   for line in (Path(__file__).resolve().parents[1] / "data/triage_dev.jsonl").read_text().splitlines()]
    with FakeLLM(gold=triage_gold(["data/triage_train.jsonl", "data/triage_dev.jsonl"])) as target, \
            FakeLLM(field_overrides={"verdict": "good"}) as judge:
        entrypoint = (f"{sys.executable} -m optimize --task {{task}} --optimizer miprov2 --auto none "
                      f"--num-candidates 3 --num-trials 4 --val-size 30 --train-limit 60 --dev-limit 30 "
                      f"--workers 2 --out {{artifact_dir}} --extra-train {{samples}} --lm-base-url {target.base_url} "
                      f"--lm-model fake-model --max-calls 2000")
        monitor = DriftMonitor(
            ServeOptions(program="triage", artifact=str(base), artifact_dir=str(artifact_dir),
                         drift_db=str(tmp_path / "d.sqlite")).model_dump(),
            policy={"min_samples": 10, "drop_points": 5, "job_address": ray_job_head.address,
                    "job_entrypoint": entrypoint, "calibration_examples": 4},
            lm=settings(target).with_key(), judge=settings(judge, model="judge").with_key(),
        )

        async def sample(texts):
            return [await monitor.record({"transcript": t}, {"priority": "urgent", "category": "crime"}, str(base))
                    for t in texts]

        assert [d.kind for d in asyncio.run(sample(transcripts[:12]))][-1] == "ok"
        judge.configure(field_overrides={"verdict": "bad"})  # live quality collapses
        kinds = [d.kind for d in asyncio.run(sample(transcripts[12:30]))]
        assert kinds.count("trigger") == 1, kinds
        deadline = time.monotonic() + 420
        while monitor.current_artifact() == str(base):
            assert time.monotonic() < deadline, monitor.decisions()
            asyncio.run(sample(transcripts[30:31]))  # traffic keeps coming; every sample polls the job
            time.sleep(2)
    logged = [k for k, _ in monitor.decisions()]
    assert logged.count("trigger") == 1 and "deployed" in logged, monitor.decisions()
    new = load_program(TRIAGE.program, monitor.current_artifact())
    assert new.metadata.optimizer == "miprov2" and new.metadata.dev_score > 0.25
    assert new.path != str(base)


def test_serve_config_yaml_is_valid_for_serve_deploy(monkeypatch):
    """serve_config.yaml parses with Ray's own deploy schema, and its args build the app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import app_builder

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serve.app:app_builder"
    ServeOptions(**app.args)  # every arg is a known option (extra="forbid")
    args = {**app.args, "artifact": None}  # 'latest' needs a registry; building must not need one
    monkeypatch.setenv("LM_BASE_URL", "http://127.0.0.1:9/v1")  # resolved like everywhere else
    assert app_builder(args) is not None
    monkeypatch.delenv("LM_BASE_URL")
    with pytest.raises(ValueError, match="no LM endpoint"):
        app_builder(args)


def test_cli_refuses_public_bind_without_token(monkeypatch):
    from serve.__main__ import main

    monkeypatch.delenv("SERVE_API_TOKEN", raising=False)
    assert main(["--task", "triage", "--host", "0.0.0.0"]) == 2


def test_docs_render_in_a_browser_with_no_network(serve_http, fake, tmp_path):
    """/docs draws the program's routes in headless Chromium that can reach nothing but 127.0.0.1."""
    import http.server
    import threading as th

    from tests.browser import dump_dom

    deploy(fake)
    dom = dump_dom(f"{serve_http}/docs")
    assert 'data-path="/triage/predict"' in dom and 'data-path="/triage/batch"' in dom, dom[:3000]
    assert "cdn.jsdelivr.net" not in dom
    # The isolation is real: a page whose image lives on a public host cannot load it.
    (tmp_path / "index.html").write_text('<img src="https://pypi.org/static/images/logo-small.8998e9d1.svg" '
                                         'onload="document.title=\'loaded\'" onerror="document.title=\'blocked\'">')
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert "<title>blocked</title>" in dump_dom(f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
