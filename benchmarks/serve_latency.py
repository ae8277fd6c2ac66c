"""Latency added by Serve, and max sustained requests/s, against the fake endpoint.

    python benchmarks/serve_latency.py [--requests 300]

(1) p50/p99 of one program call made directly in this process (ProgramRunner,
    the code path a replica uses) vs the same call through Serve's HTTP proxy,
    one request at a time; the difference is what Serve adds.
    The same run measures Serve's own floor: an empty FastAPI deployment that
    waits as long as the fake endpoint answers (no CPU) and echoes its body, so
    what this framework's replica code adds can be told apart from what Ray
    Serve's proxy and router cost on this machine for a request that waits.
    (A request that waits costs Serve more than one answered at once: the replica
    watches the proxy for a client disconnect meanwhile.  An echo that answers at
    once is measured too, for reference.)
(2) requests/s through Serve with many concurrent clients (127.0.0.1 only,
    bounded count), to find the sustained rate on this machine, for the program's
    deployment and for the empty one, both on one replica, side by side: the ratio
    is the share of Serve's own rate the framework keeps (goal >= 90%; and the p50
    added on top of the floor <= 2 ms).

A third empty deployment (``/call``) makes the program's one LM call and nothing else: the framework's
LM client sends the triage program's messages and response schema, with no DSPy module, predictor or
adapter around it.  Its rate, as a share of the waiting floor's, is what the LM client and the fake
endpoint (on these same cores) leave; the program's rate as a share of its rate is what DSPy and the
replica's request handling cost.

The deployments run at once (the empty ones under ``/wait``, ``/echo`` and ``/call``) and are measured in
alternating rounds (``--rounds``), so a burst of load from elsewhere on the machine
falls on both alike; the printed ratio is the median of the rounds' ratios.

Each program deployment is measured on both paths of the replica's
:class:`~dspy_ray.execution.runner.ProgramRunner` (``--paths``): ``serve``, the shipped triage
program (it defines ``aforward``: the request is awaited on the replica's event loop, no thread
hop), and ``thread``, the same program without it (:data:`THREAD_TRIAGE`, with
``benchmarks/stage_profile.py``'s ``ThreadCallTriager``: a worker thread per request, the path of a
program with only ``forward``), served at ``/thread``.

(3) Where the CPU goes (Linux): during the load windows, the CPU milliseconds per
    request of each process that serves it (the replica, Serve's proxy, the fake
    endpoint), for both deployments: on a machine whose cores are all busy, req/s
    is set by the sum, so the ratio cannot pass what the program's replica and its
    LM endpoint add to Serve's own cost.
(4) In process (``--in-process N`` requests a round, 0 skips): the FastAPI apps the waiting floor's,
    the one-call deployment's and the program's replicas hold, driven directly as ASGI apps by 32
    tasks in this process, with no Serve, proxy or Ray: the CPU a request costs the replica's own
    code, without the other processes' share of the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
from benchmarks.stage_profile import ThreadCallTriager  # noqa: E402

TASK = get_task("triage")
# The triage task on the thread path: the replica imports it as "benchmarks.serve_latency:THREAD_TRIAGE".
THREAD_TRIAGE = dataclasses.replace(TASK, program=dataclasses.replace(TASK.program, cls=ThreadCallTriager))
TASKS = {"serve": TASK, "thread": THREAD_TRIAGE}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def direct_latencies(base_url: str, n: int, task=TASK) -> list[float]:
    runner = ProgramRunner(load_program(task.program).program,
                           # No LM cache, as in the replicas (Serve caches only when asked): every call is sent.
                           build_lm(EndpointSettings(base_url=base_url, model="fake", cache="off")),
                           output_fields=task.output_fields(), refine_attempts=task.refine_attempts)

    async def run() -> list[float]:
        out = []
        for i in range(n + 10):
            start = time.perf_counter()
            outcome = await runner.predict({"transcript": f"direct call {i}"})
            assert outcome.prediction is not None
            out.append(time.perf_counter() - start)
        return out[10:]  # warm-up excluded

    return asyncio.run(run())


def echo_app(wait_s: float = 0.0):
    """The smallest Serve HTTP app: FastAPI ingress, one async route that waits ``wait_s`` (no CPU) and
    answers its body."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})  # as a program's replica
    @serve.ingress(api)
    class Echo:
        @api.post("/triage/predict")
        async def predict(self, body: dict) -> dict:
            if wait_s:
                await asyncio.sleep(wait_s)
            return body

    return Echo.bind()


HOLE = "<<transcript>>"


