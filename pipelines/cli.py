"""The batch CLI of any task: its stage chain over a corpus, with every input checked before the first LM call.

    python -m pipelines --task triage --input data/sample_calls.jsonl --output out/triage
    python -m pipelines triage --input ...                  # the same (the task first, without --task)
    python -m pipelines.triage --input ...                  # the same, for a built-in task
    python -m pipelines --task mypackage.sentiment --input ...     # your own task module
    ray job submit --working-dir . -- python -m pipelines --task triage --input ... --output ...

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
from collections.abc import Callable

from dspy_ray.client.cache.flags import add_cache_arg, cache_choice
from dspy_ray.client.usage import Budget
from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from dspy_ray.execution.artifacts import ALIASES, best_artifact, latest_artifact
from dspy_ray.util.cli import (
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_OK,
    HelpFormatter,
    add_endpoint_args,
    add_task_arg,
    endpoint_flags,
    parse_with_task,
    positive_float,
    positive_int,
    report_error,
    say,
)
from pipelines.inputs import InputSpec
from pipelines.runner import RunResult, run_pipeline
from stages.base import DSPyStage
from tasks import Task, TaskError, get_task, task_names

_STAGE_DEFAULTS = DSPyStage.model_fields


def build_parser(task: Task | None, prog: str, *, task_flag: bool = False) -> argparse.ArgumentParser:
    """The batch flags of ``task``; ``task_flag``: ``--task`` comes first (``python -m pipelines``; an entry
    point such as ``python -m pipelines.triage`` fixes the task).  None: only ``--task``, to say it is missing."""
    if task is None:
        parser = argparse.ArgumentParser(prog=prog, description="a task's batch pipeline",
                                         formatter_class=HelpFormatter)
        add_task_arg(parser, names=task_names())
        return parser
    parser = argparse.ArgumentParser(prog=prog, description=f"{task.name}: {task.description}",
                                     formatter_class=HelpFormatter)
    if task_flag:
        add_task_arg(parser, names=task_names())
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="parquet/jsonl/csv file, a folder of them, or a folder of "
                                                   "documents (txt, md, rst, html, pdf, docx, eml: one row each); "
                                                   "a local path or s3://, gs://, file:// URI")
    io.add_argument("--output", required=True, help="output folder or object-store prefix (parquet dataset)")
    io.add_argument("--text-column", default=task.cli.text_column, help="column holding the text")
    io.add_argument("--id-column", default=task.cli.id_column, help="column holding row ids (generated if absent)")
    io.add_argument("--limit", type=positive_int, default=None, help="process only the first N rows (N >= 1)")
    io.add_argument("--resume", action="store_true", help="continue a killed run: skip ids already in --output")
    io.add_argument("--no-precheck", dest="precheck", action="store_false",
                    help="skip the validation pass over the whole input before the first LM call (for a corpus "
                         "known to be good: a bad file then stops the run when a worker reaches it)")
    io.add_argument("--max-chars", type=positive_int, default=task.cli.max_chars,
                    help="truncate longer texts (noted in the row's errors)")
    task.add_resource_args(io)
    add_endpoint_args(parser, "LM", in_flight=True)
    if task.needs_embedder:
        add_endpoint_args(parser, "EMBED")
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
    add_cache_arg(run)
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
    return cache_choice(resolve_settings("LM", flags=endpoint_flags(args, "LM")), getattr(args, "cache", True))


def stage_chain(task: Task, args: argparse.Namespace, say: Callable[[str], None] = say) -> list[DSPyStage]:
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
                          say: Callable[[str], None] = say) -> Callable[[DSPyStage], str | None] | None:
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
    spec = InputSpec(args.input, text_column=args.text_column, id_column=args.id_column,
                     limit=args.limit, max_chars=args.max_chars)
    embed = resolve_settings("EMBED", flags=endpoint_flags(args, "EMBED")) if task.needs_embedder else None
    lm = lm_settings_from_args(args)
    if args.max_cost is not None and lm.price_in is None and lm.price_out is None:
        raise TaskError("--max-cost needs the model's price: set LM_PRICE_IN and LM_PRICE_OUT (USD per million "
                        "tokens) or a MODEL_PRICES entry for it")
    return run_pipeline(spec, args.output, stage_chain(task, args), lm,
                        embed_settings=embed, resume=args.resume, summary_columns=task.cli.summary_columns,
                        embedded_default=embedded_default_hook(task, args),
                        budget=Budget(args.max_tokens, args.max_cost), precheck_first=args.precheck)


def parse_args(task_ref: str | Task | None, argv: list[str] | None, prog: str | None
               ) -> tuple[argparse.Namespace, Task]:
    """``task_ref`` None: the task is ``--task`` in ``argv`` (two passes, its flags join the parser)."""
    if task_ref is None:
        return parse_with_task(argv, lambda task: build_parser(task, prog or "python -m pipelines", task_flag=True),
                               get_task)
    task = get_task(task_ref)
    return build_parser(task, prog or f"python -m pipelines {task.name}").parse_args(argv), task


def main(task_ref: str | Task | None = None, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run a task's batch pipeline with ``argv``; returns the exit code.

    ``task_ref``: the task an entry point fixes (``python -m pipelines.triage``); None: ``--task`` names it.
    """
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    try:
        args, task = parse_args(task_ref, argv, prog)
    except TaskError as exc:
        return report_error(exc)
    try:
        result = run_task(task, args)
    except KeyboardInterrupt:  # Ctrl-C, or SIGINT from a scheduler: one line, not a traceback
        say(f"interrupted: the rows finished so far are in {args.output}; run the same command with --resume "
            f"to continue")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - report_error re-raises what declares no exit code: a bug, in full
        return report_error(exc)
    print_result(result)
    return EXIT_BUDGET if result.stopped else EXIT_OK


def print_result(result: RunResult) -> None:
    print(f"results: {result.output}")
    print(result.summary())
    if os.environ.get("PIPELINE_JSON_SUMMARY"):
        print(json.dumps({**result.__dict__, "rows_per_s": result.rows_per_s}))
