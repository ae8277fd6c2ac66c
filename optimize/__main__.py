"""Optimize a task's program and write a versioned artifact.

    python -m optimize --task triage --optimizer miprov2 --auto light --workers 4 --out artifacts/
    ray job submit --working-dir . -- python -m optimize --task triage --run-dir s3://bucket/runs/t1 ...
    python -m optimize ... --resume          # continue a killed run; finished trials are not redone

Prints the estimated LM calls first (and stops if they exceed --max-calls),
progress while it runs, and at the end a baseline-vs-optimized table on the dev
set, the artifact path and a trajectory plot.  Exit codes: 0 done, 2 bad input
or settings, 3 the call estimate exceeds --max-calls, 4 the endpoint failed,
130 interrupted (what was saved and the command to resume are printed).
``--pipeline`` is the older spelling of ``--task``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from dspy_ray.client.cache.flags import add_cache_arg, cache_choice
from dspy_ray.util.cli import (EXIT_OK, HelpFormatter, add_endpoint_args, add_task_arg, endpoint_flags,
                               parse_with_task, positive_int, report_error, say)
from optimize.config import OptimizeConfig, SearchSettings
from optimize.optimizers import OPTIMIZERS
from tasks import Task, get_task, task_names

TASK_ALIASES = ("--pipeline",)  # the older spelling, still accepted
_SEARCH_FLAGS = ("num_candidates", "num_trials", "minibatch_size", "full_eval_steps", "max_bootstrapped_demos",
                 "max_labeled_demos", "seed", "val_size", "breadth", "depth")
_ZERO_OK = {"max_bootstrapped_demos", "max_labeled_demos", "seed"}  # the other search flags count something


def build_parser(task: Task | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optimize", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_task_arg(p, aliases=TASK_ALIASES, names=task_names(),
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
    p.add_argument("--judge", action="store_true", help="score free-text outputs with the judge LM (JUDGE_* settings; unset: the "
                                                    "target at temperature 0)")
    p.add_argument("--mlflow", action="store_true", help="log params, metrics and the artifact to MLflow")
    data = p.add_argument_group("data")
    data.add_argument("--train", dest="train_path", default=None, help="training JSONL (default: the task's)")
    data.add_argument("--dev", dest="dev_path", default=None, help="dev JSONL (default: the task's)")
    data.add_argument("--train-limit", type=positive_int, default=None, help="use the first N training rows")
    data.add_argument("--dev-limit", type=positive_int, default=None, help="use the first N dev rows")
    data.add_argument("--extra-train", default=None, help="extra training JSONL (gold rows or judged drift samples)")
    if task is not None:
        task.add_resource_args(data)
    search = p.add_argument_group("search (defaults follow DSPy's MIPROv2)")
    for name in _SEARCH_FLAGS:
        info = SearchSettings.model_fields[name]
        search.add_argument(f"--{name.replace('_', '-')}", type=int if name in _ZERO_OK else positive_int,
                            default=info.default, help=info.description)
    add_endpoint_args(p, "LM", in_flight=True)
    add_endpoint_args(p, "JUDGE")
    add_cache_arg(p)
    if task is not None and task.needs_embedder:
        add_endpoint_args(p, "EMBED")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Task]:
    """Two passes: ``--task`` first, so the task's own flags (its resources) join the parser."""
    return parse_with_task(argv, build_parser, get_task, aliases=TASK_ALIASES)


def config_from_args(args: argparse.Namespace, task: Task) -> OptimizeConfig:
    search = {k: getattr(args, k) for k in SearchSettings.model_fields if getattr(args, k, None) is not None}
    search["auto"] = None if args.auto == "none" else args.auto
    return OptimizeConfig(
        task=args.task, optimizer=args.optimizer, search=SearchSettings(**search), workers=args.workers,
        threads_per_worker=args.threads_per_worker, out=args.out, run_dir=args.run_dir, resume=args.resume,
        max_calls=args.max_calls, judge=args.judge, mlflow=args.mlflow, train_path=args.train_path,
        dev_path=args.dev_path, train_limit=args.train_limit, dev_limit=args.dev_limit, extra_train=args.extra_train,
        resources=task.resource_settings(args),
    )


def resume_command(argv: list[str] | None, run_dir: str) -> str:
    """This command line again, with ``--resume`` and the run directory it saved to."""
    command = shlex.join(["python", "-m", "optimize", *(argv if argv is not None else sys.argv[1:])])
    if "--resume" not in command.split():
        command += " --resume"
    if "--run-dir" not in command.split():
        command += f" --run-dir {shlex.quote(run_dir)}"
    return command


def main(argv: list[str] | None = None) -> int:
    from dspy_ray.endpoints.settings import resolve_settings
    from optimize.run import Interrupted, print_report, run_optimization

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    args, task = parse_args(argv)
    try:
        cfg = config_from_args(args, task)
        lm = cache_choice(resolve_settings("LM", flags=endpoint_flags(args, "LM")), args.cache)
        judge = cache_choice(resolve_settings("JUDGE", flags=endpoint_flags(args, "JUDGE")), args.cache)
        embed = resolve_settings("EMBED", flags=endpoint_flags(args, "EMBED")) if task.needs_embedder else None
        result = run_optimization(cfg, lm, judge, embed)
    except Interrupted as exc:
        say(f"interrupted: {exc}; resume with: {resume_command(argv, exc.run_dir)}")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - report_error re-raises what declares no exit code: a bug, in full
        return report_error(exc)
    print_report(result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
