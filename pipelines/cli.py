"""The batch CLI of any task: its stage chain over a corpus, with every input checked before the first LM call.

    python -m pipelines triage --input data/sample_calls.jsonl --output out/triage
    python -m pipelines.triage --input ...                  # the same, for a built-in task
    python -m pipelines mypackage.sentiment --input ...     # your own task module
    ray job submit --working-dir . -- python -m pipelines triage --input ... --output ...

Flags come from the task: its text column is the ``--text-column`` default and
each resource its program needs becomes a flag (the RAG task's ``--index``).

Exit codes: 0 done; 2 bad input or settings (one line on stderr, no traceback, no LM
call made); 3 stopped at the budget (``--max-tokens`` / ``--max-cost``): every finished
row is written, the summary says how many are left, and the same command with
``--resume`` continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from pydantic import ValidationError

from dspy_ray.util.cli import HelpFormatter, add_embed_args, embed_flags, positive_float, positive_int
from dspy_ray.execution.artifacts import ALIASES, ProgramLoadError, best_artifact, latest_artifact
from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from pipelines.inputs import InputError, InputSpec
from dspy_ray.client.usage import Budget
from pipelines.runner import OutputError, RunResult, run_pipeline
from stages.base import DSPyStage
from tasks import Task, TaskError, get_task

_STAGE_DEFAULTS = DSPyStage.model_fields
EXIT_BUDGET = 3


def build_parser(task: Task, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=f"{task.name}: {task.description}",
                                     formatter_class=HelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="parquet/jsonl/csv file, a folder of them, or a folder of .txt; "
                                                   "a local path or s3://, gs://, file:// URI")
    io.add_argument("--output", required=True, help="output folder or object-store prefix (parquet dataset)")
    io.add_argument("--text-column", default=task.cli.text_column, help="column holding the text")
    io.add_argument("--id-column", default=task.cli.id_column, help="column holding row ids (generated if absent)")
    io.add_argument("--limit", type=positive_int, default=None, help="process only the first N rows (N >= 1)")
    io.add_argument("--resume", action="store_true", help="continue a killed run: skip ids already in --output")
    io.add_argument("--max-chars", type=positive_int, default=task.cli.max_chars,
                    help="truncate longer texts (noted in the row's errors)")
    task.add_resource_args(io)
    lm = parser.add_argument_group("LM endpoint (flags > environment > .env > cluster discovery > embedded model)")
    lm.add_argument("--lm-base-url", default=None, help="OpenAI-compatible base URL (env LM_BASE_URL)")
    lm.add_argument("--lm-model", default=None, help="model id (env LM_MODEL)")
    lm.add_argument("--lm-max-in-flight", type=positive_int, default=None,
                    help="ceiling on concurrent requests, all actors together; below it the number is found at "
                         "run time from the endpoint's answers (env LM_MAX_IN_FLIGHT; default: "
                         f"{EndpointSettings.model_fields['max_in_flight'].default})")
    if task.needs_embedder:
        add_embed_args(parser)
    run = parser.add_argument_group("execution")
    run.add_argument("--num-actors", type=positive_int, default=_STAGE_DEFAULTS["num_actors"].default,
                     help="actors per stage")
    run.add_argument("--concurrency", type=positive_int, default=None,
                     help="cap on rows in flight per actor (default: none; the endpoint's adaptive limit decides)")
    run.add_argument("--batch-size", type=positive_int, default=_STAGE_DEFAULTS["batch_size"].default,
                     help="rows per batch handed to an actor")
    run.add_argument("--refine-attempts", type=positive_int, default=task.refine_attempts,
                     help="attempts per row when the output fails validation (dspy.Refine after the first)")
    run.add_argument("--artifact-dir", default=None,
                     help="artifact registry (folder or URI that `python -m optimize --out` wrote): each stage "
                          "loads its program's --artifact from it")
    run.add_argument("--artifact", default="best", choices=list(ALIASES),
                     help="with --artifact-dir: the best-scoring or the newest artifact")
    budget = parser.add_argument_group("budget (reached: no new rows, finished rows written, exit code 3, "
                                       "--resume continues)")
    budget.add_argument("--max-tokens", type=positive_int, default=None,
                        help="stop taking new rows once this run's LM calls used this many tokens (prompt + "
                             "completion, all stages)")
    budget.add_argument("--max-cost", type=positive_float, default=None,
                        help="stop taking new rows once this run's LM calls cost this many USD (needs "
                             "LM_PRICE_IN / LM_PRICE_OUT or MODEL_PRICES)")
    if task.cli.embedded_artifacts:
        run.add_argument("--no-default-artifact", action="store_true",
                         help=f"on the embedded model, run the programs as written instead of the artifacts tuned "
                              f"for it ({task.cli.embedded_artifacts})")
    return parser


def lm_settings_from_args(args: argparse.Namespace) -> EndpointSettings:
    # The key is read from LM_API_KEY / .env only: a flag would land in shell history and `ps`.
    return resolve_settings("LM", flags={"base_url": args.lm_base_url, "model": args.lm_model,
                                         "max_in_flight": args.lm_max_in_flight})


def stage_chain(task: Task, args: argparse.Namespace, say: Callable[[str], None]) -> list[DSPyStage]:
    """The task's stages with this run's flags: execution settings, resources and artifacts."""
    resources = task.resource_settings(args)
    artifacts: dict[str, str | None] = {}
    if args.artifact_dir:
        pick = best_artifact if args.artifact == "best" else latest_artifact
        for name in task.programs:
            record = pick(args.artifact_dir, name)
            if record is None:
                say(f"no {name} artifact in {args.artifact_dir}: the {name} stage runs unoptimized")
            else:
                say(f"{name}: {args.artifact} artifact {record.path} (dev score {record.metadata.dev_score})")
                artifacts[name] = str(record.path)
    overrides = {
        "num_actors": args.num_actors,
        "max_in_flight_per_actor": args.concurrency,
        "batch_size": args.batch_size,
        "refine_attempts": args.refine_attempts,
        "artifact_dir": args.artifact_dir or "artifacts",
    }
    stages = task.stages_for(text_column=args.text_column, overrides=overrides, artifacts=artifacts)
    return [s.model_copy(update={"resources": {k: v for k, v in resources.items()
                                               if k in {r.name for r in s.program.resources}}}) for s in stages]


def embedded_default_hook(task: Task, args: argparse.Namespace,
                          say: Callable[[str], None]) -> Callable[[DSPyStage], str | None] | None:
    """What a stage with no artifact runs when the endpoint turns out to be the embedded model: the
    task's artifact tuned for that model, unless this run chose artifacts (``--artifact-dir``) or
    asked for the programs as written (``--no-default-artifact``).  None: no default."""
    if not task.cli.embedded_artifacts or args.artifact_dir or getattr(args, "no_default_artifact", False):
        return None

    def embedded_default(stage: DSPyStage) -> str | None:
        path = task.embedded_artifact(stage.program.name)
        if path:
            say(f"{stage.program.name}: the embedded model runs the artifact tuned for it, {path} "
                f"(--no-default-artifact: the program as written)")
        return path

    return embedded_default


def run_task(task: Task, args: argparse.Namespace) -> RunResult:
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    spec = InputSpec(args.input, text_column=args.text_column, id_column=args.id_column,
                     limit=args.limit, max_chars=args.max_chars)
    embed = resolve_settings("EMBED", flags=embed_flags(args)) if task.needs_embedder else None
    lm = lm_settings_from_args(args)
    if args.max_cost is not None and lm.price_in is None and lm.price_out is None:
        raise TaskError("--max-cost needs the model's price: set LM_PRICE_IN and LM_PRICE_OUT (USD per million "
                        "tokens) or a MODEL_PRICES entry for it")
    return run_pipeline(spec, args.output, stage_chain(task, args, say), lm,
                        embed_settings=embed, resume=args.resume, summary_columns=task.cli.summary_columns,
                        embedded_default=embedded_default_hook(task, args, say),
                        budget=Budget(args.max_tokens, args.max_cost))


def main(task_ref: str | Task, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``task_ref``'s batch pipeline with ``argv``; returns the exit code."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    try:
        task = get_task(task_ref)
    except TaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = build_parser(task, prog or f"python -m pipelines {task.name}").parse_args(argv)
    try:
        result = run_task(task, args)
    except (InputError, OutputError, ProgramLoadError, TaskError, ValidationError) as exc:
        print(f"error: {' '.join(str(exc).split())[:1000]}", file=sys.stderr)
        return 2
    print_result(result)
    return EXIT_BUDGET if result.stopped else 0


def print_result(result: RunResult) -> None:
    print(f"results: {result.output}")
    print(result.summary())
    if os.environ.get("PIPELINE_JSON_SUMMARY"):
        print(json.dumps({**result.__dict__, "rows_per_s": result.rows_per_s}))
