"""One optimization run, start to finish: data, estimate, baseline, search, artifact, report.

    >>> result = run_optimization(OptimizeConfig(pipeline="triage", optimizer="miprov2", workers=4),
    ...                           lm_settings=EndpointSettings.resolve("LM"))          # doctest: +SKIP
    >>> result.artifact, result.optimized.score                                       # doctest: +SKIP

Every step that costs LM calls leaves its result in the run directory
(:class:`~optimize.storage.RunStorage`) before the next starts, so a run killed
anywhere (a preempted spot node, Ctrl-C) continues with ``resume=True`` and
redoes nothing that finished: the dev baseline, the candidates, every trial and
full evaluation, the optimized program's dev score.  The run directory is tied
to its settings and data by a fingerprint; resuming with other settings is an
error, not a silent mix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from optimize.config import OptimizeConfig, ResolvedBudget, resolve_budget
from optimize.data import (
    PIPELINES,
    DatasetError,
    PipelineSpec,
    dataset_hash,
    extra_train_examples,
    load_pipeline_data,
    split_train_val,
)
from optimize.estimate import CallEstimate, estimate_calls
from optimize.evaluation import EvalContext, EvalLog, evaluate_on_ray, module_from_state, ray_evaluation
from optimize.metric import EvalSummary, ExampleScore, PipelineMetric, SummaryJudge
from optimize.report import TrajectoryPoint, plot_trajectory, score_table
from optimize.storage import RunStorage
from optimize.workers import WorkerPool
from stages.config import EndpointSettings
from stages.discovery import discover_endpoints

logger = logging.getLogger(__name__)


class OptimizeError(RuntimeError):
    """A run that cannot start or go on as asked (message says why and what to do)."""


class TooManyCalls(OptimizeError):
    """The call estimate exceeds ``--max-calls``."""


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


# -- setup ----------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_data(cfg: OptimizeConfig, spec: PipelineSpec) -> tuple[list[dspy.Example], list[dspy.Example]]:
    train, dev = load_pipeline_data(spec, train_path=cfg.train_path, dev_path=cfg.dev_path,
                                    train_limit=cfg.train_limit, dev_limit=cfg.dev_limit)
    if cfg.extra_train:
        extra, skipped = extra_train_examples(cfg.extra_train, spec, cfg.extra_train_min_score)
        dev_ids = {e.id for e in dev}
        extra = [e for e in extra if e.id not in dev_ids and e.id not in {t.id for t in train}]
        _say(f"extra training rows from {cfg.extra_train}: {len(extra)} used, {skipped} skipped "
             f"(unlabelled or judged below {cfg.extra_train_min_score})")
        train = train + extra
    if not dev:
        raise DatasetError("the dev set is empty")
    return train, dev


def _num_predictors(spec: PipelineSpec) -> int:
    from programs.loading import load_program

    return len(load_program(spec.program).predictors())


def default_run_dir(cfg: OptimizeConfig, fingerprint: str) -> str:
    return f"{cfg.out.rstrip('/')}/runs/{cfg.pipeline}-{cfg.optimizer}-{fingerprint}"


def open_run(cfg: OptimizeConfig, fingerprint: str) -> RunStorage:
    """The run directory, checked against ``--resume`` and the fingerprint."""
    storage = RunStorage(cfg.run_dir or default_run_dir(cfg, fingerprint))
    record = storage.read_json("run.json")
    if record is None:
        if not storage.is_empty():
            raise OptimizeError(f"{storage.uri} is not empty and is not a run directory; pick another --run-dir")
        if cfg.resume:
            _say(f"--resume: nothing to resume in {storage.uri}; starting a new run")
    elif not cfg.resume:
        raise OptimizeError(f"{storage.uri} already holds a run; add --resume to continue it, "
                            f"or pass another --run-dir to start over")
    elif record.get("fingerprint") != fingerprint:
        raise OptimizeError(f"{storage.uri} holds a run with other settings or data (fingerprint "
                            f"{record.get('fingerprint')} != {fingerprint}); resume with the same flags")
    return storage


@contextlib.contextmanager
def endpoints(lm: EndpointSettings, judge: EndpointSettings | None) -> Iterator[tuple[EndpointSettings, EndpointSettings | None]]:
    """The target (embedded llama.cpp when none is configured) and the judge (temperature 0)."""
    from pipelines.runner import endpoint

    with endpoint(lm) as target:
        if judge is None:
            yield target, None
            return
        if judge.embedded:
            _say("no judge endpoint configured (JUDGE_BASE_URL): the target endpoint judges, at temperature 0")
            judge = target.model_copy(update={"temperature": 0.0, "max_tokens": judge.max_tokens})
        yield target, judge.model_copy(update={"temperature": 0.0})


def eval_context(cfg: OptimizeConfig, spec: PipelineSpec, lm: EndpointSettings, judge: EndpointSettings | None) -> EvalContext:
    """Each worker's share of the endpoint's global in-flight budget (judge calls run inside the same slots)."""
    threads = max(1, min(cfg.threads_per_worker, lm.max_in_flight // cfg.workers))
    if judge is not None:
        threads = max(1, min(threads, judge.max_in_flight // cfg.workers))
    return EvalContext(spec=spec, lm=lm, judge=judge, threads=threads, num_cpus=cfg.worker_cpus)


# -- evaluation helpers -------------------------------------------------------------


def dev_summary(storage: RunStorage, name: str, program: dspy.Module, dev: list[dspy.Example],
                ctx: EvalContext, pool: WorkerPool) -> EvalSummary:
    """Score ``program`` on the dev set once per run (stored under dev/<name>.json)."""
    state = program.dump_state()
    saved = storage.read_json(f"dev/{name}.json")
    if saved is not None and saved.get("state") == state:
        scores = [ExampleScore.model_validate(s) for s in saved["scores"]]
        return EvalSummary.of(scores, ctx.spec.label_fields)
    scores = evaluate_on_ray(program, dev, pool)
    summary = EvalSummary.of(scores, ctx.spec.label_fields)
    if summary.n and summary.lm_failures == summary.n:
        first = next(s.program_error for s in scores if s.program_error)
        raise OptimizeError(f"every LM call of the {name} dev evaluation failed ({first}); "
                            f"fix the endpoint and run again with --resume")
    storage.write_json(f"dev/{name}.json", {"state": state,
                                              "scores": [s.model_dump() for s in scores]})
    return summary


# -- the optimizers ----------------------------------------------------------------------


@dataclass
class SearchOutcome:
    program: dspy.Module
    points: list[TrajectoryPoint]
    evaluated_now: list[int] = field(default_factory=list)
    judge_errors: int = 0


def run_miprov2(cfg: OptimizeConfig, spec: PipelineSpec, budget: ResolvedBudget, ctx: EvalContext,
                pool: WorkerPool, storage: RunStorage, trainset: list[dspy.Example], valset: list[dspy.Example]) -> SearchOutcome:
    from optimize.mipro import ParallelMIPROv2

    optimizer = ParallelMIPROv2(spec, cfg.search, budget, ctx, workers=cfg.workers, storage=storage, pool=pool,
                                on_event=_say)
    result = optimizer.compile(trainset, valset)
    # Plot positions: each evaluation at the number of minibatch trials finished before it finished.
    done = sorted(r.finished_at for r in result.trials)
    points = [TrajectoryPoint(step=i + 1, score=r.score, kind="minibatch", n=r.summary.n)
              for i, r in enumerate(sorted(result.trials, key=lambda r: r.finished_at))]
    for r in result.full_evals:
        step = 0 if r.full_eval == 0 else sum(1 for t in done if t <= r.finished_at)
        points.append(TrajectoryPoint(step=step, score=r.score, kind="full", n=r.summary.n))
    judge_errors = sum(r.summary.judge_errors for r in [*result.trials, *result.full_evals])
    return SearchOutcome(result.program, points, result.evaluated_this_run, judge_errors)


def run_dspy_optimizer(cfg: OptimizeConfig, spec: PipelineSpec, budget: ResolvedBudget, ctx: EvalContext,
                       pool: WorkerPool, storage: RunStorage, trainset: list[dspy.Example], valset: list[dspy.Example]) -> SearchOutcome:
    """BootstrapFewShot, BootstrapFewShotWithRandomSearch, COPRO and GEPA through DSPy's own ``compile``.

    Their evaluations (``dspy.Evaluate``) run on the Ray worker pool (:func:`ray_evaluation`);
    the compiled program is stored, so a resumed run does not compile again.
    GEPA's valset evaluations go to Ray too; its trace-capturing minibatch evaluations (the input
    to reflection) run in driver threads, bounded by the same budget.
    """
    from dspy.teleprompt import COPRO, BootstrapFewShot, BootstrapFewShotWithRandomSearch

    from optimize.config import AUTO_RUN_SETTINGS
    from optimize.estimate import COPRO_AUTO
    from programs.loading import load_program
    from stages.adapter import CachingJSONAdapter
    from stages.lm import build_lm

    saved = storage.read_json("compiled.json")
    if saved is not None:
        _say("compiled program: loaded from the run directory")
        points = [TrajectoryPoint.model_validate(p) for p in saved["points"]]
        return SearchOutcome(module_from_state(spec.program, saved["state"]), points, [], saved.get("judge_errors", 0))

    s = cfg.search
    judge = SummaryJudge(build_lm(ctx.judge)) if ctx.judge is not None else None
    metric = PipelineMetric(spec, judge, feedback=cfg.optimizer == "gepa")
    log = EvalLog(full_size=len(valset))
    student = load_program(spec.program)
    threads = max(1, ctx.threads * cfg.workers)
    lm = build_lm(ctx.lm)
    _say(f"{cfg.optimizer}: compiling with DSPy on {len(trainset)} train / {len(valset)} val examples")
    with dspy.context(lm=lm, adapter=CachingJSONAdapter()), ray_evaluation(ctx, pool, log):
        if cfg.optimizer == "bootstrap":
            compiled = BootstrapFewShot(metric=metric, max_bootstrapped_demos=s.max_bootstrapped_demos,
                                        max_labeled_demos=s.max_labeled_demos).compile(student, trainset=trainset)
        elif cfg.optimizer == "bootstrap_rs":
            compiled = BootstrapFewShotWithRandomSearch(
                metric=metric, max_bootstrapped_demos=s.max_bootstrapped_demos, max_labeled_demos=s.max_labeled_demos,
                num_candidate_programs=budget.num_fewshot_candidates, num_threads=threads,
            ).compile(student, trainset=trainset, valset=valset)
        elif cfg.optimizer == "copro":
            breadth, depth = COPRO_AUTO[s.auto or "light"]
            compiled = COPRO(prompt_model=lm, metric=metric, breadth=s.breadth or breadth, depth=s.depth or depth,
                             init_temperature=s.init_temperature).compile(
                student, trainset=valset, eval_kwargs={"num_threads": threads, "display_progress": False})
        elif cfg.optimizer == "gepa":
            gepa_kwargs: dict[str, Any] = {"auto": s.auto} if s.auto and not s.num_trials else {
                "max_metric_calls": (s.num_trials or AUTO_RUN_SETTINGS["light"]["n"]) * len(valset)}
            compiled = dspy.GEPA(metric=metric, reflection_lm=build_lm(ctx.judge or ctx.lm), num_threads=threads,
                                 seed=s.seed, **gepa_kwargs).compile(student, trainset=trainset, valset=valset)
        else:  # pragma: no cover - OptimizerName is a Literal
            raise OptimizeError(f"unknown optimizer {cfg.optimizer!r}")
    points = [TrajectoryPoint(step=p.step, score=p.score, kind=p.kind, n=p.n) for p in log.points]
    judge_errors = metric.tally.judge_errors
    storage.write_json("compiled.json", {"state": compiled.dump_state(), "points": [p.model_dump() for p in points],
                                         "judge_errors": judge_errors})
    return SearchOutcome(compiled, points, [], judge_errors)


OPTIMIZERS: dict[str, Callable[..., SearchOutcome]] = {
    "miprov2": run_miprov2,
    "bootstrap": run_dspy_optimizer,
    "bootstrap_rs": run_dspy_optimizer,
    "copro": run_dspy_optimizer,
    "gepa": run_dspy_optimizer,
}


# -- the run -------------------------------------------------------------------------


def plan(cfg: OptimizeConfig, spec: PipelineSpec, train: list[dspy.Example], dev: list[dspy.Example]
         ) -> tuple[ResolvedBudget, list[dspy.Example], list[dspy.Example], CallEstimate]:
    num_predictors = _num_predictors(spec)
    budget = resolve_budget(cfg.search, num_predictors, len(train))
    trainset, valset = split_train_val(train, budget.val_size, cfg.search.seed)
    estimate = estimate_calls(cfg, budget, n_train=len(trainset), n_val=len(valset), n_dev=len(dev),
                              num_predictors=num_predictors)
    return budget, trainset, valset, estimate


def run_optimization(
    cfg: OptimizeConfig,
    lm_settings: EndpointSettings,
    judge_settings: EndpointSettings | None = None,
) -> OptimizeResult:
    """Run (or resume) one optimization and write its artifact; see the module docstring."""
    from pipelines.runner import init_ray
    from programs.artifacts import ArtifactMetadata, redacted_settings, save_artifact

    start = time.perf_counter()
    if cfg.pipeline not in PIPELINES:
        raise OptimizeError(f"unknown pipeline {cfg.pipeline!r}; known: {', '.join(sorted(PIPELINES))}")
    spec = PIPELINES[cfg.pipeline]
    train, dev = load_data(cfg, spec)
    budget, trainset, valset, estimate = plan(cfg, spec, train, dev)
    _say(f"{cfg.optimizer} on {cfg.pipeline}: {len(trainset)} train, {len(valset)} val, {len(dev)} dev examples; "
         f"{cfg.workers} worker(s)")
    _say("estimated LM calls:\n" + estimate.table())
    if cfg.max_calls is not None and estimate.total > cfg.max_calls:
        raise TooManyCalls(f"estimated {estimate.total:,} LM calls exceed --max-calls {cfg.max_calls:,}; "
                           f"lower --auto/--num-trials/--num-candidates or raise --max-calls")
    if cfg.judge and judge_settings is None:
        judge_settings = EndpointSettings()  # unset: discovery below, else the target judges
    init_ray()
    # On a cluster, the Serve LLM app's target and judge fill whatever LM_/JUDGE_BASE_URL leave unset.
    lm_settings, judge_settings = discover_endpoints(lm_settings, judge_settings if cfg.judge else None)
    data_hash = dataset_hash(trainset, valset, dev)
    fingerprint = cfg.fingerprint(data_hash, lm_settings.model)
    storage = open_run(cfg, fingerprint)
    _say(f"run directory: {storage.uri}" + (" (resuming)" if storage.exists("run.json") else ""))

    with endpoints(lm_settings, judge_settings) as (lm, judge):
        if not storage.exists("run.json"):
            storage.write_json("run.json", {
                "fingerprint": fingerprint, "config": cfg.public(), "dataset_hash": data_hash,
                "lm": redacted_settings(lm), "judge": redacted_settings(judge) if judge else None,
                "estimate": estimate.lines, "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            })
        ctx = eval_context(cfg, spec, lm, judge)
        from programs.loading import load_program

        with WorkerPool(ctx, cfg.workers) as pool:
            baseline = dev_summary(storage, "baseline", load_program(spec.program), dev, ctx, pool)
            _say(f"baseline dev score: {baseline.score:.3f} on {baseline.n} examples")
            outcome = OPTIMIZERS[cfg.optimizer](cfg, spec, budget, ctx, pool, storage, trainset, valset)
            optimized = dev_summary(storage, "optimized", outcome.program, dev, ctx, pool)

    done = storage.read_json("result.json")
    if done is not None:  # a resumed run that had already finished: same artifact, no second copy
        _say(f"the run had finished: artifact {done['artifact']}")
        return OptimizeResult(artifact=done["artifact"], plot=done["plot"], run_dir=storage.uri, baseline=baseline,
                              optimized=optimized, estimate=estimate, seconds=time.perf_counter() - start,
                              trials_evaluated_this_run=outcome.evaluated_now,
                              judge_errors_during_search=outcome.judge_errors)
    model = lm.model if not lm_settings.embedded else "embedded-smollm2"
    metadata = ArtifactMetadata(
        program=spec.program, model=model, lm=redacted_settings(lm),
        judge=redacted_settings(judge) if judge else None, optimizer=cfg.optimizer,
        optimizer_settings={**cfg.search.model_dump(), **budget.model_dump(), "workers": cfg.workers},
        dataset_hash=data_hash, dev_score=round(optimized.score, 4), baseline_dev_score=round(baseline.score, 4),
        dev_field_accuracy=optimized.field_accuracy, run_dir=storage.uri,
        dev_judge_errors=optimized.judge_errors, dev_program_errors=optimized.program_errors,
    )
    artifact = save_artifact(outcome.program, cfg.out, metadata)
    last = max([p.step for p in outcome.points] + [1])
    dev_points = [TrajectoryPoint(step=0, score=baseline.score, kind="dev", n=baseline.n),
                  TrajectoryPoint(step=last, score=optimized.score, kind="dev", n=optimized.n)]
    plot = save_plot(outcome.points + dev_points, artifact[: -len(".json")] + ".trajectory.png",
                     title=f"{cfg.pipeline}: {cfg.optimizer} ({cfg.workers} workers), dev "
                           f"{baseline.score:.3f} -> {optimized.score:.3f}")
    result = OptimizeResult(
        artifact=artifact, plot=plot, run_dir=storage.uri, baseline=baseline, optimized=optimized,
        estimate=estimate, seconds=time.perf_counter() - start, trials_evaluated_this_run=outcome.evaluated_now,
        judge_errors_during_search=outcome.judge_errors,
    )
    storage.write_json("result.json", {"artifact": result.artifact, "plot": result.plot,
                                       "baseline": baseline.model_dump(), "optimized": optimized.model_dump()})
    if cfg.mlflow:
        log_to_mlflow(cfg, result, metadata)
    return result


def save_plot(points: list[TrajectoryPoint], path: str, *, title: str) -> str:
    """The trajectory PNG next to the artifact (uploaded when the artifact directory is a URI)."""
    from stages.fs import filesystem_for, is_uri, write_bytes

    if not is_uri(path):
        return str(plot_trajectory(points, path, title=title))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="plot-") as tmp:
        local = plot_trajectory(points, Path(tmp) / "trajectory.png", title=title)
        write_bytes(*filesystem_for(path), local.read_bytes())
    return path


def log_to_mlflow(cfg: OptimizeConfig, result: OptimizeResult, metadata: Any) -> bool:
    """Params, dev metrics and the artifact files to MLflow (``MLFLOW_TRACKING_URI``); False if not installed."""
    try:
        import mlflow
    except ImportError:
        _say("--mlflow: mlflow is not installed (pip install -e .[mlflow]); skipped")
        return False
    from programs.artifacts import sidecar_path

    with mlflow.start_run(run_name=f"{cfg.pipeline}-{cfg.optimizer}"):
        mlflow.log_params({"pipeline": cfg.pipeline, "optimizer": cfg.optimizer, "workers": cfg.workers,
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
        print(f"judge errors during the search: {result.judge_errors_during_search} (scored on labels only)")
    print(f"artifact: {result.artifact}")
    print(f"trajectory plot: {result.plot}")
    print(f"run directory: {result.run_dir}  ({result.seconds:.1f} s)")
