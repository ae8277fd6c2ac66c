"""What every batch pipeline shares: endpoint setup, Ray, resume, writing, the summary.

A pipeline is a list of stages plus a CLI (see :mod:`pipelines.triage`)::

    result = run_pipeline(
        InputSpec("data/sample_calls.jsonl"), "out/triage",
        [TriageStage(), ExtractDetailsStage()], lm_settings=EndpointSettings.resolve("LM"),
    )
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.inputs import InputError, InputSpec, load_corpus, to_dataset
from stages.base import ERRORS_COLUMN, DSPyStage
from stages.config import EndpointSettings, dotenv_runtime_env
from stages.discovery import discover_endpoints
from stages.fs import filesystem_for, is_uri

logger = logging.getLogger(__name__)

QUARANTINE_DIR = "_incomplete"


class OutputError(ValueError):
    """The output location cannot be used as asked."""


@dataclass
class RunResult:
    output: str
    rows_total: int  # rows in the output directory after this run
    rows_this_run: int
    rows_resumed: int  # rows found already written and skipped
    seconds: float
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    rows_with_errors: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        labels = "; ".join(
            f"{col}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            for col, counts in self.label_counts.items()
        )
        resumed = f" ({self.rows_resumed} already done, skipped)" if self.rows_resumed else ""
        return (
            f"wrote {self.rows_this_run} rows{resumed} to {self.output} in {self.seconds:.1f}s "
            f"({self.rows_per_s:.1f} rows/s); {self.rows_total} rows in total, "
            f"{self.rows_with_errors} with errors; {labels}"
        )


# -- resume -----------------------------------------------------------------


def _parquet_files(fs: pafs.FileSystem, root: str) -> list[str]:
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def written_ids(output: str) -> set[str]:
    """Ids already in ``output``'s parquet files; unreadable (half-written) files are set aside."""
    fs, root = filesystem_for(output)
    done: set[str] = set()
    for path in _parquet_files(fs, root):
        try:
            ids = pq.read_table(path, columns=["id"], filesystem=fs).column("id").to_pylist()
        except Exception as exc:  # noqa: BLE001 - a killed writer leaves truncated files
            quarantine = f"{root.rstrip('/')}/{QUARANTINE_DIR}"
            fs.create_dir(quarantine, recursive=True)
            name = path.rsplit("/", 1)[-1]
            fs.move(path, f"{quarantine}/{name}")
            logger.warning("set aside unreadable output file %s (%s); its rows will be redone", name, exc)
            continue
        done.update(ids)
    return done


def prepare_output(output: str, resume: bool) -> set[str]:
    """Check the output location (a folder or an object-store prefix) and return the ids already there."""
    try:
        fs, root = filesystem_for(output)
        kind = fs.get_file_info(root).type
    except (OSError, ValueError) as exc:
        raise OutputError(f"output {output}: cannot open ({' '.join(str(exc).split())[:300]})") from None
    if kind == pafs.FileType.File:
        raise OutputError(f"output {output} exists and is not a directory")
    if _parquet_files(fs, root) and not resume:
        raise OutputError(
            f"output {output} already holds results; pass --resume to continue that run, or choose a new --output"
        )
    return written_ids(output) if resume else set()


# -- running ----------------------------------------------------------------


