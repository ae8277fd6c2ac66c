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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.client.limiter import ensure_coordinator
from dspy_ray.client.usage import Budget, RunMeter, Usage, total_of
from dspy_ray.corpus import InputError, InputFiles, InputSpec, discover
from dspy_ray.corpus.local import read_table
from dspy_ray.corpus.precheck import Checked, precheck
from dspy_ray.corpus.source import corpus_dataset, input_error_in
from dspy_ray.endpoints.fallback import open_endpoints
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.util.cli import EXIT_USAGE
from dspy_ray.util.fs import filesystem_for, is_uri
from dspy_ray.util.ray_runtime import init_ray
from pipelines.inputs import to_dataset
from pipelines.resume import Written, exclude_written, parquet_files, written_files
from stages.base import ERRORS_COLUMN, USAGE_COLUMN, DSPyStage

logger = logging.getLogger(__name__)

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
    ignored: list[str] = field(default_factory=list)  # input files of unsupported kinds, not read
    unreadable: list[str] = field(default_factory=list)  # "file: why" of documents that gave no text (first 20)
    unreadable_count: int = 0  # all of them: each is still a row, with the reason in its errors

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
        lines += self.usage_lines() + self.input_lines()
        if self.stopped:
            lines.append(f"stopped: budget reached ({self.stop_reason}) with {self.rows_left} rows left; every "
                         f"finished row is written; run the same command with --resume to continue")
        return "\n".join(lines + self.constant_output_warnings())

    def input_lines(self) -> list[str]:
        """Every input file accounted for: those of unsupported kinds, and documents that gave no text."""
        lines = []
        if self.ignored:
            more = f" and {len(self.ignored) - 10} more" if len(self.ignored) > 10 else ""
            lines.append(f"not read: {len(self.ignored)} files of unsupported kinds: "
                         f"{', '.join(self.ignored[:10])}{more}")
        if self.unreadable_count:
            lines.append(f"{self.unreadable_count} documents gave no text (a row each, the reason in its errors):")
            lines += [f"  {line}" for line in self.unreadable]
            if self.unreadable_count > len(self.unreadable):
                lines.append(f"  ... and {self.unreadable_count - len(self.unreadable)} more")
        return lines

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


# -- output -----------------------------------------------------------------


def prepare_output(output: str, resume: bool) -> Written:
    """Check the output location (a folder or an object-store prefix); with ``resume``, what is written there."""
    try:
        fs, root = filesystem_for(output)
        kind = fs.get_file_info(root).type
    except (OSError, ValueError) as exc:
        raise OutputError(f"output {output}: cannot open ({' '.join(str(exc).split())[:300]})") from None
    if kind == pafs.FileType.File:
        raise OutputError(f"output {output} exists and is not a directory")
    if parquet_files(fs, root) and not resume:
        raise OutputError(
            f"output {output} already holds results; pass --resume to continue that run, or choose a new --output"
        )
    check_writable(output, fs, root)
    return written_files(output) if resume else Written()


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


@dataclass
class CorpusPlan:
    """What the driver knows of the input before the stages start: never its rows."""

    found: InputFiles
    rows: int | None  # None: not counted (--no-precheck)
    table: pa.Table | None = None  # --limit: the first rows, read here
    checked: Checked | None = None


def plan_input(spec: InputSpec, precheck_first: bool) -> CorpusPlan:
    """List the corpus and check it (on the workers, no LM) before any LM call; ``--limit`` rows are read here."""
    found = discover(spec)
    if spec.limit is not None:
        table = read_table(found, spec)
        return CorpusPlan(found, table.num_rows, table=table)
    init_ray()
    # The job's limit service first: every stage actor joins it before its first LM call, and on a busy
    # node a worker process started later queues behind the read tasks' and the actors' own.
    ensure_coordinator()
    if not precheck_first:
        return CorpusPlan(found, None)
    checked = precheck(found, spec)
    return CorpusPlan(found, checked.rows, checked=checked)


MAX_BLOCK_ROWS = 1024  # a block's rows at most: a stage's output goes on to the next stage a block at a time
BLOCKS_PER_ACTOR = 4  # blocks for each actor calling the endpoint, about (within the bounds of block_rows)
# When the endpoint's limit cannot run every stage's waiting rows at once, a stage's actors get this many times
# the share of the next stage's.  Split evenly by rows, the second stage kept up with the first and ran out of rows;
# at the end it waited while the first finished its last blocks (a stage passes rows on a block at a time)
# and then ran those alone, the endpoint half idle.  Behind, it has rows for the slots the first frees as it
# ends.  (Ray Data's backpressure stops the first stage if the second falls far behind.)
EARLIER_STAGE_WEIGHT = 4.0


