"""What every batch run shares: output checks, resume, Ray, the stage chain, writing, the summary.

A run is a task's stage chain over a corpus (the CLI is :mod:`pipelines.cli`)::

    result = run_pipeline(
        InputSpec("data/sample_calls.jsonl", text_column="transcript"), "out/triage",
        get_task("triage").stages_for(), lm_settings=resolve_settings("LM"),
    )
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.endpoints.fallback import open_endpoints
from dspy_ray.util.fs import filesystem_for, is_uri
from dspy_ray.client.limiter import ensure_coordinator
from dspy_ray.util.ray_runtime import init_ray
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.client.usage import Budget, RunMeter, Usage, total_of
from pipelines.inputs import InputSpec, load_corpus, to_dataset
from stages.base import ERRORS_COLUMN, USAGE_COLUMN, DSPyStage
from dspy_ray.util.cli import EXIT_USAGE

logger = logging.getLogger(__name__)

QUARANTINE_DIR = "_incomplete"


class OutputError(ValueError):
    """The output location cannot be used as asked."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


@dataclass
class RunResult:
    output: str
    rows_total: int  # rows in the output directory after this run
    rows_this_run: int  # rows written by this run
    rows_resumed: int  # rows found already written and skipped
    seconds: float
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    rows_with_errors: int = 0
    rows_left: int = 0  # rows of the input not written: the budget was reached first
    stop_reason: str | None = None  # why the run stopped taking rows (the budget), None when it finished
    usage: dict[str, dict] = field(default_factory=dict)  # stage -> Usage as a dict, this run's LM calls

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None and self.rows_left > 0

    def summary(self) -> str:
        labels = "; ".join(
            f"{col}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            for col, counts in self.label_counts.items()
        )
        resumed = f" ({self.rows_resumed} already done, skipped)" if self.rows_resumed else ""
        lines = [
            f"wrote {self.rows_this_run} rows{resumed} to {self.output} in {self.seconds:.1f}s "
            f"({self.rows_per_s:.1f} rows/s); {self.rows_total} rows in total, "
            f"{self.rows_with_errors} with errors; {labels}"
        ]
        lines += self.usage_lines()
        if self.stopped:
            lines.append(f"stopped: budget reached ({self.stop_reason}) with {self.rows_left} rows left; every "
                         f"finished row is written; run the same command with --resume to continue")
        return "\n".join(lines + self.constant_output_warnings())

    def usage_lines(self) -> list[str]:
        """One line per stage and a total: LM calls sent, retries, answers from the cache, tokens, cost, calls
        per row."""
        if not self.usage:
            return []
        lines = []
        for stage, data in self.usage.items():
            usage = Usage.from_dict(data)
            rows = data.get("rows") or self.rows_this_run
            per_row = f", {usage.calls / rows:.2f} calls/row" if rows else ""
            lines.append(f"  {stage}: {usage.describe()}{per_row}")
        return [f"LM usage this run: {total_of(self.usage.values()).describe()}", *lines]

    def constant_output_warnings(self, min_rows: int = 20, share: float = 0.9) -> list[str]:
        """One line per label column where one value covers more than ``share`` of ``min_rows`` or more rows."""
        out = []
        for col, counts in self.label_counts.items():
            total = sum(counts.values())
            if total < min_rows:
                continue
            value, n = max(counts.items(), key=lambda kv: kv[1])
            if n / total > share:
                out.append(f"warning: {n / total:.0%} of {total} rows have {col}={value}: the model or the prompt "
                           f"may not be reading the input (try a tuned artifact, or a stronger model)")
        return out


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
    check_writable(output, fs, root)
    return written_ids(output) if resume else set()


def check_writable(output: str, fs: pafs.FileSystem, root: str) -> None:
    """Create the output folder and write (then delete) a probe file, so a read-only target fails before any LM call."""
    probe = f"{root.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
        raise OutputError(f"output {output} is not writable ({reason})") from None


# -- running ----------------------------------------------------------------