def per_actor_budget(stages: list[DSPyStage], settings: EndpointSettings) -> int:
    """Split the endpoint's global in-flight budget across every actor that calls it."""
    actors = sum(stage.num_actors for stage in stages)
    per_actor = max(1, settings.max_in_flight // actors)
    return min(per_actor, max(stage.max_in_flight_per_actor for stage in stages))


@contextlib.contextmanager
def endpoint(settings: EndpointSettings):
    """The configured endpoint, or the embedded llama.cpp server for the duration of the run."""
    if not settings.embedded:
        yield settings
        return
    from stages.embedded import EmbeddedLM

    print("no LM endpoint configured (LM_BASE_URL): starting the embedded llama.cpp model", file=sys.stderr)
    with EmbeddedLM.start() as server:
        # Only what the user set (flags, environment, .env) overrides the embedded server's own defaults.
        chosen = settings.model_fields_set & {"temperature", "max_tokens", "max_attempts"}
        yield server.settings(**{k: getattr(settings, k) for k in chosen})


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env = dotenv_runtime_env()
    # Under `ray job submit` RAY_ADDRESS is set and this attaches to that cluster.
    ray.init(runtime_env=runtime_env or None, log_to_driver=True)


def run_pipeline(
    spec: InputSpec,
    output: str,
    stages: list[DSPyStage],
    lm_settings: EndpointSettings,
    *,
    resume: bool = False,
    summary_columns: tuple[str, ...] = (),
) -> RunResult:
    import ray

    out = output if is_uri(output) else str(Path(output).resolve())
    done = prepare_output(out, resume)
    table = load_corpus(spec)  # every input problem is reported here, before any LM call
    todo = table.filter(pa.compute.invert(pa.compute.is_in(table.column("id"), pa.array(sorted(done), pa.string()))))
    resumed = table.num_rows - todo.num_rows
    start = time.perf_counter()
    if todo.num_rows:
        init_ray()
        lm_settings, _ = discover_endpoints(lm_settings)  # the cluster's Serve LLM app when LM_BASE_URL is unset
        with endpoint(lm_settings) as settings:
            ray.data.DataContext.get_current().enable_progress_bars = True
            # Blocks of a few batches, and at least two per actor, so a small corpus still keeps every
            # actor (and, streaming, every stage) busy at once.
            actors = max(stage.num_actors for stage in stages)
            per_block = min(4 * max(stage.batch_size for stage in stages), -(-todo.num_rows // (2 * actors)))
            ds = to_dataset(todo, rows_per_block=max(1, per_block))
            budget = per_actor_budget(stages, settings)
            for stage in stages:
                ds = stage.apply(ds, settings, max_in_flight=budget)
            ds.write_parquet(out)  # a local folder or an object-store URI (Ray Data writes from the workers)
    seconds = time.perf_counter() - start
    return summarize(out, todo.num_rows, resumed, seconds, summary_columns)


def summarize(out: str, rows_this_run: int, resumed: int, seconds: float, columns: tuple[str, ...]) -> RunResult:
    fs, root = filesystem_for(out)
    wanted = ["id", ERRORS_COLUMN, *columns]
    result = RunResult(out, 0, rows_this_run, resumed, seconds)
    for path in _parquet_files(fs, root):
        with fs.open_input_file(path) as f:
            names = pq.read_schema(f).names
        t = pq.read_table(path, columns=[c for c in wanted if c in names], filesystem=fs)
        result.rows_total += t.num_rows
        if ERRORS_COLUMN in t.column_names:
            result.rows_with_errors += sum(1 for e in t.column(ERRORS_COLUMN).to_pylist() if e)
        for col in columns:
            if col in t.column_names:
                counts = result.label_counts.setdefault(col, {})
                for value, n in Counter(t.column(col).to_pylist()).items():
                    key = "null" if value is None else str(value)
                    counts[key] = counts.get(key, 0) + n
    return result


# -- CLI helpers ------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="parquet/jsonl/csv file, a folder of them, or a folder of .txt; "
                                                       "a local path or s3://, gs://, file:// URI")
    io.add_argument("--output", required=True, help="output folder or object-store prefix (parquet dataset)")
    io.add_argument("--text-column", default="transcript", help="column holding the text (default: transcript)")
    io.add_argument("--id-column", default="id", help="column holding row ids (default: id; generated if absent)")
    io.add_argument("--limit", type=int, default=None, help="process only the first N rows")
    io.add_argument("--resume", action="store_true", help="continue a killed run: skip ids already in --output")
    io.add_argument("--max-chars", type=int, default=20_000, help="truncate longer texts (noted in errors)")
    lm = parser.add_argument_group("LM endpoint (flags > environment > .env; none = embedded llama.cpp model)")
    lm.add_argument("--lm-base-url", default=None, help="OpenAI-compatible base URL (env LM_BASE_URL)")
    lm.add_argument("--lm-model", default=None, help="model id (env LM_MODEL)")
    lm.add_argument("--lm-max-in-flight", type=int, default=None, help="global concurrent requests (LM_MAX_IN_FLIGHT)")
    run = parser.add_argument_group("execution")
    run.add_argument("--num-actors", type=int, default=2, help="actors per stage (default: 2)")
    run.add_argument("--concurrency", type=int, default=64, help="requests in flight per actor (default: 64)")
    run.add_argument("--batch-size", type=int, default=16, help="rows per batch (default: 16)")
    run.add_argument("--refine-attempts", type=int, default=3, help="dspy.Refine attempts on invalid output")
    run.add_argument("--program-dir", default=None, help="folder with optimized <program>.json files to load")
    run.add_argument("--artifact-dir", default=None,
                     help="artifact registry (folder or URI, what `python -m optimize --out` wrote): each stage "
                          "loads its program's --artifact from it")
    run.add_argument("--artifact", default="best", choices=["best", "latest"],
                     help="with --artifact-dir: the best-scoring or the newest artifact (default: best)")


def lm_settings_from_args(args: argparse.Namespace) -> EndpointSettings:
    # The key is read from LM_API_KEY / .env only: a flag would land in shell history and `ps`.
    return EndpointSettings.resolve(
        "LM",
        flags={"base_url": args.lm_base_url, "model": args.lm_model, "max_in_flight": args.lm_max_in_flight},
    )


def stage_overrides(args: argparse.Namespace, program: str) -> dict:
    path = Path(args.program_dir) / f"{program}.json" if args.program_dir else None
    program_path = str(path) if path and path.exists() else None
    if getattr(args, "artifact_dir", None):
        from programs.artifacts import best_artifact, latest_artifact

        record = (best_artifact if args.artifact == "best" else latest_artifact)(args.artifact_dir, program)
        if record is None:
            print(f"no {program} artifact in {args.artifact_dir}: the {program} stage runs unoptimized",
                  file=sys.stderr)
        else:
            print(f"{program}: {args.artifact} artifact {record.path} (dev score {record.metadata.dev_score})",
                  file=sys.stderr)
            program_path = str(record.path)
    return {
        "num_actors": args.num_actors,
        "max_in_flight_per_actor": args.concurrency,
        "batch_size": args.batch_size,
        "refine_attempts": args.refine_attempts,
        "program_path": program_path,
    }


def main_guard(fn) -> int:
    """Turn expected errors into one clear line on stderr and exit code 2."""
    from programs import ProgramLoadError

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    try:
        fn()
        return 0
    except (InputError, OutputError, ProgramLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def print_result(result: RunResult) -> None:
    print(f"results: {result.output}")
    print(result.summary())
    if os.environ.get("PIPELINE_JSON_SUMMARY"):
        print(json.dumps({**result.__dict__, "rows_per_s": result.rows_per_s}))
