"""Optimize a pipeline's program and write a versioned artifact.

    python -m optimize --pipeline triage --optimizer miprov2 --auto light --workers 4 --out artifacts/
    ray job submit --working-dir . -- python -m optimize --pipeline triage --run-dir s3://bucket/runs/t1 ...
    python -m optimize ... --resume          # continue a killed run; finished trials are not redone

Prints the estimated LM calls first (and stops if they exceed --max-calls),
progress while it runs, and at the end a baseline-vs-optimized table on the dev
set, the artifact path and a trajectory plot.  Exit codes: 0 done, 2 bad input
or settings, 3 the call estimate exceeds --max-calls, 4 the endpoint failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from optimize.config import OptimizeConfig, SearchSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optimize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="triage", help="pipeline to optimize (default: triage)")
    p.add_argument("--optimizer", default="miprov2", choices=["miprov2", "bootstrap", "bootstrap_rs", "copro", "gepa"])
    p.add_argument("--auto", default="light", choices=["light", "medium", "heavy", "none"],
                   help="budget preset, as DSPy's MIPROv2/GEPA (none: set --num-candidates/--num-trials)")
    p.add_argument("--workers", type=int, default=4, help="Ray workers evaluating trials at once (default: 4)")
    p.add_argument("--threads-per-worker", type=int, default=8, help="examples in flight per worker (default: 8)")
    p.add_argument("--out", default="artifacts", help="artifact directory (default: artifacts)")
    p.add_argument("--run-dir", default=None, help="run state: a path or s3://, gs://, fsspec URI "
                                                   "(default: <out>/runs/<pipeline>-<optimizer>-<fingerprint>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--max-calls", type=int, default=None, help="stop before starting if the estimate exceeds this")
    p.add_argument("--judge", action="store_true", help="score summaries with the judge LM (JUDGE_* settings)")
    p.add_argument("--mlflow", action="store_true", help="log params, metrics and the artifact to MLflow")
    data = p.add_argument_group("data")
    data.add_argument("--train", dest="train_path", default=None, help="training JSONL (default: the pipeline's)")
    data.add_argument("--dev", dest="dev_path", default=None, help="dev JSONL (default: the pipeline's)")
    data.add_argument("--train-limit", type=int, default=None, help="use the first N training rows")
    data.add_argument("--dev-limit", type=int, default=None, help="use the first N dev rows")
    data.add_argument("--extra-train", default=None, help="extra training JSONL (gold rows or judged drift samples)")
    search = p.add_argument_group("search (defaults follow DSPy's MIPROv2)")
    for name in ("num_candidates", "num_trials", "minibatch_size", "full_eval_steps", "max_bootstrapped_demos",
                 "max_labeled_demos", "seed", "val_size", "breadth", "depth"):
        info = SearchSettings.model_fields[name]
        search.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=info.description)
    lm = p.add_argument_group("LM endpoints (flags > environment > .env; none = embedded llama.cpp model)")
    lm.add_argument("--lm-base-url", default=None, help="target base URL (env LM_BASE_URL)")
    lm.add_argument("--lm-model", default=None, help="target model id (env LM_MODEL)")
    lm.add_argument("--lm-max-in-flight", type=int, default=None,
                    help="global concurrent requests to the target, shared by all workers (LM_MAX_IN_FLIGHT)")
    lm.add_argument("--judge-base-url", default=None, help="judge base URL (env JUDGE_BASE_URL)")
    lm.add_argument("--judge-model", default=None, help="judge model id (env JUDGE_MODEL)")
    return p


def config_from_args(args: argparse.Namespace) -> OptimizeConfig:
    search = {k: getattr(args, k) for k in SearchSettings.model_fields if getattr(args, k, None) is not None}
    search["auto"] = None if args.auto == "none" else args.auto
    return OptimizeConfig(
        pipeline=args.pipeline, optimizer=args.optimizer, search=SearchSettings(**search), workers=args.workers,
        threads_per_worker=args.threads_per_worker, out=args.out, run_dir=args.run_dir, resume=args.resume,
        max_calls=args.max_calls, judge=args.judge, mlflow=args.mlflow, train_path=args.train_path,
        dev_path=args.dev_path, train_limit=args.train_limit, dev_limit=args.dev_limit, extra_train=args.extra_train,
    )


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from optimize.data import DatasetError
    from optimize.mipro import SearchError
    from optimize.run import OptimizeError, TooManyCalls, print_report, run_optimization
    from programs.loading import ProgramLoadError
    from stages.config import EndpointSettings

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        lm = EndpointSettings.resolve("LM", flags={"base_url": args.lm_base_url, "model": args.lm_model,
                                                   "max_in_flight": args.lm_max_in_flight})
        judge = EndpointSettings.resolve("JUDGE", flags={"base_url": args.judge_base_url, "model": args.judge_model})
        result = run_optimization(cfg, lm, judge)
    except TooManyCalls as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except (OptimizeError, DatasetError, ProgramLoadError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            exc = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: {exc}", file=sys.stderr)
        return 4 if isinstance(exc, OptimizeError) and "LM call" in str(exc) else 2
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
