"""The batch CLI against endpoints of unknown capacity: achieved calls/s, 429s and in-flight over time.

    python benchmarks/endpoint_capacity.py [--rows 5000] [--capacities 32,128,512] [--kinds queue,reject]

For each endpoint kind and capacity C, a fake OpenAI-compatible endpoint with latency
L (0.25 s) serves at most C requests at once, so it can answer at most C/L calls/s:

* ``queue``: requests beyond C wait in a FIFO queue (vLLM, llama.cpp);
* ``reject``: requests beyond C are answered 429 + ``Retry-After: 1`` at once (a hosted API,
  the independent checker's endpoint).

``python -m pipelines.triage`` runs over ``--rows`` unique calls with its **default flags**
(nothing about C is passed: the framework has to find it), both stages, so two LM calls per
row.  The LM cache is on, as by default, in a fresh folder per run (``LM_CACHE``): every call a
miss and stored, as on a new machine, whatever earlier runs left in ``~/.cache/dspy-ray/lm`` (a
folder at its size bound evicts as it writes: ``benchmarks/lm_cache.py --writes`` measures that).
The fake samples its in-flight count every 50 ms; from that this prints, per run:

* calls/s answered 200 over the active period, and that as a share of C/L;
* the share of all requests answered 429, overall and after the first 5 s;
* how often the endpoint sat idle (in flight 0) or under half its capacity while rows were left;

and plots in-flight vs time to ``benchmarks/results/endpoint_capacity.png``.  A JSON copy of
the table and the samples go to ``benchmarks/results/endpoint_capacity.json`` (not tracked).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
for _var in ("LM_BASE_URL", "LM_MODEL", "LM_MAX_IN_FLIGHT"):  # default flags: nothing about the endpoint's limits
    os.environ.pop(_var, None)

from dspy_ray.testing.fake_llm import FakeLLM  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WARMUP_S = 5.0


def write_calls(path: Path, n: int, tag: str) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{tag}-{i:06d}",
                                "transcript": f"[{tag} {i}] Caller reports smoke near house number {i}."}) + "\n")


def run_cli(input_path: Path, output: Path, base_url: str, extra: list[str]) -> tuple[int, str]:
    from pipelines.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main("triage", ["--input", str(input_path), "--output", str(output), "--lm-base-url", base_url,
                               "--lm-model", "fake-model", *extra], prog="python -m pipelines.triage")
    return code, buffer.getvalue()


def analyse(samples: list[dict], capacity: int, latency: float, stats: dict) -> dict:
    """Figures over the active period: from the first request to the last one answered."""
    active = [s for s in samples if s["requests"] > 0]
    first, last_total = active[0], active[-1]["requests"]
    arrived = next(s for s in active if s["requests"] >= last_total)  # when the last request arrived
    end = next((s for s in active if s["seconds"] >= arrived["seconds"] and s["in_flight"] == 0
                and s["queued"] == 0), active[-1])  # ... and when it was answered
    window = [s for s in active if s["seconds"] <= arrived["seconds"]]
    seconds = max(1e-9, end["seconds"] - first["seconds"])
    ok_calls = stats["ok"] + stats["malformed"]
    limit = capacity / latency
    late = [s for s in window if s["seconds"] - first["seconds"] >= WARMUP_S]
    late_requests = (late[-1]["requests"] - late[0]["requests"]) if len(late) > 1 else 0
    late_429 = (late[-1]["rate_limited"] - late[0]["rate_limited"]) if len(late) > 1 else 0
    return {
        "capacity": capacity,
        "limit_calls_per_s": limit,
        "calls_per_s": ok_calls / seconds,
        "share_of_limit": ok_calls / seconds / limit,
        "seconds": seconds,
        "requests": stats["requests"],
        "answered_429": stats["rate_limited"],
        "share_429": stats["rate_limited"] / max(1, stats["requests"]),
        "share_429_after_warmup": late_429 / max(1, late_requests),
        "peak_in_flight": stats["max_in_flight"],
        "mean_in_flight": sum(s["in_flight"] for s in window) / max(1, len(window)),
        "idle_share": sum(1 for s in window if s["in_flight"] == 0) / max(1, len(window)),
        "under_half_share": sum(1 for s in window if s["in_flight"] < capacity / 2) / max(1, len(window)),
    }


def run_one(kind: str, capacity: int, args, workdir: Path) -> dict:
    tag = f"{kind}{capacity}"
    src = workdir / f"{tag}.jsonl"
    write_calls(src, args.rows, tag)
    fake_kwargs = {"latency": args.latency, "capacity": capacity, "retry_after": 1.0, "sample_interval": 0.05}
    if kind == "reject":
        fake_kwargs["reject_over"] = 0
    os.environ["LM_CACHE"] = str(workdir / f"lm-cache-{tag}")  # a fresh cache: every call a miss, stored
    with FakeLLM(**fake_kwargs) as fake:
        start = time.perf_counter()
        code, out = run_cli(src, workdir / f"out-{tag}", fake.base_url, args.extra)
        wall = time.perf_counter() - start
        stats, samples = fake.stats(), fake.samples()
        limits = limit_history(fake.base_url)
    if code != 0:
        raise SystemExit(f"{tag}: the CLI exited {code}:\n{out}")
    row = {"kind": kind, "wall_s": wall, **analyse(samples, capacity, args.latency, stats),
           "summary": out.strip().splitlines()[-1] if out.strip() else ""}
    row["calls_per_row"] = stats["requests"] / args.rows
    return row | {"samples": samples, "limits": limits}


def limit_history(base_url: str) -> list[list[float]]:
    """The endpoint limit over the run, from its coordinator actor ([] before the limiter existed)."""
    try:
        from dspy_ray.client.limiter import coordinator_state

        state = coordinator_state(base_url, "fake-model", history=True)
        print("  limit state:", {k: v for k, v in state.items() if k not in ("history", "members")}, flush=True)
        return [list(h) for h in state["history"]]
    except Exception:  # noqa: BLE001 - the code before the limiter: nothing to show
        return []


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in rows}, reverse=True)
    caps = sorted({r["capacity"] for r in rows})
    fig, axes = plt.subplots(len(kinds), len(caps), figsize=(4.2 * len(caps), 2.8 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, cap in enumerate(caps):
            ax = axes[i][j]
            run = next((r for r in rows if r["kind"] == kind and r["capacity"] == cap), None)
            if run is None:
                ax.set_visible(False)
                continue
            samples = [s for s in run["samples"] if s["requests"] > 0]
            t0 = samples[0]["seconds"] if samples else 0.0
            ax.plot([s["seconds"] - t0 for s in samples], [s["in_flight"] for s in samples], lw=0.7,
                    label="in flight")
            if kind == "queue":
                ax.plot([s["seconds"] - t0 for s in samples], [s["in_flight"] + s["queued"] for s in samples],
                        lw=0.5, alpha=0.6, label="in flight + queued")
            if run.get("limits"):  # the coordinator's clock starts at its first report: align the two starts
                h0 = run["limits"][0][0]
                ax.plot([h[0] - h0 for h in run["limits"]], [h[1] for h in run["limits"]], lw=0.7, color="C2",
                        label="limit (all actors)")
            ax.axhline(cap, color="k", ls="--", lw=0.8, label=f"capacity {cap}")
            ax.set_title(f"{kind}, C={cap}: {run['share_of_limit']:.0%} of C/L, "
                         f"{run['share_429']:.1%} 429", fontsize=9)
            ax.set_xlabel("seconds")
            if j == 0:
                ax.set_ylabel("requests")
            ax.legend(fontsize=6, loc="lower center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--capacities", default="32,128,512")
    parser.add_argument("--kinds", default="queue,reject")
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--label", default="", help="tag for the plot title and file names (e.g. 'before')")
    parser.add_argument("extra", nargs="*", help="extra CLI flags after --, e.g. -- --num-actors 4")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
        for kind in args.kinds.split(","):
            for cap in (int(c) for c in args.capacities.split(",")):
                row = run_one(kind, cap, args, Path(tmp))
                rows.append(row)
                print(f"{kind:>6} C={cap:<4} {row['calls_per_s']:7.1f} calls/s = {row['share_of_limit']:5.1%} of "
                      f"C/L; 429: {row['share_429']:6.2%} of {row['requests']} requests "
                      f"({row['share_429_after_warmup']:.2%} after {WARMUP_S:g} s); mean in flight "
                      f"{row['mean_in_flight']:.0f}, peak {row['peak_in_flight']}; idle {row['idle_share']:.1%} "
                      f"of samples; {row['calls_per_row']:.2f} calls/row; wall {row['wall_s']:.1f} s", flush=True)
    end_load = os.getloadavg()[0]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load {load:.2f} at start / {end_load:.2f} at end"
    print(f"\nmachine: {machine}; {time.strftime('%Y-%m-%d')}")
    print("| endpoint | C | C/L calls/s | achieved calls/s | share of C/L | 429 share (after 5 s) | idle samples |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['capacity']} | {r['limit_calls_per_s']:.0f} | {r['calls_per_s']:.0f} | "
              f"{r['share_of_limit']:.0%} | {r['share_429']:.2%} ({r['share_429_after_warmup']:.2%}) | "
              f"{r['idle_share']:.1%} |")
    suffix = f"_{args.label}" if args.label else ""
    title = f"python -m pipelines.triage, default flags, {args.rows} rows, L={args.latency:g}s {args.label}".strip()
    plot(rows, RESULTS / f"endpoint_capacity{suffix}.png", title)
    (RESULTS / f"endpoint_capacity{suffix}.json").write_text(json.dumps(
        {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
