"""Parallel MIPROv2 vs DSPy's own sequential MIPROv2.compile: wall-clock, speedup and scores, side by side.

    python benchmarks/optimize_speedup.py                       # fake endpoint, 50 ms per call
    python benchmarks/optimize_speedup.py --trials 30 --workers 1 2 4 8

Both sides search the same candidates (this framework replays DSPy's RNG draws,
so with the deterministic fake endpoint the instruction and demo candidates are
identical; the script checks and prints it) for the same number of minibatch
trials, with the same minibatch size and full-evaluation schedule.  DSPy
evaluates with ``--threads`` threads; each of this framework's W workers gets
the same ``--threads``.  The fake endpoint runs in few-shot mode
(``tests.gold``), so better prompts really score higher.  Scores are on the
valset (what the search maximizes) and on the held-out dev set.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="fake endpoint seconds per call (default 0.05)")
    parser.add_argument("--trials", type=int, default=20, help="minibatch trials (default 20)")
    parser.add_argument("--candidates", type=int, default=6, help="candidates per predictor (default 6)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="W values (default 1 2 4)")
    parser.add_argument("--threads", type=int, default=4, help="examples in flight per evaluator (default 4)")
    parser.add_argument("--train", type=int, default=200, help="training rows used (default 200)")
    args = parser.parse_args()

    import dspy
    import ray
    from dspy.teleprompt import MIPROv2

    from dspy_ray.client.json_adapter import CachingJSONAdapter
    from dspy_ray.client.lm import build_lm
    from dspy_ray.execution.loading import load_program
    from dspy_ray.execution.scoring import DSPyMetric, EvalSummary
    from dspy_ray.endpoints.settings import EndpointSettings
    from optimize.config import SearchSettings, resolve_budget
    from optimize.data import split_train_val
    from optimize.evaluation import EvalContext, EvalRuntime
    from optimize.mipro import ParallelMIPROv2
    from optimize.storage import RunStorage
    from optimize.workers import WorkerPool
    from tasks import get_task
    from tasks.examples import load_task_data
    from dspy_ray.testing.fake_llm import FakeLLM
    from tests.gold import triage_gold

    logging.getLogger("dspy").setLevel(logging.ERROR)
    task = get_task("triage")
    train, dev = load_task_data(task.data, train_limit=args.train)
    search = SearchSettings(auto=None, num_candidates=args.candidates, num_trials=args.trials, val_size=100)
    budget = resolve_budget(search, 1, len(train))
    trainset, valset = split_train_val(train, budget.val_size, search.seed)
    print(f"fake endpoint {args.latency * 1000:.0f} ms/call; {len(trainset)} train, {len(valset)} val, {len(dev)} dev; "
          f"{args.candidates} candidates, {args.trials} trials x minibatch {budget.minibatch_size}, "
          f"full eval every {search.full_eval_steps}; {args.threads} threads per evaluator", flush=True)

    def dev_score(fake, program) -> float:
        ctx = EvalContext(task=task, lm=EndpointSettings(base_url=fake.base_url, model="fake-model", cache="off"),
                          threads=32)
        return EvalSummary.of(EvalRuntime(ctx).evaluate(program, dev), task.metric).score

    with FakeLLM(gold=triage_gold(["data/triage_train.jsonl", "data/triage_dev.jsonl"]), latency=args.latency) as fake:
        # No LM cache: each side pays for every call, as the comparison assumes (see optimize_cache.py for it).
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model", max_in_flight=256, cache="off")

        # -- DSPy's own MIPROv2, sequential trials -------------------------------------------------
        captured: dict = {}
        original_propose = MIPROv2._propose_instructions

        def capture(self, *a, **kw):
            captured["instructions"] = original_propose(self, *a, **kw)
            return captured["instructions"]

        MIPROv2._propose_instructions = capture
        dspy_lm = build_lm(settings)
        teleprompter = MIPROv2(metric=DSPyMetric(task.metric, name=task.name), prompt_model=dspy_lm, task_model=dspy_lm, auto=None, num_candidates=args.candidates,
                               num_threads=args.threads, seed=search.seed, verbose=False)
        fake.reset_stats()
        start = time.perf_counter()
        with dspy.context(lm=dspy_lm, adapter=CachingJSONAdapter()), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            best = teleprompter.compile(load_program(task.program).program, trainset=trainset, valset=valset,
                                        num_trials=args.trials, minibatch_size=budget.minibatch_size,
                                        minibatch_full_eval_steps=search.full_eval_steps,
                                        requires_permission_to_run=False)
        dspy_s = time.perf_counter() - start
        MIPROv2._propose_instructions = original_propose
        dspy_calls = fake.stats()["requests"]
        dspy_val = best.score / 100 if best.score > 1 else best.score
        rows = [("DSPy MIPROv2.compile (sequential)", dspy_s, 1.0, dspy_val, dev_score(fake, best), dspy_calls, "-",
                 0.0)]
        print(f"  DSPy done in {dspy_s:.1f} s", flush=True)

        # -- this framework, W workers ---------------------------------------------------------------
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        for workers in args.workers:
            ctx = EvalContext(task=task, lm=settings, threads=args.threads, num_cpus=0.01)
            start = time.perf_counter()
            pool = WorkerPool(ctx, workers)
            ray.get([actor.ready.remote() for actor in pool.actors])
            startup = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as run_dir, pool:
                optimizer = ParallelMIPROv2(search, budget, ctx, workers=workers, storage=RunStorage(run_dir),
                                            pool=pool, on_event=lambda line: None)
                fake.reset_stats()
                start = time.perf_counter()
                result = optimizer.compile(list(trainset), list(valset))
                seconds = time.perf_counter() - start
            ours = [p.instructions for p in result.candidates.predictors]
            theirs = [list(v) for _, v in sorted(captured.get("instructions", {}).items())]
            same = "yes" if ours == theirs else "NO"
            calls = fake.stats()["requests"]  # before the dev evaluation below adds its own
            rows.append((f"parallel MIPROv2, W={workers}", seconds, dspy_s / seconds, result.best_score,
                         dev_score(fake, result.candidates.apply(load_program(task.program).program,
                                                                 result.best_params)), calls, same, startup))
            print(f"  W={workers} done in {seconds:.1f} s (+{startup:.1f} s starting its workers)", flush=True)
        ray.shutdown()

    print()
    print(f"{'':36} {'wall s':>7} {'speedup':>8} {'target':>7} {'+start s':>8} {'speedup*':>8} {'val':>6} "
          f"{'dev':>6} {'LM calls':>8} {'same cand.':>10}")
    for name, seconds, speedup, val, dev_s, calls, same, startup in rows:
        w = name.rsplit("W=", 1)[-1] if "W=" in name else None
        target = f">={0.8 * int(w):.1f}" if w else "-"
        total = rows[0][1] / (seconds + startup)
        print(f"{name:36} {seconds:7.1f} {speedup:7.2f}x {target:>7} {startup:8.1f} {total:7.2f}x {val:6.3f} "
              f"{dev_s:6.3f} {calls:8d} {same:>10}")
    print("wall s: the compile, workers already up (as on a running cluster); +start s: starting the W Ray actors "
          "(each imports DSPy); speedup*: counting that start too.  val/dev: the result's valset/dev score.")


if __name__ == "__main__":
    main()
