"""Parallel MIPROv2 with and without the shared LM cache: LM calls sent, answers from the cache, score, wall time.

    python benchmarks/optimize_cache.py                          # W=4, fake endpoint 20 ms per call
    python benchmarks/optimize_cache.py --store remote           # the cache as one file per entry (file://)
    python benchmarks/optimize_cache.py --latency 0.2             # calls that cost time: wall time too
    python benchmarks/optimize_cache.py --trials 20 --full-eval-steps 5

The same run three times, side by side, each on W fresh Ray workers (started and warmed up before the clock):

1. ``LM_CACHE=off``: every call is sent;
2. a fresh, empty shared store: a call that any worker already made (the same instruction, demos
   and example, scored again by another trial, by a full evaluation, or bootstrapped again for
   another demo set) is answered from the store;
3. the same store again, a new run directory: a re-run pays only for the calls that are not
   cacheable (the dataset summary samples at temperature 1.0 with no rollout id).

Same seed, same candidates, same trials: the script checks that rows 1 and 2 searched the same
combinations and found the same best score.  Two runs of parallel MIPROv2 search the same trials
only while optuna's TPE samples at random (its first 10 trials, full evaluations counted): after
that, with W > 1, what it proposes depends on which trials finished first.  So the defaults stay
in that window (8 trials, one full evaluation at the end); more trials still show the saving, but
the two runs may then search different combinations.  The fake endpoint runs in few-shot mode
(``tests.gold``): deterministic, and better prompts really score higher.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP


@dataclass
class Row:
    name: str
    sent: int
    cached: int
    best: float
    seconds: float
    trials: list
    best_params: dict
    candidates: dict


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="W Ray workers (default 4)")
    parser.add_argument("--latency", type=float, default=0.02, help="fake endpoint seconds per call (default 0.02)")
    parser.add_argument("--trials", type=int, default=8, help="minibatch trials (default 8)")
    parser.add_argument("--candidates", type=int, default=6, help="candidates per predictor (default 6)")
    parser.add_argument("--minibatch", type=int, default=20, help="examples per minibatch trial (default 20)")
    parser.add_argument("--val", type=int, default=40, help="valset size (default 40)")
    parser.add_argument("--train", type=int, default=120, help="training rows used, valset included (default 120)")
    parser.add_argument("--threads", type=int, default=4, help="examples in flight per worker (default 4)")
    parser.add_argument("--full-eval-steps", type=int, default=None,
                        help="minibatch trials between full evaluations (default: --trials, one at the end)")
    parser.add_argument("--store", choices=["local", "remote"], default="local",
                        help="local: a diskcache folder (the default store); remote: one JSON file per entry "
                             "through a file:// URI, as on object storage")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import ray

    from dspy_ray.client.limiter import ensure_coordinator
    from dspy_ray.client.usage import total_of
    from dspy_ray.endpoints.settings import EndpointSettings
    from dspy_ray.execution.loading import load_program
    from dspy_ray.testing.fake_llm import FakeLLM
    from optimize.config import SearchSettings, resolve_budget
    from optimize.data import split_train_val
    from optimize.evaluation import EvalContext
    from optimize.mipro import ParallelMIPROv2
    from optimize.storage import RunStorage
    from optimize.workers import WorkerPool
    from tasks import get_task
    from tasks.examples import load_task_data
    from tests.gold import triage_gold

    logging.getLogger("dspy").setLevel(logging.ERROR)
    task = get_task("triage")
    train, dev = load_task_data(task.data, train_limit=args.train)
    if len(dev) < 3 * args.workers:
        raise SystemExit(f"--workers {args.workers}: the warm-up needs {3 * args.workers} dev examples")
    warmups = iter(dev)  # one example per worker and run, never seen before: a miss even on a warm store
    search = SearchSettings(auto=None, num_candidates=args.candidates, num_trials=args.trials,
                            minibatch_size=args.minibatch, val_size=args.val,
                            full_eval_steps=args.full_eval_steps or args.trials)
    budget = resolve_budget(search, 1, len(train))
    trainset, valset = split_train_val(train, budget.val_size, search.seed)
    print(f"parallel MIPROv2, W={args.workers}, seed {search.seed}: {len(trainset)} train, {len(valset)} val; "
          f"{budget.num_fewshot_candidates} demo sets x {budget.num_instruct_candidates} instructions; "
          f"{args.trials} trials x minibatch {budget.minibatch_size}; fake endpoint {args.latency * 1000:.0f} ms/call; "
          f"{args.store} store", flush=True)

    def run(name: str, fake: FakeLLM, cache: str) -> Row:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model", max_in_flight=256, cache=cache)
        ctx = EvalContext(task=task, lm=settings, threads=args.threads, num_cpus=0.01)
        with WorkerPool(ctx, args.workers) as pool, tempfile.TemporaryDirectory(prefix="run-") as run_dir:
            # Before the clock: each process's first LM call pays for imports, DSPy's model metadata and
            # joining the endpoint's limiter (seconds on a busy machine); every row pays it alike, untimed.
            ray.get([actor.evaluate_state.remote(program_state, [next(warmups)]) for actor in pool.actors])
            optimizer = ParallelMIPROv2(search, budget, ctx, workers=args.workers, storage=RunStorage(run_dir),
                                        pool=pool, on_event=lambda line: None)
            warm = total_of(pool.usage().values())
            fake.reset_stats()
            start = time.perf_counter()
            result = optimizer.compile(list(trainset), list(valset))
            seconds = time.perf_counter() - start
            usage = total_of(pool.usage().values())
            stats = [s.get("lm", {}) for s in ray.get([actor.cache_stats.remote() for actor in pool.actors])]
        sent = fake.stats()["requests"]
        calls, cached = usage.calls - warm.calls, usage.cached - warm.cached
        if calls != sent:
            print(f"  note: the workers counted {calls} calls, the endpoint saw {sent}")
        if usage.retries - warm.retries:
            print(f"  note: {usage.retries - warm.retries} of the calls sent were retries (timeouts, 5xx)")
        failed = sum(s.get("errors", 0) for s in stats)
        print(f"  {name}: {seconds:.1f} s" + (f"; the store failed {failed} read(s)/write(s)" if failed else ""),
              flush=True)
        return Row(name, sent, cached, result.best_score, seconds, [t.params for t in result.trials],
                   result.best_params, result.candidates.model_dump())

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    ensure_coordinator()  # one limit service for all three runs (as one optimize run has), owned by this driver
    program_state = load_program(task.program).program.dump_state()
    with FakeLLM(gold=triage_gold(["data/triage_train.jsonl", "data/triage_dev.jsonl"]),
                 latency=args.latency) as fake, tempfile.TemporaryDirectory(prefix="lm-cache-") as store_dir:
        store = Path(store_dir).as_uri() if args.store == "remote" else store_dir
        rows = [run("cache off", fake, "off"), run("cache on, fresh store", fake, store),
                run("cache on, re-run (warm store)", fake, store)]
    ray.shutdown()
    report(rows)


def report(rows: list[Row]) -> None:
    off = rows[0]
    print()
    print(f"{'':32} {'LM calls sent':>13} {'vs off':>7} {'from cache':>10} {'best score':>10} {'wall s':>7} "
          f"{'vs off':>7}")
    for row in rows:
        print(f"{row.name:32} {row.sent:13d} {row.sent / max(off.sent, 1):6.2f}x {row.cached:10d} "
              f"{row.best:10.3f} {row.seconds:7.1f} {row.seconds / off.seconds:6.2f}x")
    on = rows[1]
    same_trials = on.trials == off.trials
    differ = [row.name for row in rows[1:] if row.candidates != off.candidates]
    print("same candidates (instructions, demo sets) in every row: " + ("yes" if not differ else
          f"NO ({', '.join(differ)} made others: a sampled call, e.g. the dataset summary, answered differently)"))
    print(f"same trials searched (off vs on): {'yes' if same_trials else 'NO'}; same best combination: "
          f"{'yes' if on.best_params == off.best_params else 'NO'}; same best score: "
          f"{'yes' if on.best == off.best else 'NO'}")
    print("LM calls sent: requests the endpoint received; from cache: calls answered by the shared store "
          "(nothing sent, nothing paid).")
    if not same_trials:
        print("(the runs searched different combinations: beyond TPE's random start, W > 1 makes the search "
              "depend on which trial finishes first; see the docstring)")


if __name__ == "__main__":
    main()
