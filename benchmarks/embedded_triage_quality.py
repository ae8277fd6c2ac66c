"""Which prompt makes the embedded 135M model's triage labels follow the call? Measured side by side on the dev set.

    python benchmarks/embedded_triage_quality.py [--limit 100] [--configs untuned,labeled4,knn4,knn8]

Every configuration runs the triage program on data/triage_dev.jsonl through the
framework's own evaluation path (ProgramRunner: retries, Refine, the task's metric)
against the embedded llama.cpp model, and the table prints priority and category
accuracy next to the majority-class baseline (always answering the most frequent
label of the training set) and a constant-label check.  Demos come only from
data/triage_train.jsonl, never from the dev set.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

CONFIGS = {
    "untuned": "zero-shot: the program as written",
    "labeled4": "4 labelled demos, one fixed set for every call (seeded draw)",
    "labeled8": "8 labelled demos, one fixed set for every call (seeded draw)",
    "knn2": "pool of all training rows; each call sees the 2 nearest",
    "knn4": "pool of all training rows; each call sees the 4 nearest",
    "knn8": "pool of all training rows; each call sees the 8 nearest",
}


def configure(name: str, program, train: list) -> None:
    from programs.demo_pool import demo_pool

    fields = tuple(program.triage.signature.fields)
    if name.startswith("labeled"):
        rng = random.Random(9)
        program.triage.demos = demo_pool(rng.sample(train, int(name.removeprefix("labeled"))), fields)
    elif name.startswith("knn"):
        program.triage.demos = demo_pool(train, fields)
        program.nearest.k = int(name.removeprefix("knn"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="dev rows (default: all 100)")
    parser.add_argument("--configs", default="untuned,labeled4,knn2,knn4,knn8",
                        help=f"comma-separated, from: {', '.join(CONFIGS)}")
    args = parser.parse_args()

    from core.embedded import EmbeddedLM
    from core.scoring import EvalSummary
    from optimize.evaluation import EvalContext, EvalRuntime
    from tasks import get_task
    from tasks.examples import load_task_data

    task = get_task("triage")
    train, dev = load_task_data(task.data, dev_limit=args.limit)
    majority = {f: Counter(e.get(f) for e in train).most_common(1)[0][0] for f in task.metric.exact}
    rows = [("majority class (" + ", ".join(majority.values()) + ")",
             *(sum(e.get(f) == majority[f] for e in dev) / len(dev) for f in task.metric.exact), 0.0, "-")]
    print(f"{len(dev)} dev rows, {len(train)} training rows; embedded SmolLM2-135M (llama.cpp, 2 cores)", flush=True)
    with EmbeddedLM.start() as server:
        runtime = EvalRuntime(EvalContext(task=task, lm=server.settings(), threads=4))
        for name in args.configs.split(","):
            program = runtime.fresh_program()
            configure(name, program, train)
            start = time.perf_counter()
            scores = runtime.evaluate(program, dev)
            seconds = time.perf_counter() - start
            summary = EvalSummary.of(scores, task.metric)
            top = {f: Counter(s.outputs.get(f) for s in scores).most_common(1)[0] for f in task.metric.exact}
            constant = ", ".join(f"{f}={v} {n / len(scores):.0%}" for f, (v, n) in top.items())
            rows.append((f"{name}: {CONFIGS[name]}", *(summary.field_accuracy[f] for f in task.metric.exact),
                         seconds, constant))
            print(f"  {name}: done in {seconds:.0f} s ({summary.program_errors} program errors)", flush=True)
    print()
    print(f"{'configuration':72} {'priority':>8} {'category':>8} {'seconds':>8}  most frequent answer")
    for name, pri, cat, seconds, constant in rows:
        print(f"{name:72} {pri:8.2f} {cat:8.2f} {seconds:8.0f}  {constant}")


if __name__ == "__main__":
    main()
