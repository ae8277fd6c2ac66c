"""The optimizers: one class each, saying how to estimate a run's LM calls and how to run it.

    >>> OPTIMIZERS["miprov2"]                                      # doctest: +SKIP
    <class 'optimize.optimizers.MIPROv2'>
    >>> optimizer = OPTIMIZERS[cfg.optimizer](cfg, budget)         # doctest: +SKIP
    >>> optimizer.estimate(est, sizes, progress)                   # doctest: +SKIP
    >>> outcome = optimizer.run(job)                               # doctest: +SKIP

``miprov2`` is this framework's parallel MIPROv2 (:mod:`optimize.mipro`); the
others are DSPy's own optimizers run through their ``compile``, with every
``dspy.Evaluate`` they make fanned out over the Ray workers
(:func:`optimize.evaluation.ray_evaluation`).  Estimates count only the work a
resumed run still has to do (:class:`RunProgress`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import dspy

from dspy_ray.client.json_adapter import CachingJSONAdapter
from dspy_ray.client.lm import build_lm
from dspy_ray.execution.scoring import DSPyMetric, FieldJudge
from optimize.config import AUTO_RUN_SETTINGS, OptimizeConfig, OptimizeError, ResolvedBudget, candidate_plan
from optimize.estimate import COPRO_AUTO, CallEstimate, bootstrap_calls
from optimize.evaluation import EvalContext, EvalLog, ray_evaluation
from optimize.mipro import ParallelMIPROv2
from optimize.report import TrajectoryPoint
from optimize.storage import RunStorage
from optimize.workers import WorkerPool


@dataclass(frozen=True)
class Sizes:
    """Example counts and program shape an estimate depends on."""

    n_train: int
    n_val: int
    n_dev: int
    num_predictors: int
    judge: bool

    @property
    def calls_per_example(self) -> int:
        # One program call per predictor; a judge adds one call per judged field (counted as one).
        return self.num_predictors + (1 if self.judge else 0)


@dataclass(frozen=True)
class RunProgress:
    """What a run directory already holds (a new run: nothing)."""

    candidates: bool = False
    trials: int = 0
    full_evals: int = 0
    compiled: bool = False
    dev_done: frozenset[str] = frozenset()

    @classmethod
    def read(cls, storage: RunStorage | None) -> RunProgress:
        if storage is None or not storage.exists():
            return cls()
        return cls(candidates=storage.exists("candidates.json"), trials=len(storage.list("trials")),
                   full_evals=len(storage.list("full")), compiled=storage.exists("compiled.json"),
                   dev_done=frozenset(n.removesuffix(".json") for n in storage.list("dev")))


@dataclass
class SearchJob:
    """Everything a search needs: settings, data, the workers and where to persist."""

    cfg: OptimizeConfig
    budget: ResolvedBudget
    ctx: EvalContext
    pool: WorkerPool
    storage: RunStorage
    trainset: list[dspy.Example]
    valset: list[dspy.Example]
    fresh_program: Callable[[], dspy.Module]  # the unoptimized program, resources open, on the driver
    say: Callable[[str], None]


@dataclass
class SearchOutcome:
    state: dict[str, Any]  # the optimized program's dump_state()
    points: list[TrajectoryPoint]
    evaluated_now: list[int] = field(default_factory=list)
    judge_errors: int = 0


class Optimizer:
    """One optimizer: its name on the command line, its call estimate and how it runs."""

    name: ClassVar[str]

    def __init__(self, cfg: OptimizeConfig, budget: ResolvedBudget):
        self.cfg, self.budget, self.search = cfg, budget, cfg.search

    def plan(self) -> str:
        """What the search will make, in words (printed with the estimate and when it starts)."""
        return f"{self.name} with {self.budget.num_fewshot_candidates} candidate programs"

    def estimate(self, est: CallEstimate, sizes: Sizes, progress: RunProgress) -> None:
        raise NotImplementedError

    def run(self, job: SearchJob) -> SearchOutcome:
        raise NotImplementedError


class MIPROv2(Optimizer):
    name = "miprov2"

    def plan(self) -> str:
        return f"{candidate_plan(self.budget)}, {self.budget.num_trials} trials"

    def estimate(self, est: CallEstimate, sizes: Sizes, progress: RunProgress) -> None:
        b, s = self.budget, self.search
        if not progress.candidates:
            boot_sets = max(0, b.num_fewshot_candidates - 2)  # the zero-shot and labeled-only sets cost nothing
            boot = 3 if b.zeroshot else s.max_bootstrapped_demos
            est.add(f"bootstrap {boot_sets} demo sets",
                    boot_sets * bootstrap_calls(sizes.n_train, boot) * sizes.num_predictors)
            if s.data_aware_proposer:
                est.add("dataset summary", max(1, min(10, -(-sizes.n_train // s.view_data_batch_size))) + 1)
            proposals = max(0, b.num_instruct_candidates - 1) * sizes.num_predictors
            est.add(f"propose {proposals} instructions", proposals * (1 + (2 if s.program_aware_proposer else 0)))
        per = sizes.calls_per_example
        trials_left = max(0, b.num_trials - progress.trials)
        if b.minibatch:
            planned = 1 + -(-b.num_trials // s.full_eval_steps)
            fulls_left = max(0, planned - progress.full_evals)
            est.add(f"{trials_left} minibatch trials x {b.minibatch_size}", trials_left * b.minibatch_size * per)
            est.add(f"{fulls_left} full evaluations x {sizes.n_val}", fulls_left * sizes.n_val * per)
        else:
            left = trials_left + (0 if progress.full_evals else 1)
            est.add(f"{left} full-valset trials x {sizes.n_val}", left * sizes.n_val * per)

    def run(self, job: SearchJob) -> SearchOutcome:
        optimizer = ParallelMIPROv2(job.cfg.search, job.budget, job.ctx, workers=job.cfg.workers,
                                    storage=job.storage, pool=job.pool, on_event=job.say)
        result = optimizer.compile(job.trainset, job.valset)
        state = result.candidates.apply(job.fresh_program(), result.best_params).dump_state()
        # Plot positions: each evaluation at the number of minibatch trials finished before it finished.
        done = sorted(r.finished_at for r in result.trials)
        points = [TrajectoryPoint(step=i + 1, score=r.score, kind="minibatch", n=r.summary.n)
                  for i, r in enumerate(sorted(result.trials, key=lambda r: r.finished_at))]
        for r in result.full_evals:
            step = 0 if r.full_eval == 0 else sum(1 for t in done if t <= r.finished_at)
            points.append(TrajectoryPoint(step=step, score=r.score, kind="full", n=r.summary.n))
        judge_errors = sum(r.summary.judge_errors for r in [*result.trials, *result.full_evals])
        return SearchOutcome(state, points, result.evaluated_this_run, judge_errors)


class DSPyCompile(Optimizer):
    """A DSPy optimizer run through its own ``compile``; the compiled program is stored for resume."""

    feedback: ClassVar[bool] = False

    def compile(self, student: dspy.Module, metric: DSPyMetric, job: SearchJob, lm: dspy.BaseLM,
                threads: int) -> dspy.Module:
        raise NotImplementedError

    def run(self, job: SearchJob) -> SearchOutcome:
        saved = job.storage.read_json("compiled.json")
        if saved is not None:
            job.say("compiled program: loaded from the run directory")
            points = [TrajectoryPoint.model_validate(p) for p in saved["points"]]
            return SearchOutcome(saved["state"], points, [], saved.get("judge_errors", 0))
        ctx = job.ctx
        judge = FieldJudge(build_lm(ctx.judge)) if ctx.judge is not None else None
        metric = DSPyMetric(ctx.task.metric, judge, name=ctx.task.name, feedback=self.feedback)
        log = EvalLog(full_size=len(job.valset))
        student = job.fresh_program()
        lm = build_lm(ctx.lm)
        job.say(f"{self.name}: compiling with DSPy on {len(job.trainset)} train / {len(job.valset)} val examples")
        with dspy.context(lm=lm, adapter=CachingJSONAdapter()), ray_evaluation(ctx.task.metric, job.pool, log):
            compiled = self.compile(student, metric, job, lm, max(1, ctx.threads * job.cfg.workers))
        points = [TrajectoryPoint(step=p.step, score=p.score, kind=p.kind, n=p.n) for p in log.points]
        state = compiled.dump_state()
        job.storage.write_json("compiled.json", {"state": state, "points": [p.model_dump() for p in points],
                                                 "judge_errors": metric.tally.judge_errors})
        return SearchOutcome(state, points, [], metric.tally.judge_errors)


class BootstrapFewShot(DSPyCompile):
    name = "bootstrap"

    def plan(self) -> str:
        return f"bootstrap up to {self.search.max_bootstrapped_demos} demos per predictor"

    def estimate(self, est: CallEstimate, sizes: Sizes, progress: RunProgress) -> None:
        if not progress.compiled:
            est.add("bootstrap teacher calls",
                    bootstrap_calls(sizes.n_train, self.search.max_bootstrapped_demos) * sizes.num_predictors)

    def compile(self, student, metric, job, lm, threads):
        from dspy.teleprompt import BootstrapFewShot as DSPyBootstrap

        s = self.search
        return DSPyBootstrap(metric=metric, max_bootstrapped_demos=s.max_bootstrapped_demos,
                             max_labeled_demos=s.max_labeled_demos).compile(student, trainset=job.trainset)


class BootstrapRandomSearch(DSPyCompile):
    name = "bootstrap_rs"

    def estimate(self, est: CallEstimate, sizes: Sizes, progress: RunProgress) -> None:
        if progress.compiled:
            return
        n = self.budget.num_fewshot_candidates
        est.add(f"bootstrap {n} candidate programs",
                n * bootstrap_calls(sizes.n_train, self.search.max_bootstrapped_demos) * sizes.num_predictors)
        est.add(f"evaluate {n + 3} candidates x {sizes.n_val}", (n + 3) * sizes.n_val * sizes.calls_per_example)

    def compile(self, student, metric, job, lm, threads):
        from dspy.teleprompt import BootstrapFewShotWithRandomSearch

        s = self.search
        return BootstrapFewShotWithRandomSearch(
            metric=metric, max_bootstrapped_demos=s.max_bootstrapped_demos, max_labeled_demos=s.max_labeled_demos,
            num_candidate_programs=self.budget.num_fewshot_candidates, num_threads=threads,
        ).compile(student, trainset=job.trainset, valset=job.valset)


class COPRO(DSPyCompile):
    name = "copro"

    def _shape(self) -> tuple[int, int]:
        breadth, depth = COPRO_AUTO[self.search.auto or "light"]
        return self.search.breadth or breadth, self.search.depth or depth

    def plan(self) -> str:
        breadth, depth = self._shape()
        return f"{breadth} instruction candidates per round, {depth} rounds"

    def estimate(self, est: CallEstimate, sizes: Sizes, progress: RunProgress) -> None:
        if progress.compiled:
            return
        breadth, depth = self._shape()
        est.add(f"propose ({depth} rounds)", depth * sizes.num_predictors)
        est.add(f"evaluate {breadth}x{depth} candidates x {sizes.n_val}",
                breadth * depth * sizes.num_predictors * sizes.n_val * sizes.calls_per_example)

    def compile(self, student, metric, job, lm, threads):
        from dspy.teleprompt import COPRO as DSPyCOPRO

        breadth, depth = self._shape()
        return DSPyCOPRO(prompt_model=lm, metric=metric, breadth=breadth, depth=depth,
                         init_temperature=self.search.init_temperature).compile(
            student, trainset=job.valset, eval_kwargs={"num_threads": threads, "display_progress": False})


class GEPA(DSPyCompile):
    name = "gepa"
    feedback = True

    def _kwargs(self, n_val: int) -> dict[str, Any]:
        s = self.search
        if s.auto and not s.num_trials:
            return {"auto": s.auto}
        return {"max_metric_calls": (s.num_trials or AUTO_RUN_SETTINGS["light"]["n"]) * n_val}

    def plan(self) -> str:
        return f"GEPA reflective search ({self._kwargs(1)})"

    def estimate(self, est: CallEstimate, sizes: Sizes, progress: RunProgress) -> None:
        if progress.compiled:
            return
        from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS as GEPA_AUTO
        from dspy.teleprompt.gepa.gepa import GEPA as DSPyGEPA

        kwargs = self._kwargs(sizes.n_val)
        metric_calls = kwargs.get("max_metric_calls") or DSPyGEPA.auto_budget(
            None, num_preds=sizes.num_predictors, num_candidates=GEPA_AUTO[kwargs["auto"]]["n"],
            valset_size=sizes.n_val)
        est.add("GEPA program evaluations", metric_calls * sizes.calls_per_example)
        # Each GEPA step scores a 3-example minibatch before and after one reflection call.
        est.add("GEPA reflection calls", metric_calls // 6)

    def compile(self, student, metric, job, lm, threads):
        ctx = job.ctx
        return dspy.GEPA(metric=metric, reflection_lm=build_lm(ctx.judge or ctx.lm), num_threads=threads,
                         seed=self.search.seed, **self._kwargs(len(job.valset))).compile(
            student, trainset=job.trainset, valset=job.valset)


class NearestDemoPool(Optimizer):
    """Every labelled training example becomes a demo in a pool; each call is shown the nearest few.

    No search and no LM calls: the program selects per input (:mod:`programs.demo_pool`), which suits
    small models that copy the labels of a similar demo well.  Only one-predictor programs that
    select from a pool (they hold a :class:`~programs.demo_pool.NearestDemos`) can use it.
    """

    name = "knn"

    def plan(self) -> str:
        return "a pool of every labelled training example as demos; each call sees the nearest few"

    def estimate(self, est: CallEstimate, sizes: Sizes, progress: RunProgress) -> None:
        est.add("build the demo pool (no LM calls)", 0)

    def run(self, job: SearchJob) -> SearchOutcome:
        from programs.demo_pool import NearestDemos, demo_pool

        program = job.fresh_program()
        predictors = program.named_predictors()
        selectors = [v for v in vars(program).values() if isinstance(v, NearestDemos)]
        if len(predictors) != 1 or not selectors:
            raise OptimizeError(f"--optimizer knn needs a one-predictor program that selects demos from a pool "
                             f"(a NearestDemos attribute); {type(program).__name__} is not one")
        [(_, predictor)] = predictors
        fields = tuple(predictor.signature.fields)
        # Train and val (the dev set stays held out): the larger the pool, the nearer the nearest demo.
        predictor.demos = demo_pool([*job.trainset, *job.valset], fields)
        job.say(f"knn: a pool of {len(predictor.demos)} demos; each call sees the {selectors[0].k} nearest")
        return SearchOutcome(program.dump_state(), [], [], 0)


OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (MIPROv2, BootstrapFewShot, BootstrapRandomSearch, COPRO, GEPA, NearestDemoPool)
}
