"""Latency added by Serve, and max sustained requests/s, against the fake endpoint.

    python benchmarks/serve_latency.py [--requests 300]

(1) p50/p99 of one program call made directly in this process (ProgramRunner,
    the code path a replica uses) vs the same call through Serve's HTTP proxy,
    one request at a time; the difference is what Serve adds.
    The same run measures Serve's own floor: an empty FastAPI deployment that
    echoes its body, so what this framework's replica code adds can be told
    apart from what Ray Serve's proxy and router cost on this machine.
(2) requests/s through Serve with many concurrent clients (127.0.0.1 only,
    bounded count), to find the sustained rate on this machine, for the program's
    deployment and for the empty one, both on one replica, side by side: the ratio
    is the share of Serve's own rate the framework keeps (goal >= 90%; and the p50
    added on top of the floor <= 2 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import http.client  # noqa: E402

from dspy_ray.client.lm import build_lm  # noqa: E402
from dspy_ray.execution.loading import load_program  # noqa: E402
from dspy_ray.execution.runner import ProgramRunner  # noqa: E402
from dspy_ray.endpoints.settings import EndpointSettings  # noqa: E402
from serve.app import ServeOptions, build_app  # noqa: E402
from tasks import get_task  # noqa: E402
from dspy_ray.testing.fake_llm import FakeLLM  # noqa: E402

TASK = get_task("triage")


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def direct_latencies(base_url: str, n: int) -> list[float]:
    runner = ProgramRunner(load_program(TASK.program).program,
                           build_lm(EndpointSettings(base_url=base_url, model="fake")),
                           output_fields=TASK.output_fields(), refine_attempts=TASK.refine_attempts)

    async def run() -> list[float]:
        out = []
        for i in range(n + 10):
            start = time.perf_counter()
            outcome = await runner.predict({"transcript": f"direct call {i}"})
            assert outcome.prediction is not None
            out.append(time.perf_counter() - start)
        return out[10:]  # warm-up excluded

    return asyncio.run(run())


def echo_app():
    """The smallest Serve HTTP app: FastAPI ingress, one async route, no work."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=256)
    @serve.ingress(api)
    class Echo:
        @api.post("/triage/predict")
        async def predict(self, body: dict) -> dict:
            return body

    return Echo.bind()


def http_latencies(port: int, n: int, tag: str) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    for i in range(n + 10):
        body = json.dumps({"transcript": f"{tag} call {i}"})
        start = time.perf_counter()
        conn.request("POST", "/triage/predict", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        out.append(time.perf_counter() - start)
    conn.close()
    return out[10:]


def sustained(port: int, clients: int, seconds: float) -> float:
    deadline = time.monotonic() + seconds

    def worker(k: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        done = 0
        while time.monotonic() < deadline:
            conn.request("POST", "/triage/predict", json.dumps({"transcript": f"load {k} {done}"}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            done += resp.status == 200
        conn.close()
        return done

    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(worker, range(clients)))
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--latency", type=float, default=0.02, help="fake endpoint latency (s)")
    parser.add_argument("--load-s", type=float, default=15.0)
    args = parser.parse_args()

    import ray
    from ray import serve

    with FakeLLM(latency=args.latency) as fake:
        direct = direct_latencies(fake.base_url, args.requests)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServeOptions(program="triage", min_replicas=1, max_replicas=1,
                               max_ongoing_requests=256, max_queued_requests=2048)
        lm = EndpointSettings(base_url=fake.base_url, model="fake")
        serve.run(echo_app(), name="echo", route_prefix="/")
        floor = http_latencies(port, args.requests, "echo")
        floor_rates = {c: sustained(port, c, args.load_s) for c in (8, 32)}
        serve.delete("echo")
        serve.run(build_app(options, lm), name="triage", route_prefix="/")
        served = http_latencies(port, args.requests, "serve")
        rates = {c: sustained(port, c, args.load_s) for c in (8, 32)}
        serve.shutdown()
        ray.shutdown()

    d50, d99 = pct(direct, 50) * 1e3, pct(direct, 99) * 1e3
    s50, s99 = pct(served, 50) * 1e3, pct(served, 99) * 1e3
    print(f"fake endpoint latency: {args.latency * 1e3:.0f} ms; {args.requests} sequential requests each")
    print(f"direct (in process):  p50 {d50:7.2f} ms   p99 {d99:7.2f} ms")
    print(f"through Serve (HTTP): p50 {s50:7.2f} ms   p99 {s99:7.2f} ms")
    f50, f99 = pct(floor, 50) * 1e3, pct(floor, 99) * 1e3
    print(f"added by Serve:       p50 {s50 - d50:7.2f} ms   p99 {s99 - d99:7.2f} ms   (ratio p50 {s50 / d50:.2f}x)")
    print(f"Serve floor (empty FastAPI echo deployment, same proxy): p50 {f50:7.2f} ms   p99 {f99:7.2f} ms")
    print(f"added by this framework's replica code on top of that floor: p50 {s50 - d50 - f50:7.2f} ms")
    for clients, rate in rates.items():
        print(f"sustained with {clients:3d} concurrent clients, 1 replica: {rate:7.1f} req/s   "
              f"empty deployment {floor_rates[clients]:7.1f} req/s   ratio {rate / floor_rates[clients]:.2f} "
              f"(goal >= 0.90)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_latency.json").write_text(json.dumps(
        {"direct_p50_ms": d50, "direct_p99_ms": d99, "serve_p50_ms": s50, "serve_p99_ms": s99,
         "added_p50_ms": s50 - d50, "serve_floor_p50_ms": f50, "framework_p50_ms": s50 - d50 - f50,
         "sustained_req_per_s": rates, "empty_sustained_req_per_s": floor_rates}, indent=2))


if __name__ == "__main__":
    main()
