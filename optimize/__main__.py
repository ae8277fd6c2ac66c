"""Optimize a task's program and write a versioned artifact.

    python -m optimize --pipeline triage --optimizer miprov2 --auto light --workers 4 --out artifacts/
    ray job submit --working-dir . -- python -m optimize --pipeline triage --run-dir s3://bucket/runs/t1 ...
    python -m optimize ... --resume          # continue a killed run; finished trials are not redone

Prints the estimated LM calls first (and stops if they exceed --max-calls),
progress while it runs, and at the end a baseline-vs-optimized table on the dev
set, the artifact path and a trajectory plot.  Exit codes: 0 done, 2 bad input
or settings, 3 the call estimate exceeds --max-calls, 4 the endpoint failed,
130 interrupted (what was saved and the command to resume are printed).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from dspy_ray.util.cli import HelpFormatter, add_embed_args, embed_flags, positive_int
from optimize.config import OptimizeConfig, SearchSettings
from optimize.optimizers import OPTIMIZERS
from tasks import Task, TaskError, get_task, task_names


def build_parser(task: Task | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optimize", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--pipeline", required=True, metavar="TASK",
                   help=f"task to optimize: {', '.join(task_names())}, or your own 'package.module[:ATTR]'")
    p.add_argument("--optimizer", default="miprov2", choices=list(OPTIMIZERS))
    p.add_argument("--auto", default="light", choices=["light", "medium", "heavy", "none"],
                   help="budget preset, as DSPy's MIPROv2/GEPA (none: set --num-candidates/--num-trials)")
    p.add_argument("--workers", type=positive_int, default=4, help="Ray workers evaluating trials at once")
    p.add_argument("--threads-per-worker", type=positive_int, default=8, help="examples in flight per worker")
    p.add_argument("--out", default="artifacts", help="artifact directory (a folder or URI)")
    p.add_argument("--run-dir", default=None, help="run state: a path or s3://, gs://, fsspec URI "
                                                   "(default: a new <out>/runs/<task>-<optimizer>-<time>; with "
                                                   "--resume the newest of those)")
    p.add_argument("--resume", action="store_true", help="continue a killed run (same flags as when it started)")
    p.add_argument("--max-calls", type=int, default=None,
                   help="stop before starting if the estimate (of the work left, when resuming) exceeds this")
    p.add_argument("--judge", action="store_true", help="score free-text outputs with the judge LM (JUDGE_* settings)")
    p.add_argument("--mlflow", action="store_true", help="log params, metrics and the artifact to MLflow")
    data = p.add_argument_group("data")
    data.add_argument("--train", dest="train_path", default=None, help="training JSONL (default: the task's)")
    data.add_argument("--dev", dest="dev_path", default=None, help="dev JSONL (default: the task's)")
    data.add_argument("--train-limit", type=int, default=None, help="use the first N training rows")
    data.add_argument("--dev-limit", type=int, default=None, help="use the first N dev rows")
    data.add_argument("--extra-train", default=None, help="extra training JSONL (gold rows or judged drift samples)")
    if task is not None:
        task.add_resource_args(data)
    search = p.add_argument_group("search (defaults follow DSPy's MIPROv2)")
    for name in ("num_candidates", "num_trials", "minibatch_size", "full_eval_steps", "max_bootstrapped_demos",
                 "max_labeled_demos", "seed", "val_size", "breadth", "depth"):
        info = SearchSettings.model_fields[name]
        search.add_argument(f"--{name.replace('_', '-')}", type=int, default=info.default, help=info.description)
    lm = p.add_argument_group("LM endpoints (flags > environment > .env > cluster discovery > embedded model)")
    lm.add_argument("--lm-base-url", default=None, help="target base URL (env LM_BASE_URL)")
    lm.add_argument("--lm-model", default=None, help="target model id (env LM_MODEL)")
    lm.add_argument("--lm-max-in-flight", type=int, default=None,
                    help="ceiling on concurrent requests to the target, all workers together (env LM_MAX_IN_FLIGHT)")
    lm.add_argument("--judge-base-url", default=None, help="judge base URL (env JUDGE_BASE_URL)")
    lm.add_argument("--judge-model", default=None, help="judge model id (env JUDGE_MODEL)")
    if task is not None and task.needs_embedder:
        add_embed_args(p)
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Task | None]:
    """Two passes: ``--pipeline`` first, so the task's own flags (its resources) join the parser."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--pipeline")
    known, _ = pre.parse_known_args(argv)
    task = None
    if known.pipeline:
        try:
            task = get_task(known.pipeline)
        except TaskError as exc:
            build_parser().error(str(exc))
    return build_parser(task).parse_args(argv), task


def config_from_args(args: argparse.Namespace, task: Task) -> OptimizeConfig:
    search = {k: getattr(args, k) for k in SearchSettings.model_fields if getattr(args, k, None) is not None}
    search["auto"] = None if args.auto == "none" else args.auto
    return OptimizeConfig(
        pipeline=args.pipeline, optimizer=args.optimizer, search=SearchSettings(**search), workers=args.workers,
        threads_per_worker=args.threads_per_worker, out=args.out, run_dir=args.run_dir, resume=args.resume,
        max_calls=args.max_calls, judge=args.judge, mlflow=args.mlflow, train_path=args.train_path,
        dev_path=args.dev_path, train_limit=args.train_limit, dev_limit=args.dev_limit, extra_train=args.extra_train,
        resources=task.resource_settings(args),
    )


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from dspy_ray.execution.artifacts import ProgramLoadError
    from dspy_ray.endpoints.settings import resolve_settings
    from tasks.examples import DatasetError
    from optimize.mipro import SearchError
    from optimize.run import Interrupted, OptimizeError, TooManyCalls, print_report, run_optimization

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    args, task = parse_args(argv)
    try:
        cfg = config_from_args(args, task)
        lm = resolve_settings("LM", flags={"base_url": args.lm_base_url, "model": args.lm_model,
                                           "max_in_flight": args.lm_max_in_flight})
        judge = resolve_settings("JUDGE", flags={"base_url": args.judge_base_url, "model": args.judge_model})
        embed = resolve_settings("EMBED", flags=embed_flags(args)) if task.needs_embedder else None
        result = run_optimization(cfg, lm, judge, embed)
    except Interrupted as exc:
        resume = shlex.join(["python", "-m", "optimize", *(argv if argv is not None else sys.argv[1:])])
        if "--resume" not in resume.split():
            resume += " --resume"
        if "--run-dir" not in resume.split():
            resume += f" --run-dir {shlex.quote(exc.run_dir)}"
        print(f"interrupted: {exc}; resume with: {resume}", file=sys.stderr)
        return 130
    except TooManyCalls as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except (OptimizeError, DatasetError, ProgramLoadError, ValidationError) as exc:
        text = str(exc)
        if isinstance(exc, ValidationError):
            text = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: {text}", file=sys.stderr)
        return 4 if isinstance(exc, OptimizeError) and "LM call" in text else 2
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
