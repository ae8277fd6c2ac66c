"""One optimization run, start to finish: data, estimate, baseline, search, artifact, report.

    >>> result = run_optimization(OptimizeConfig(task="triage", optimizer="miprov2", workers=4),
    ...                           lm_settings=resolve_settings("LM"))          # doctest: +SKIP
    >>> result.artifact, result.optimized.score                                # doctest: +SKIP

Every step that costs LM calls leaves its result in the run directory
(:class:`~optimize.storage.RunStorage`) before the next starts, so a run killed
anywhere (a preempted spot node, Ctrl-C) continues with ``resume=True`` and
redoes nothing that finished: the dev baseline, the candidates, every trial and
full evaluation, the optimized program's dev score.  The run directory is tied
to its settings and data by a fingerprint; resuming with other settings is an
error naming the settings that differ, not a silent mix.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from dspy_ray.client.cache.config import pinned_location
from dspy_ray.client.limiter import ensure_coordinator
from dspy_ray.execution.artifacts import ArtifactMetadata, redacted_settings, save_artifact, sidecar_path
from dspy_ray.endpoints.fallback import open_endpoints
from dspy_ray.util.fs import filesystem_for, is_uri, write_bytes
from dspy_ray.execution.loading import load_program
from dspy_ray.util.ray_runtime import init_ray
from dspy_ray.execution.scoring import EvalSummary, ExampleScore
from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from optimize.config import OptimizeConfig, OptimizeError, ResolvedBudget, resolve_budget, saved_fingerprint_fields
from optimize.data import dataset_hash, split_train_val
from dspy_ray.client.usage import Usage, merge_by_key, process_usage, total_of, usage_since
from optimize.estimate import CallEstimate, cost_line, tokens_per_call
from optimize.evaluation import EvalContext, evaluate_on_ray
from optimize.optimizers import OPTIMIZERS, Optimizer, RunProgress, SearchJob, SearchOutcome, Sizes
from optimize.report import TrajectoryPoint, plot_trajectory, score_table
from optimize.storage import RunStorage
from optimize.workers import WorkerPool
from tasks import Task, get_task
from tasks.examples import DatasetError, extra_train_examples, load_task_data
from dspy_ray.util.cli import EXIT_BUDGET, EXIT_ENDPOINT, EXIT_INTERRUPTED, say

logger = logging.getLogger(__name__)


class TooManyCalls(OptimizeError):
    """The call estimate exceeds ``--max-calls``."""
    exit_code = EXIT_BUDGET  # what a command line exits with (dspy_ray.util.cli)


class EndpointFailed(OptimizeError):
    """Every LM call of a step failed: the endpoint, not the settings (``--resume`` continues once it answers)."""
    exit_code = EXIT_ENDPOINT  # what a command line exits with (dspy_ray.util.cli)


class Interrupted(OptimizeError):
    """Ctrl-C (or SIGTERM) during a run: what was saved, and where."""
    exit_code = EXIT_INTERRUPTED  # what a command line exits with (dspy_ray.util.cli)

    def __init__(self, storage: RunStorage):
        self.run_dir = storage.uri
        progress = RunProgress.read(storage)
        saved = [f"{progress.trials} trial(s)", f"{progress.full_evals} full evaluation(s)"]
        if progress.candidates:
            saved.insert(0, "the candidates")
        if progress.compiled:
            saved.insert(0, "the compiled program")
        super().__init__(f"{', '.join(saved)} saved in {storage.uri}")


@dataclass
class OptimizeResult:
    artifact: str
    plot: str
    run_dir: str
    baseline: EvalSummary
    optimized: EvalSummary
    estimate: CallEstimate
    seconds: float
    trials_evaluated_this_run: list[int] = field(default_factory=list)
    judge_errors_during_search: int = 0
    usage: dict[str, dict] = field(default_factory=dict)  # endpoint (base_url|model) -> this run's LM usage


# -- data and plan ----------------------------------------------------------------------


def load_data(cfg: OptimizeConfig, task: Task) -> tuple[list[dspy.Example], list[dspy.Example]]:
    if task.data is None:
        raise OptimizeError(f"task {task.name!r} declares no labelled data; it cannot be optimized")
    train, dev = load_task_data(task.data, train_path=cfg.train_path, dev_path=cfg.dev_path,
                                train_limit=cfg.train_limit, dev_limit=cfg.dev_limit)
    if cfg.extra_train:
        references = {j.field: j.reference for j in task.metric.judged}
        extra, skipped = extra_train_examples(cfg.extra_train, task.data, references, cfg.extra_train_min_score)
        known = {e.id for e in dev} | {t.id for t in train}
        extra = [e for e in extra if e.id not in known]
        say(f"extra training rows from {cfg.extra_train}: {len(extra)} used, {skipped} skipped "
             f"(unlabelled or judged below {cfg.extra_train_min_score})")
        train = train + extra
    if not dev:
        raise DatasetError("the dev set is empty")
    return train, dev


@dataclass
class RunPlan:
    task: Task
    optimizer: Optimizer
    budget: ResolvedBudget
    trainset: list[dspy.Example]
    valset: list[dspy.Example]
    dev: list[dspy.Example]
    data_hash: str
    num_predictors: int


def plan_run(cfg: OptimizeConfig) -> RunPlan:
    task = get_task(cfg.task)
    if cfg.optimizer not in OPTIMIZERS:
        raise OptimizeError(f"unknown optimizer {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    train, dev = load_data(cfg, task)
    missing = [r.flag for r in task.program.resources if not cfg.resources.get(r.name)]
    if missing:
        raise OptimizeError(f"task {task.name!r} needs {', '.join(missing)}")
    num_predictors = len(task.program.skeleton().predictors())
    budget = resolve_budget(cfg.search, num_predictors, len(train))
    trainset, valset = split_train_val(train, budget.val_size, cfg.search.seed)
    return RunPlan(task, OPTIMIZERS[cfg.optimizer](cfg, budget), budget, trainset, valset, dev,
                   dataset_hash(trainset, valset, dev), num_predictors)


def estimate_run(cfg: OptimizeConfig, plan: RunPlan, progress: RunProgress) -> CallEstimate:
    sizes = Sizes(n_train=len(plan.trainset), n_val=len(plan.valset), n_dev=len(plan.dev),
                  num_predictors=plan.num_predictors, judge=cfg.judge)
    est = CallEstimate()
    plan.optimizer.estimate(est, sizes, progress)
    dev_left = 2 - len(progress.dev_done & {"baseline", "optimized"})
    est.add(f"dev evaluation ({dev_left} of baseline + result) x {sizes.n_dev}",
            dev_left * sizes.n_dev * sizes.calls_per_example)
    return est


# -- the run directory ------------------------------------------------------------------


def locate_run(cfg: OptimizeConfig, task: Task) -> RunStorage:
    """``--run-dir``, or under ``<out>/runs/``: a new folder, or with ``--resume`` the newest of this task and optimizer."""
    if cfg.run_dir:
        return RunStorage(cfg.run_dir)
    runs = RunStorage(f"{cfg.out.rstrip('/')}/runs")
    prefix = f"{task.name}-{cfg.optimizer}-"
    if cfg.resume:
        mine = [name for name in runs.list_dirs() if name.startswith(prefix) and runs.exists(f"{name}/run.json")]
        if mine:
            return RunStorage(f"{runs.uri}/{max(mine)}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return RunStorage(f"{runs.uri}/{prefix}{stamp}")


def check_run(storage: RunStorage, cfg: OptimizeConfig, fields: dict[str, Any]) -> None:
    """Refuse a run directory that holds another run, or a resume with different settings (named)."""
    record = storage.read_json("run.json")
    if record is None:
        if not storage.is_empty():
            raise OptimizeError(f"{storage.uri} is not empty and is not a run directory; pick another --run-dir")
        if cfg.resume:
            say(f"--resume: nothing to resume in {storage.uri}; starting a new run there")
        return
    if not cfg.resume:
        raise OptimizeError(f"{storage.uri} already holds a run; add --resume to continue it, "
                            f"or pass another --run-dir to start over")
    saved = saved_fingerprint_fields(record)
    differ = sorted(k for k in set(saved) | set(fields) if saved.get(k) != fields.get(k))
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} then, {fields.get(k)!r} now" for k in differ[:6])
        raise OptimizeError(f"cannot resume {storage.uri}: it was started with other settings ({detail}); "
                            f"resume with the same flags, or start a new run without --resume")


def dev_summary(storage: RunStorage, name: str, program: dspy.Module, dev: list[dspy.Example], task: Task,
                pool: WorkerPool) -> EvalSummary:
    """Score ``program`` on the dev set once per run (stored under dev/<name>.json)."""
    state = program.dump_state()
    saved = storage.read_json(f"dev/{name}.json")
    if saved is not None and saved.get("state") == state:
        return EvalSummary.of([ExampleScore.model_validate(s) for s in saved["scores"]], task.metric)
    scores = evaluate_on_ray(program, dev, pool)
    summary = EvalSummary.of(scores, task.metric)
    if summary.n and summary.lm_failures == summary.n:
        first = next(s.program_error for s in scores if s.program_error)
        raise EndpointFailed(f"every LM call of the {name} dev evaluation failed ({first}); "
                            f"fix the endpoint and run again with --resume")
    storage.write_json(f"dev/{name}.json", {"state": state, "scores": [s.model_dump() for s in scores]})
    return summary


# -- the run ------------------------------------------------------------------------------


def run_optimization(
    cfg: OptimizeConfig,
    lm_settings: EndpointSettings,
    judge_settings: EndpointSettings | None = None,
    embed_settings: EndpointSettings | None = None,
) -> OptimizeResult:
    """Run (or resume) one optimization and write its artifact; see the module docstring.

    ``embed_settings``: the embedding endpoint, for tasks whose resources need one (default: resolved
    from the environment and ``.env``, then discovery, then the embedded embedder)."""
    start = time.perf_counter()
    plan = plan_run(cfg)
    storage = locate_run(cfg, plan.task)
    progress = RunProgress.read(storage) if cfg.resume else RunProgress()
    estimate = estimate_run(cfg, plan, progress)
    say(f"{cfg.optimizer} on {plan.task.name}: {len(plan.trainset)} train, {len(plan.valset)} val, "
         f"{len(plan.dev)} dev examples; {cfg.workers} worker(s); {plan.optimizer.plan()}")
    say(("estimated LM calls still to make:\n" if cfg.resume else "estimated LM calls:\n") + estimate.table())
    cost = estimate_cost(cfg, plan, estimate, lm_settings)
    say(f"  {cost}")
    if cfg.max_calls is not None and estimate.total > cfg.max_calls:
        raise TooManyCalls(f"estimated {estimate.total:,} LM calls ({cost}) exceed --max-calls {cfg.max_calls:,}; "
                           f"lower --auto/--num-trials/--num-candidates or raise --max-calls")
    if cfg.judge and judge_settings is None:
        judge_settings = EndpointSettings()  # unset: discovery, else the target judges
    if plan.task.needs_embedder and embed_settings is None:
        embed_settings = resolve_settings("EMBED")
    try:
        return _run(cfg, plan, storage, estimate, lm_settings, judge_settings, embed_settings, start)
    except KeyboardInterrupt:
        raise Interrupted(storage) from None


def estimate_cost(cfg: OptimizeConfig, plan: RunPlan, estimate: CallEstimate, lm: EndpointSettings) -> str:
    """The estimate's calls priced at the model's price (judge calls counted at the same price)."""
    if lm.price_in is None and lm.price_out is None:
        return cost_line(estimate.total, None, None, None)
    demos = cfg.search.max_bootstrapped_demos + cfg.search.max_labeled_demos
    tokens = tokens_per_call(plan.task.program.skeleton(), plan.dev[0], demos=demos, max_tokens=lm.max_tokens)
    return cost_line(estimate.total, tokens, lm.price_in, lm.price_out)


def _run(cfg: OptimizeConfig, plan: RunPlan, storage: RunStorage, estimate: CallEstimate,
         lm_settings: EndpointSettings, judge_settings: EndpointSettings | None,
         embed_settings: EndpointSettings | None, start: float) -> OptimizeResult:
    init_ray()
    ensure_coordinator()  # the endpoint's limit service, owned here: it outlives any worker that is lost
    before = process_usage()  # this process's own calls (GEPA reflects from the driver)
    with open_endpoints(lm=lm_settings, judge=judge_settings if cfg.judge else None,
                        embed=embed_settings) as endpoints:
        lm, judge = _pinned_cache(endpoints.lm), _pinned_cache(endpoints.judge)
        # Opened here, once the embedder is up: a missing or broken index fails before any LM call.
        resources = plan.task.program.open_resources(cfg.resources, endpoints.embed)

        def fresh_program() -> dspy.Module:
            return load_program(plan.task.program, resources=resources).program

        fields = cfg.fingerprint_fields(plan.data_hash, lm.model)
        check_run(storage, cfg, fields)
        say(f"run directory: {storage.uri}" + (" (resuming)" if storage.exists("run.json") else ""))
        if not storage.exists("run.json"):
            storage.write_json("run.json", {
                "fingerprint": cfg.fingerprint(plan.data_hash, lm.model), "fingerprint_fields": fields,
                "config": cfg.public(), "lm": redacted_settings(lm), "judge": redacted_settings(judge) if judge else None,
                "estimate": estimate.lines, "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            })
        ctx = EvalContext(task=plan.task, lm=lm, judge=judge, embed=endpoints.embed, resources=cfg.resources,
                          num_cpus=cfg.worker_cpus, threads=_threads(cfg, lm, judge))
        with WorkerPool(ctx, cfg.workers) as pool:
            baseline = dev_summary(storage, "baseline", fresh_program(), plan.dev, plan.task, pool)
            say(f"baseline dev score: {baseline.score:.3f} on {baseline.n} examples")
            job = SearchJob(cfg, plan.budget, ctx, pool, storage, plan.trainset, plan.valset, fresh_program, say)
            outcome = plan.optimizer.run(job)
            program = load_program(plan.task.program, state=outcome.state, resources=resources).program
            optimized = dev_summary(storage, "optimized", program, plan.dev, plan.task, pool)
            usage = pool.usage()
    usage = merge_by_key(usage, usage_since(before))
    result = finish(cfg, plan, storage, lm, judge, program, outcome, baseline, optimized, estimate, start)
    result.usage = usage
    return result


def _pinned_cache(settings: EndpointSettings | None) -> EndpointSettings | None:
    """``settings`` with a relative LM cache folder made absolute: every worker opens the store this process names."""
    if settings is None:
        return None
    return settings.model_copy(update={"cache": pinned_location(settings.cache)})


def _threads(cfg: OptimizeConfig, lm: EndpointSettings, judge: EndpointSettings | None) -> int:
    """Each worker's share of the endpoints' in-flight ceilings (judge calls run inside the same slots)."""
    threads = max(1, min(cfg.threads_per_worker, lm.max_in_flight // cfg.workers))
    if judge is not None:
        threads = max(1, min(threads, judge.max_in_flight // cfg.workers))
    return threads


def finish(cfg: OptimizeConfig, plan: RunPlan, storage: RunStorage, lm: EndpointSettings,
           judge: EndpointSettings | None, program: dspy.Module, outcome: SearchOutcome, baseline: EvalSummary,
           optimized: EvalSummary, estimate: CallEstimate, start: float) -> OptimizeResult:
    """The artifact, its plot and the run record (a finished run resumed again returns its artifact)."""
    result = OptimizeResult(artifact="", plot="", run_dir=storage.uri, baseline=baseline, optimized=optimized,
                            estimate=estimate, seconds=0.0, trials_evaluated_this_run=outcome.evaluated_now,
                            judge_errors_during_search=outcome.judge_errors)
    done = storage.read_json("result.json")
    if done is not None:  # a resumed run that had already finished: same artifact, no second copy
        say(f"the run had finished: artifact {done['artifact']}")
        result.artifact, result.plot = done["artifact"], done["plot"]
        result.seconds = time.perf_counter() - start
        return result
    metadata = ArtifactMetadata(
        program=plan.task.program.name, model=lm.model, lm=redacted_settings(lm),
        judge=redacted_settings(judge) if judge else None, optimizer=cfg.optimizer,
        optimizer_settings={**cfg.search.model_dump(), **plan.budget.model_dump(), "workers": cfg.workers},
        command=cfg.command({r.name: r.flag for r in plan.task.resources}), dataset_hash=plan.data_hash, dev_score=round(optimized.score, 4),
        baseline_dev_score=round(baseline.score, 4), dev_field_accuracy=optimized.field_accuracy,
        run_dir=storage.uri, dev_judge_errors=optimized.judge_errors, dev_program_errors=optimized.program_errors,
    )
    result.artifact = save_artifact(program, cfg.out, metadata)
    last = max([p.step for p in outcome.points] + [1])
    dev_points = [TrajectoryPoint(step=0, score=baseline.score, kind="dev", n=baseline.n),
                  TrajectoryPoint(step=last, score=optimized.score, kind="dev", n=optimized.n)]
    result.plot = save_plot(outcome.points + dev_points, result.artifact[: -len(".json")] + ".trajectory.png",
                            title=f"{plan.task.name}: {cfg.optimizer} ({cfg.workers} workers), dev "
                                  f"{baseline.score:.3f} -> {optimized.score:.3f}")
    result.seconds = time.perf_counter() - start
    storage.write_json("result.json", {"artifact": result.artifact, "plot": result.plot,
                                       "baseline": baseline.model_dump(), "optimized": optimized.model_dump()})
    if cfg.mlflow:
        log_to_mlflow(cfg, result, metadata)
    return result


def save_plot(points: list[TrajectoryPoint], path: str, *, title: str) -> str:
    """The trajectory PNG next to the artifact (uploaded when the artifact directory is a URI)."""
    if not is_uri(path):
        return str(plot_trajectory(points, path, title=title))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="plot-") as tmp:
        local = plot_trajectory(points, Path(tmp) / "trajectory.png", title=title)
        write_bytes(*filesystem_for(path), local.read_bytes())
    return path


def log_to_mlflow(cfg: OptimizeConfig, result: OptimizeResult, metadata: ArtifactMetadata) -> bool:
    """Params, dev metrics and the artifact files to MLflow (``MLFLOW_TRACKING_URI``); False if not installed."""
    try:
        import mlflow
    except ImportError:
        say("--mlflow: mlflow is not installed (pip install -e .[mlflow]); skipped")
        return False
    with mlflow.start_run(run_name=f"{cfg.task}-{cfg.optimizer}"):
        mlflow.log_params({"task": cfg.task, "optimizer": cfg.optimizer, "workers": cfg.workers,
                           "model": metadata.model, "dataset_hash": metadata.dataset_hash,
                           **{f"search.{k}": v for k, v in cfg.search.model_dump().items()}})
        mlflow.log_metrics({"dev_score": result.optimized.score, "baseline_dev_score": result.baseline.score,
                            **{f"dev_{k}_accuracy": v for k, v in result.optimized.field_accuracy.items()},
                            "dev_judge_errors": result.optimized.judge_errors})
        for path in (result.artifact, str(sidecar_path(result.artifact)), result.plot):
            if Path(path).is_file():
                mlflow.log_artifact(path)
    return True


def print_report(result: OptimizeResult) -> None:
    print(score_table(result.baseline, result.optimized))
    if result.judge_errors_during_search:
        print(f"judge errors during the search: {result.judge_errors_during_search} (scored without the judge)")
    if result.usage:
        print(f"LM usage this run: {total_of(result.usage.values()).describe()}")
        for endpoint, data in sorted(result.usage.items()):
            print(f"  {endpoint.rsplit('|', 1)[-1]}: {Usage.from_dict(data).describe()}")
    print(f"artifact: {result.artifact}")
    print(f"trajectory plot: {result.plot}")
    print(f"run directory: {result.run_dir}  ({result.seconds:.1f} s)")