class OneCall:
    """The triage program's one LM call and nothing else: the framework's LM client sends the messages and
    the response schema the program sends (the adapter's own rendering, the request's transcript in the
    user message), with no DSPy module, predictor or adapter around it."""

    def __init__(self, base_url: str):
        from dspy.adapters.json_adapter import _get_structured_outputs_response_format

        from dspy_ray.client.json_adapter import CachingJSONAdapter

        predictor = load_program(TASK.program).program.predictors()[0]
        messages = CachingJSONAdapter().format(predictor.signature, predictor.demos, {"transcript": HOLE})
        self.system, self.user = messages[0]["content"], messages[-1]["content"]
        # The model class the program's adapter hands the LM as response_format (sent as its strict schema).
        self.schema = _get_structured_outputs_response_format(predictor.signature)
        # A model name of its own: the job's limit service shares one endpoint's limit among the processes
        # calling it, and this deployment is not to take the program replica's share.
        self.lm = build_lm(EndpointSettings(base_url=base_url, model="fake-one-call", cache="off"))

    async def __call__(self, body: dict) -> dict:
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": self.user.replace(HOLE, body["transcript"])}]
        return {"answer": (await self.lm.acall(messages=messages, response_format=self.schema))[0]}


def one_call_app(base_url: str):
    """An empty deployment that makes the program's one LM call (:class:`OneCall`).  Against it, the program's
    deployment shows what DSPy's module, predictor and adapter and the replica's request handling cost;
    against the waiting floor, it shows what the LM client and the fake endpoint (on these same cores) cost."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(api)
    class OneCallServer:
        def __init__(self):
            self.call = OneCall(base_url)

        @api.post("/triage/predict")
        async def predict(self, body: dict) -> dict:
            return await self.call(body)

    return OneCallServer.bind()


def in_process_apps(base_url: str, wait_s: float) -> dict[str, Any]:
    """The ASGI apps the replicas hold (the waiting floor's, the one-call deployment's, the program's), built in
    this process to be driven directly, without Serve."""
    from fastapi import FastAPI

    from serve.app import ProgramServer

    wait, call, one = FastAPI(), FastAPI(), OneCall(base_url)

    @wait.post("/triage/predict")
    async def waited(body: dict) -> dict:
        await asyncio.sleep(wait_s)
        return body

    @call.post("/triage/predict")
    async def called(body: dict) -> dict:
        return await one(body)

    options = ServeOptions(program="triage", max_ongoing_requests=256).model_dump()
    program = ProgramServer(options, EndpointSettings(base_url=base_url, model="fake", cache="off").with_key())
    return {"wait": wait, "call": call, "serve": program.http_app}


async def asgi_post(app, path: str, body: bytes) -> int:
    """One POST through an ASGI app, as Serve's replica hands it one; the response status."""
    status, sent = 0, False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return status


def in_process_cpu(apps: dict[str, Any], requests: int, rounds: int, clients: int = 32) -> dict[str, float]:
    """CPU ms per request of this process for each app, ``clients`` requests at once (best of ``rounds``,
    the apps in turn): what the replica's own code costs, with no proxy, no Ray and no other process."""

    async def drive(app, n: int) -> None:
        numbers = iter(range(n))

        async def client(k: int) -> None:
            for i in numbers:
                body = json.dumps({"transcript": f"in process {k} {i} {time.monotonic_ns()}"}).encode()
                assert await asgi_post(app, "/triage/predict", body) == 200

        await asyncio.gather(*(client(k) for k in range(clients)))

    async def measure() -> dict[str, list[float]]:
        seen: dict[str, list[float]] = {tag: [] for tag in apps}
        for tag, app in apps.items():
            await drive(app, 2 * clients)  # warm
        for _ in range(rounds):
            for tag, app in apps.items():
                cpu = time.process_time()
                await drive(app, requests)
                seen[tag].append((time.process_time() - cpu) / requests * 1e3)
        return seen

    try:
        import uvloop  # what Serve's replicas run on when it is installed

        seen = uvloop.run(measure())
    except ImportError:
        seen = asyncio.run(measure())
    return {tag: min(values) for tag, values in seen.items()}


PATHS = {"echo": "/echo/triage/predict", "wait": "/wait/triage/predict", "call": "/call/triage/predict",
         "serve": "/triage/predict", "thread": "/thread/triage/predict"}
REPLICAS = {"echo": "ServeReplica:echo:", "wait": "ServeReplica:wait:", "call": "ServeReplica:call:",
            "serve": "ServeReplica:triage:", "thread": "ServeReplica:triage_thread:"}
FLOORS = ("wait", "echo", "call")


def http_latencies(port: int, n: int, tag: str, warm: int = 10) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    for i in range(n + warm):
        body = json.dumps({"transcript": f"{tag} call {i} {time.monotonic_ns()}"})
        start = time.perf_counter()
        conn.request("POST", PATHS[tag], body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        out.append(time.perf_counter() - start)
    conn.close()
    return out[warm:]


def cpu_seconds(match: dict[str, str]) -> dict[str, float]:
    """CPU seconds so far of the processes whose command line holds each pattern (``pid=N``: that process),
    by name (Linux /proc)."""
    out = dict.fromkeys(match, 0.0)
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for name, pattern in match.items():
            if pattern == f"pid={entry.name}" or (not pattern.startswith("pid=") and pattern in cmd):
                out[name] += (int(fields[11]) + int(fields[12])) / tick
    return out


CPU_SEEN: dict[str, list[dict[str, float]]] = {}  # tag -> per window: CPU ms per request by process
PROCESSES = {"replica": "", "proxy": "ProxyActor", "endpoint": "fake_llm"}


def sustained(port: int, clients: int, seconds: float, tag: str) -> float:
    watched = {**PROCESSES, "replica": REPLICAS[tag]}
    before = cpu_seconds(watched)
    rate = _sustained(port, clients, seconds, tag)
    after = cpu_seconds(watched)
    CPU_SEEN.setdefault(tag, []).append({k: (after[k] - before[k]) * 1e3 / max(rate * seconds, 1) for k in watched})
    return rate


def _sustained(port: int, clients: int, seconds: float, tag: str) -> float:
    deadline = time.monotonic() + seconds

    def worker(k: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        done = 0
        while time.monotonic() < deadline:
            conn.request("POST", PATHS[tag], json.dumps({"transcript": f"load {k} {done} {time.monotonic_ns()}"}),
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
    parser.add_argument("--load-s", type=float, default=5.0, help="seconds of each load window")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of each measurement")
    parser.add_argument("--in-process", type=int, default=2000, metavar="N",
                        help="requests per round for (4), the replicas' apps driven in this process (0: skip)")
    parser.add_argument("--paths", default="serve,thread",
                        help="program deployments to measure: serve (the shipped program, on the replica's event "
                             "loop), thread (the same on a worker thread per request)")
    args = parser.parse_args()
    tags = [t for t in args.paths.split(",") if t in TASKS]

    import ray
    from ray import serve

    with FakeLLM(latency=args.latency) as fake:
        PROCESSES["endpoint"] = f"pid={fake.proc.pid}"
        direct = {tag: direct_latencies(fake.base_url, args.requests, TASKS[tag]) for tag in tags}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        lm = EndpointSettings(base_url=fake.base_url, model="fake")
        serve.run(echo_app(), name="echo", route_prefix="/echo")
        serve.run(echo_app(args.latency), name="wait", route_prefix="/wait")
        serve.run(one_call_app(fake.base_url), name="call", route_prefix="/call")
        for tag in tags:
            options = ServeOptions(program="triage" if tag == "serve" else "benchmarks.serve_latency:THREAD_TRIAGE",
                                   min_replicas=1, max_replicas=1, max_ongoing_requests=256, max_queued_requests=2048)
            serve.run(build_app(options, lm), name="triage" if tag == "serve" else "triage_thread",
                      route_prefix="/" if tag == "serve" else "/thread")
        per_round = max(1, args.requests // args.rounds)
        latencies: dict[str, list[float]] = {tag: [] for tag in [*FLOORS, *tags]}
        for r in range(args.rounds):  # sequential latencies, the deployments in turn
            for tag in latencies:
                latencies[tag] += http_latencies(port, per_round, tag, warm=10 if r == 0 else 2)
        rates: dict[str, dict[int, list[float]]] = {tag: {} for tag in [*FLOORS, *tags]}
        for c in (8, 32):
            for _ in range(args.rounds):
                for tag in rates:
                    rates[tag].setdefault(c, []).append(sustained(port, c, args.load_s, tag))
        serve.shutdown()
        ray.shutdown()
        # Last, once Ray is gone: a program server built in this process stays in it (its LM, heap settings).
        in_process = (in_process_cpu(in_process_apps(fake.base_url, args.latency), args.in_process, args.rounds)
                      if args.in_process else {})

    # Serve's floor for a program that calls an LM: the empty deployment that waits as long as the endpoint
    # answers.  A request that waits costs Serve more than one answered in the same loop turn (the replica
    # watches the proxy for a client disconnect meanwhile, one actor call per request), and with a few
    # clients in a closed loop the rate is set by the wait: the echo that does not wait is printed for reference.
    e50, w50 = pct(latencies["echo"], 50) * 1e3, pct(latencies["wait"], 50) * 1e3
    f50 = w50 - args.latency * 1e3
    print(f"fake endpoint latency: {args.latency * 1e3:.0f} ms; {args.requests} sequential requests each")
    print(f"Serve floor (empty FastAPI deployment, same proxy): p50 {e50:7.2f} ms answering at once; "
          f"{w50:7.2f} ms waiting {args.latency * 1e3:.0f} ms first: {f50:.2f} ms added")
    c50 = pct(latencies["call"], 50) * 1e3
    print(f"One LM call without DSPy (empty deployment, the program's call): p50 {c50:7.2f} ms, "
          f"{c50 - w50:.2f} ms over the waiting floor")
    results = {"serve_floor_p50_ms": f50, "echo_p50_ms": e50, "one_call_p50_ms": c50,
               "empty_sustained_req_per_s": rates["wait"],
               "echo_sustained_req_per_s": rates["echo"], "one_call_sustained_req_per_s": rates["call"]}
    for tag in tags:
        d50, d99 = pct(direct[tag], 50) * 1e3, pct(direct[tag], 99) * 1e3
        s50, s99 = pct(latencies[tag], 50) * 1e3, pct(latencies[tag], 99) * 1e3
        print(f"[{tag}] direct (in process):  p50 {d50:7.2f} ms   p99 {d99:7.2f} ms")
        print(f"[{tag}] through Serve (HTTP): p50 {s50:7.2f} ms   p99 {s99:7.2f} ms")
        print(f"[{tag}] added by Serve:       p50 {s50 - d50:7.2f} ms   p99 {s99 - d99:7.2f} ms   "
              f"(ratio p50 {s50 / d50:.2f}x)")
        print(f"[{tag}] added by this framework's replica code on top of the floor: p50 {s50 - d50 - f50:7.2f} ms "
              f"(goal <= 2 ms)")
        ratios = {}
        for clients, ours in rates[tag].items():
            ratios[clients] = {}
            for floor in FLOORS:
                empty = rates[floor][clients]
                ratios[clients][floor] = statistics.median(a / b for a, b in zip(ours, empty))
            empty = rates["wait"][clients]
            print(f"[{tag}] sustained with {clients:3d} concurrent clients, 1 replica, {len(ours)} rounds of "
                  f"{args.load_s:g} s: {statistics.mean(ours):7.1f} req/s   empty deployment (waiting) "
                  f"{statistics.mean(empty):7.1f} req/s   ratio per round {' '.join(f'{a / b:.2f}' for a, b in zip(ours, empty))}, "
                  f"median {ratios[clients]['wait']:.2f} (goal >= 0.90); to the echo answering at once "
                  f"({statistics.mean(rates['echo'][clients]):.1f} req/s) {ratios[clients]['echo']:.2f}")
            call = rates["call"][clients]
            print(f"[{tag}]   the deployment making one LM call without DSPy: {statistics.mean(call):7.1f} req/s, "
                  f"{statistics.median(a / b for a, b in zip(call, empty)):.2f} of the waiting floor; "
                  f"the program {ratios[clients]['call']:.2f} of it")
        results[tag] = {"direct_p50_ms": d50, "direct_p99_ms": d99, "serve_p50_ms": s50, "serve_p99_ms": s99,
                        "added_p50_ms": s50 - d50, "framework_p50_ms": s50 - d50 - f50,
                        "sustained_req_per_s": rates[tag], "median_ratio": ratios}
    cpu = {tag: {k: statistics.median(w[k] for w in windows) for k in PROCESSES} for tag, windows in CPU_SEEN.items()}
    if any(v for by in cpu.values() for v in by.values()):
        print("CPU ms per request (median over the load windows):")
        for tag in [*FLOORS, *tags]:
            by = cpu[tag]
            label = {"echo": "echo (at once)", "wait": "empty deployment", "call": "one LM call, no DSPy",
                     "serve": "program (async)", "thread": "program (thread)"}[tag]
            print(f"  {label:20s}: replica {by['replica']:5.2f}   proxy {by['proxy']:5.2f}   "
                  f"endpoint {by['endpoint']:5.2f}   sum {sum(by.values()):5.2f}")
        for tag in tags:
            bound = sum(cpu["wait"].values()) / max(sum(cpu[tag].values()), 1e-9)
            print(f"  [{tag}] the ratio these sums allow when the cores are the limit: {bound:.2f}")
    results["cpu_ms_per_request"] = cpu
    if in_process:
        print(f"In process (the replicas' FastAPI apps driven directly, 32 requests at once, no Serve), CPU ms per "
              f"request, best of {args.rounds} rounds of {args.in_process}: empty (waiting) {in_process['wait']:.3f}, "
              f"one LM call without DSPy {in_process['call']:.3f}, program {in_process['serve']:.3f}")
    results["in_process_cpu_ms_per_request"] = in_process
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_latency.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
