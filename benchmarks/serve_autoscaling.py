"""Stepped load against a local Serve app; records replicas over time and plots load vs replicas.

    python benchmarks/serve_autoscaling.py [--step-s 25]

Traffic goes only to 127.0.0.1 and stops by itself. The fake endpoint answers
in 0.5 s; target_ongoing_requests=4 and 1..4 replicas, so 16 concurrent
clients should need 4 replicas and idle should shrink back to 1.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dspy_ray.endpoints.settings import EndpointSettings  # noqa: E402
from serve.app import ServeOptions, build_app  # noqa: E402
from dspy_ray.testing.fake_llm import FakeLLM  # noqa: E402

STEPS = [1, 4, 16, 16, 4, 0, 0]  # concurrent clients per step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(url: str, stop: threading.Event, counter: list) -> None:
    body = json.dumps({"transcript": "smoke in the stairwell"}).encode()
    while not stop.is_set():
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
            counter.append(1)
        except OSError:
            time.sleep(0.1)


def replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app]
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-s", type=float, default=25.0)
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    timeline: list[tuple[float, int, int]] = []
    with FakeLLM(latency=0.5) as fake:
        options = ServeOptions(program="triage", min_replicas=1, max_replicas=4,
                               target_ongoing_requests=4, upscale_delay_s=2, downscale_delay_s=8,
                               max_ongoing_requests=8)
        serve.run(build_app(options, EndpointSettings(base_url=fake.base_url, model="fake")), name="triage",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}/triage/predict"
        start = time.monotonic()
        for clients in STEPS:
            stop, done = threading.Event(), []
            threads = [threading.Thread(target=client, args=(url, stop, done), daemon=True) for _ in range(clients)]
            for t in threads:
                t.start()
            step_end = time.monotonic() + args.step_s
            while time.monotonic() < step_end:
                timeline.append((time.monotonic() - start, clients, replicas("triage")))
                time.sleep(1)
            stop.set()
            for t in threads:
                t.join(timeout=35)
            print(f"{clients:3d} clients: {len(done) / args.step_s:6.1f} req/s, replicas now {timeline[-1][2]}",
                  flush=True)
    serve.shutdown()
    ray.shutdown()

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_autoscaling.json").write_text(json.dumps(timeline))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, load, reps = zip(*timeline)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.step(t, load, where="post", label="concurrent clients", color="tab:blue")
    ax.set_xlabel("seconds")
    ax.set_ylabel("clients", color="tab:blue")
    ax2 = ax.twinx()
    ax2.step(t, reps, where="post", label="running replicas", color="tab:red")
    ax2.set_ylabel("replicas", color="tab:red")
    ax2.set_ylim(0, 5)
    ax.set_title("Queue-depth autoscaling: load vs replicas (target_ongoing_requests=4)")
    fig.tight_layout()
    fig.savefig(out / "serve_autoscaling.png", dpi=120)
    print(f"max replicas {max(reps)}, final replicas {reps[-1]}; plot: {out / 'serve_autoscaling.png'}")


if __name__ == "__main__":
    main()