def run_pipeline(
    spec: InputSpec,
    output: str,
    stages: list[DSPyStage],
    lm_settings: EndpointSettings,
    *,
    embed_settings: EndpointSettings | None = None,
    resume: bool = False,
    summary_columns: tuple[str, ...] = (),
    embedded_default: Callable[[DSPyStage], str | None] | None = None,
    budget: Budget | None = None,
) -> RunResult:
    """Run ``stages`` over the corpus into ``output``.

    ``embed_settings``: when a stage's resources need an embedder.  ``embedded_default``: when
    the LM turns out to be the embedded model, the artifact a stage without one loads instead.
    ``budget``: ``--max-tokens`` / ``--max-cost``; once reached the run starts no new rows, writes
    every finished one and returns with ``stopped`` set (``--resume`` continues).
    """
    import ray

    out = output if is_uri(output) else str(Path(output).resolve())
    done = prepare_output(out, resume)
    table = load_corpus(spec)  # every input problem is reported here, before any LM call
    todo = table.filter(pa.compute.invert(pa.compute.is_in(table.column("id"), pa.array(sorted(done), pa.string()))))
    resumed = table.num_rows - todo.num_rows
    start = time.perf_counter()
    stop_reason = None
    if todo.num_rows:
        init_ray()
        with open_endpoints(lm=lm_settings, embed=embed_settings) as endpoints:
            settings = endpoints.lm
            if settings.origin == "embedded" and embedded_default is not None:
                stages = [s if s.artifact else s.model_copy(update={"artifact": embedded_default(s)}) for s in stages]
            ray.data.DataContext.get_current().enable_progress_bars = True
            # The endpoint's limit lives in an actor of this driver, so it lasts as long as the run.
            ensure_coordinator()
            meter_name, meter = None, None
            if budget is not None and budget.set:  # what the rows spend, gathered while they run
                meter_name = f"dspy-run-meter-{uuid.uuid4().hex[:12]}"
                meter = ray.remote(num_cpus=0)(RunMeter).options(name=meter_name).remote(budget.max_tokens,
                                                                                          budget.max_cost)
            # Blocks of a few batches, and at least two per actor, so a small corpus still keeps every
            # actor (and, streaming, every stage) busy at once.
            actors = max(stage.num_actors for stage in stages)
            per_block = max(1, min(4 * max(stage.batch_size for stage in stages), -(-todo.num_rows // (2 * actors))))
            ds = to_dataset(todo, rows_per_block=per_block)
            on_endpoint = sum(stage.num_actors for stage in stages)
            for i, stage in enumerate(stages):
                ds = stage.apply(ds, settings, embed_settings=endpoints.embed, rows_per_block=per_block,
                                 actors_on_endpoint=on_endpoint, run_meter=meter_name, budget_gate=i == 0)
            ds.write_parquet(out)  # a local folder or an object-store URI (Ray Data writes from the workers)
            if meter is not None:
                stop_reason = ray.get(meter.report.remote())["stop_reason"]
                ray.kill(meter)
    seconds = time.perf_counter() - start
    result = summarize(out, resumed, seconds, summary_columns, done=done)
    result.stop_reason = stop_reason
    result.rows_left = max(0, todo.num_rows - result.rows_this_run)
    return result


def summarize(out: str, resumed: int, seconds: float, columns: tuple[str, ...], *,
              done: set[str] | frozenset[str] = frozenset()) -> RunResult:
    """Read the output back: rows, errors, label counts, and the LM usage of the rows this run wrote
    (``done``: the ids that were there before it)."""
    fs, root = filesystem_for(out)
    wanted = ["id", ERRORS_COLUMN, USAGE_COLUMN, *columns]
    result = RunResult(out, 0, 0, resumed, seconds)
    usage: dict[str, Usage] = {}
    rows_run: Counter = Counter()
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
        if USAGE_COLUMN in t.column_names:
            ids = t.column("id").to_pylist()
            for rid, row in zip(ids, t.column(USAGE_COLUMN).to_pylist()):
                if rid in done or not row:
                    continue
                for stage, data in row.items():
                    if data and (data.get("calls") or data.get("cached")):
                        usage.setdefault(stage, Usage()).add(Usage.from_dict(data))
                        rows_run[stage] += 1
    result.rows_this_run = result.rows_total - len(done)
    result.usage = {stage: {**u.as_dict(), "rows": rows_run[stage]} for stage, u in usage.items()}
    return result