def block_rows(todo: int | None, batch_size: int, actors: int, on_endpoint: int) -> int:
    """Rows per block of a run's dataset: about four blocks for every actor calling the endpoint, so the work
    is shared and each stage passes its rows on while it runs (the next stage starts on a block as soon as
    the one before is done with it); at least a few batches, at most ``MAX_BLOCK_ROWS``; and at least two
    blocks per actor of a stage for a small corpus.  ``todo`` None (not counted): a few batches."""
    few = 4 * batch_size
    if todo is None:
        return few
    per_actor = -(-todo // (BLOCKS_PER_ACTOR * max(1, on_endpoint)))
    return max(1, min(-(-todo // (2 * max(1, actors))), max(few, min(MAX_BLOCK_ROWS, per_actor))))


def input_dataset(plan: CorpusPlan, spec: InputSpec, per_block: int, blocks: int | None = None):
    """The corpus as a dataset of about ``per_block`` rows a block, in at least ``blocks`` blocks.

    Ray Data joins what a read task yields into blocks of up to ``DataContext.target_max_block_size``
    (128 MiB): a read task's rows would reach the first stage as one block, and leave it as one, so the
    second stage would wait for the first to finish all of them.  A counted corpus is therefore read
    into ``blocks`` blocks (Ray Data cuts each read task's output evenly).
    """
    if plan.table is not None:
        return to_dataset(plan.table, rows_per_block=per_block)
    return corpus_dataset(plan.found, spec, rows_per_block=per_block, blocks=blocks,
                          types=plan.checked.types if plan.checked is not None else None)


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
    precheck_first: bool = True,
) -> RunResult:
    """Run ``stages`` over the corpus into ``output``.

    ``embed_settings``: when a stage's resources need an embedder.  ``embedded_default``: when
    the LM turns out to be the embedded model, the artifact a stage without one loads instead.
    ``budget``: ``--max-tokens`` / ``--max-cost``; once reached the run starts no new rows, writes
    every finished one and returns with ``stopped`` set (``--resume`` continues).
    ``precheck_first`` False (``--no-precheck``): no validation pre-pass; a bad file stops the run when
    a worker reaches it.
    """
    out = output if is_uri(output) else str(Path(output).resolve())
    written = prepare_output(out, resume)
    plan = plan_input(spec, precheck_first)  # every input problem is reported here, before any LM call
    resumed = written.rows if plan.rows is None else min(written.rows, plan.rows)
    todo = None if plan.rows is None else plan.rows - resumed
    start = time.perf_counter()
    stop_reason = None
    if todo is None or todo > 0:
        try:
            stop_reason = _run_stages(plan, spec, out, written, stages, lm_settings, embed_settings,
                                      embedded_default, budget, todo)
        except Exception as exc:
            found = input_error_in(exc)  # --no-precheck: a bad file met by a worker
            if found is not None:
                raise InputError(str(found)) from None
            raise
    seconds = time.perf_counter() - start
    result = summarize(out, resumed, seconds, summary_columns, before=written.files)
    result.stop_reason = stop_reason
    result.ignored = plan.found.unsupported
    if plan.checked is not None:
        result.unreadable, result.unreadable_count = plan.checked.unreadable, plan.checked.unreadable_count
    if stop_reason is not None:
        rows = plan.rows if plan.rows is not None else corpus_dataset(plan.found, spec).count()
        result.rows_left = max(0, rows - resumed - result.rows_this_run)
    return result


def _run_stages(plan: CorpusPlan, spec: InputSpec, out: str, written: Written, stages: list[DSPyStage],
                lm_settings: EndpointSettings, embed_settings: EndpointSettings | None,
                embedded_default: Callable[[DSPyStage], str | None] | None, budget: Budget | None,
                todo: int | None) -> str | None:
    """The stage chain over the rows not yet written, into ``out``; why it stopped taking rows, if it did."""
    import ray

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
            # Up before the first row: rows started while a stage's first report waits for the meter to
            # come up are rows the budget cannot stop.
            ray.get(meter.report.remote())
        on_endpoint = sum(stage.num_actors for stage in stages)
        per_block = block_rows(todo, max(stage.batch_size for stage in stages),
                               max(stage.num_actors for stage in stages), on_endpoint)
        blocks = -(-todo // per_block) if todo else None  # the rows to run (a resumed run reads the rest too)
        ds = exclude_written(input_dataset(plan, spec, per_block, blocks), out, written)
        for i, stage in enumerate(stages):
            ds = stage.apply(ds, settings, embed_settings=endpoints.embed, rows_per_block=per_block,
                             actors_on_endpoint=on_endpoint, run_meter=meter_name, budget_gate=i == 0,
                             share_weight=EARLIER_STAGE_WEIGHT ** (len(stages) - 1 - i))
        ds.write_parquet(out)  # a local folder or an object-store URI (Ray Data writes from the workers)
        if meter is None:
            return None
        stop_reason = ray.get(meter.report.remote())["stop_reason"]
        ray.kill(meter)
        return stop_reason


# -- the summary -------------------------------------------------------------


def file_summary(path: str, fs: pafs.FileSystem, columns: tuple[str, ...]) -> dict:
    """One output file's rows, rows with errors, label counts and LM usage per stage, by Arrow compute."""
    with fs.open_input_file(path) as f:
        names = pq.read_schema(f).names
    t = pq.read_table(path, columns=[c for c in (ERRORS_COLUMN, USAGE_COLUMN, *columns) if c in names],
                      filesystem=fs)
    found: dict = {"rows": t.num_rows, "with_errors": 0, "labels": {}, "usage": {}}
    if ERRORS_COLUMN in t.column_names:
        found["with_errors"] = pc.sum(pc.greater(pc.fill_null(pc.list_value_length(t[ERRORS_COLUMN]), 0), 0)).as_py() or 0
    for col in columns:
        if col in t.column_names:
            counts = pc.value_counts(t[col].combine_chunks())
            found["labels"][col] = {"null" if v is None else str(v): n for v, n in
                                    zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())}
    if USAGE_COLUMN in t.column_names and t.num_rows:
        usage = t[USAGE_COLUMN].combine_chunks()
        for stage in (usage.type.field(i).name for i in range(usage.type.num_fields)):
            found["usage"][stage] = _stage_usage(pc.struct_field(usage, stage))
    return found


def _stage_usage(stage: pa.StructArray) -> dict:
    """Totals of one stage's usage struct over the rows that called the LM or the cache; ``rows``: how many."""
    def field(name: str) -> pa.Array:
        return pc.struct_field(stage, name) if stage.type.get_field_index(name) >= 0 else pa.nulls(len(stage), pa.int64())

    used = pc.fill_null(pc.or_(pc.greater(field("calls"), 0), pc.greater(field("cached"), 0)), False)
    picked = {name: pc.filter(field(name), used) for name in Usage.__dataclass_fields__}
    totals = {name: pc.sum(values).as_py() for name, values in picked.items()}
    return {**{k: (v or 0) if k != "cost_usd" else v for k, v in totals.items()}, "rows": pc.sum(used).as_py() or 0}


def summarize(out: str, resumed: int, seconds: float, columns: tuple[str, ...], *,
              before: tuple[str, ...] = ()) -> RunResult:
    """Read the output's files back (``before``: those there before this run): rows, errors, label counts,
    and the LM usage of the rows this run wrote; one small dict per file, computed where Ray runs."""
    fs, root = filesystem_for(out)
    paths = parquet_files(fs, root)
    summaries = _per_file(paths, fs, columns)
    result = RunResult(out, 0, 0, resumed, seconds)
    usage: dict[str, Usage] = {}
    rows_run: Counter = Counter()
    old = set(before)
    for path, found in zip(paths, summaries):
        result.rows_total += found["rows"]
        result.rows_with_errors += found["with_errors"]
        if path not in old:
            result.rows_this_run += found["rows"]
        for col, counts in found["labels"].items():
            merged = result.label_counts.setdefault(col, {})
            for key, n in counts.items():
                merged[key] = merged.get(key, 0) + n
        for stage, data in found["usage"].items() if path not in old else ():
            if data["rows"]:
                usage.setdefault(stage, Usage()).add(Usage.from_dict(data))
                rows_run[stage] += data["rows"]
    result.usage = {stage: {**u.as_dict(), "rows": rows_run[stage]} for stage, u in usage.items()}
    return result


def _per_file(paths: list[str], fs: pafs.FileSystem, columns: tuple[str, ...]) -> list[dict]:
    """:func:`file_summary` of each file: as Ray tasks when Ray is up (the files are read on the workers)."""
    import ray

    if not ray.is_initialized() or len(paths) < 2:
        return [file_summary(p, fs, columns) for p in paths]
    task = ray.remote(num_cpus=0.25)(file_summary)
    return ray.get([task.remote(p, fs, columns) for p in paths])
