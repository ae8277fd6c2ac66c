"""Which prompt makes the embedded 135M model's triage labels follow the call? Measured side by side.

    python benchmarks/embedded_triage_quality.py [--limit 100] [--configs untuned,labeled4,knn2,knn4,knn2-priority-first]

Every configuration runs the triage program through the framework's own
evaluation path (ProgramRunner: retries, Refine, the task's metric) against the
embedded llama.cpp model, on two held-out sets:

* ``dev``: data/triage_dev.jsonl.  Its calls come from the same templates as the
  training rows (other wording and details), so demos that resemble a call are
  easy to find: an upper bound for nearest-demo prompting;
* ``unseen``: benchmarks/data/triage_handwritten.jsonl, 40 calls written apart
  from the templates (other incidents, other phrasing), labelled with the rules
  of data/README.md; never used for training or for choosing demos.

The table prints priority and category accuracy next to the majority-class
baseline (the most frequent training label) and the share of the most frequent
answer (a constant-label check).  Demos come only from data/triage_train.jsonl.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP

CONFIGS = {
    "untuned": "zero-shot, the program as written",
    "labeled4": "4 fixed labelled demos (seeded draw)",
    "labeled8": "8 fixed labelled demos (seeded draw)",
    "knn2": "all training rows as a pool, 2 nearest per call",
    "knn4": "all training rows as a pool, 4 nearest per call",
    "knn8": "all training rows as a pool, 8 nearest per call",
    "knn2-priority-first": "knn2, outputs in the old order (priority first)",
}
UNSEEN = ROOT / "benchmarks" / "data" / "triage_handwritten.jsonl"


def configure(name: str, program, train: list) -> None:
    from programs.demo_pool import demo_pool

    if name.endswith("-priority-first"):  # the signature's outputs in the order they had before the change
        original = signature = program.triage.signature
        order = ("priority", "category", "summary")
        for field in order:
            signature = signature.delete(field)
        for field in order:
            signature = signature.append(field, original.fields[field], type_=original.fields[field].annotation)
        program.triage.signature = signature
        assert tuple(signature.output_fields) == order, list(original.output_fields)
        name = name.removesuffix("-priority-first")
    fields = tuple(program.triage.signature.fields)
    if name.startswith("labeled"):
        rng = random.Random(9)
        program.triage.demos = demo_pool(rng.sample(train, int(name.removeprefix("labeled"))), fields)
    elif name.startswith("knn"):
        program.triage.demos = demo_pool(train, fields)
        program.nearest.k = int(name.removeprefix("knn"))


def load_unseen():
    import json

    import dspy

    return [dspy.Example(**json.loads(line)).with_inputs("transcript") for line in UNSEEN.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="dev rows (default: all 100)")
    parser.add_argument("--configs", default="untuned,labeled4,knn2,knn4,knn2-priority-first",
                        help=f"comma-separated, from: {', '.join(CONFIGS)}")
    args = parser.parse_args()

    from dspy_ray.endpoints.local.llm_server import EmbeddedLM
    from dspy_ray.execution.scoring import EvalSummary
    from optimize.evaluation import EvalContext, EvalRuntime
    from tasks import get_task
    from tasks.examples import load_task_data

    task = get_task("triage")
    fields = task.metric.exact
    train, dev = load_task_data(task.data, dev_limit=args.limit)
    sets = {"dev": dev, "unseen": load_unseen()}
    majority = {f: Counter(e.get(f) for e in train).most_common(1)[0][0] for f in fields}
    rows = [("majority class (" + ", ".join(majority.values()) + ")",
             {name: [sum(e.get(f) == majority[f] for e in exs) / len(exs) for f in fields]
              for name, exs in sets.items()}, 0.0, "-")]
    print(f"{len(dev)} dev rows, {len(sets['unseen'])} unseen rows, {len(train)} training rows; "
          f"embedded SmolLM2-135M (llama.cpp, 2 cores)", flush=True)
    with EmbeddedLM.start() as server:
        runtime = EvalRuntime(EvalContext(task=task, lm=server.settings(), threads=4))
        for name in args.configs.split(","):
            program = runtime.fresh_program()
            configure(name, program, train)
            accuracy, answers, seconds = {}, Counter(), 0.0
            for set_name, examples in sets.items():
                start = time.perf_counter()
                scores = runtime.evaluate(program, examples)
                seconds += time.perf_counter() - start
                summary = EvalSummary.of(scores, task.metric)
                accuracy[set_name] = [summary.field_accuracy[f] for f in fields]
                answers.update((f, s.outputs.get(f)) for s in scores for f in fields)
            total = sum(len(e) for e in sets.values())
            top = {f: max(((v, n) for (g, v), n in answers.items() if g == f), key=lambda x: x[1]) for f in fields}
            constant = ", ".join(f"{f}={v} {n / total:.0%}" for f, (v, n) in top.items())
            per_row = seconds / total
            rows.append((f"{name}: {CONFIGS[name]}", accuracy, per_row, constant))
            print(f"  {name}: {seconds:.0f} s, " + ", ".join(f"{k} {v}" for k, v in accuracy.items()), flush=True)
    print()
    head = " ".join(f"{s + ' ' + f[:3]:>12}" for s in sets for f in fields)
    print(f"{'configuration':58} {head} {'s/row':>6}  most frequent answer")
    for name, accuracy, per_row, constant in rows:
        cells = " ".join(f"{a:12.2f}" for s in sets for a in accuracy[s])
        print(f"{name:58} {cells} {per_row:6.2f}  {constant}")


if __name__ == "__main__":
    main()
