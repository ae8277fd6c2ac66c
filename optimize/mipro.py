"""Parallel MIPROv2: DSPy's candidates and search, with W Ray workers scoring trials at once.

The algorithm is MIPROv2's (``dspy/teleprompt/mipro_optimizer_v2.py``):

1. make candidates once - few-shot demo sets and instructions per predictor
   (:mod:`optimize.candidates`, fanned out over the Ray workers);
2. score the unoptimized program on the whole valset (the baseline);
3. search: optuna's TPE proposes a combination (instruction index and demo-set
   index per predictor), scored on a minibatch; every ``full_eval_steps``
   minibatch trials, the combination with the best mean minibatch score that has
   not been fully evaluated yet is scored on the whole valset and told to the
   study as a trial of its own; one more at the end;
4. the best fully evaluated combination is the result, a plain DSPy program.

What changes is how it runs.  The driver asks the study for up to W trials at
once (``TPESampler(constant_liar=True)`` keeps concurrent asks apart) and each
runs on one of W Ray actors (:class:`~optimize.workers.WorkerPool`): a pure
function from (candidate indices, minibatch ids) to a
:class:`~optimize.trial.TrialResult`.  Full evaluations are split into W chunks
so they occupy every worker too.  The study (optuna journal) and the candidate
set live in a :class:`~optimize.storage.RunStorage`; every finished trial is
written before it is told to the study, so a run killed at any point resumes
(``resume=True``) without evaluating any finished trial again.  Minibatches are
drawn from the trial number, so a re-run unfinished trial sees the same examples.

    >>> optimizer = ParallelMIPROv2(search, budget, ctx, workers=4, storage=RunStorage("runs/r1"))  # doctest: +SKIP
    >>> result = optimizer.compile(trainset, valset)                                              # doctest: +SKIP
    >>> result.candidates.apply(fresh_program, result.best_params).save("triage.json")            # doctest: +SKIP

The search loop itself is :class:`TrialScheduler`: a queue of trial requests,
MIPROv2's full-evaluation schedule and the recovery of a killed run, one small
method per step.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import dspy
from pydantic import BaseModel, Field

from dspy_ray.execution.scoring import TaskMetric
from optimize.candidates import CandidateSet, generate_candidates
from optimize.config import ResolvedBudget, SearchSettings, candidate_plan
from optimize.evaluation import EvalContext, chunked
from optimize.storage import RunStorage
from optimize.trial import TrialRequest, TrialResult, merge_chunks
from optimize.workers import WorkerPool
from dspy_ray.util.cli import EXIT_ENDPOINT

logger = logging.getLogger(__name__)

STUDY_NAME = "miprov2"
FULL_EVAL_ATTR = "full_eval"  # user attribute marking study trials that are full evaluations


class SearchError(RuntimeError):
    """The search cannot go on (endpoint failing everywhere, candidates unusable); the run can be resumed."""
    exit_code = EXIT_ENDPOINT  # what a command line exits with (dspy_ray.util.cli)


def minibatch_ids(val_ids: list[str], size: int, seed: int, number: int) -> list[str]:
    """The examples trial ``number`` is scored on: a pure function of the trial number."""
    if size >= len(val_ids):
        return list(val_ids)
    return random.Random(f"{seed}:{number}").sample(val_ids, size)


class MiproResult(BaseModel):
    """What a parallel MIPROv2 run found, and every evaluation on the way."""

    model_config = {"arbitrary_types_allowed": True}

    best_params: dict[str, int] = Field(..., description="Candidate indices of the best program")
    best_score: float = Field(..., description="Its full-valset score")
    baseline_score: float = Field(..., description="The unoptimized program's full-valset score")
    trials: list[TrialResult] = Field(..., description="Minibatch trials, by trial number")
    full_evals: list[TrialResult] = Field(..., description="Full evaluations in order (0 = baseline)")
    candidates: CandidateSet = Field(..., description="What was searched")
    evaluated_this_run: list[int] = Field(default_factory=list, description="Trial numbers evaluated by this process")


@dataclass
class _SearchState:
    """Finished work, rebuilt from storage on resume."""

    trials: dict[int, TrialResult] = field(default_factory=dict)
    full: dict[int, TrialResult] = field(default_factory=dict)
    skipped_full: int = 0  # scheduled full evaluations with no new combination to evaluate

    def fully_evaluated(self, candidates: CandidateSet) -> set[str]:
        return {candidates.combo_key(r.params) for r in self.full.values()}


class ParallelMIPROv2:
    """MIPROv2 with trials on W Ray workers and its state in persistent storage."""

    def __init__(
        self,
        search: SearchSettings,
        budget: ResolvedBudget,
        ctx: EvalContext,
        *,
        workers: int,
        storage: RunStorage,
        pool: WorkerPool | None = None,
        on_event: Callable[[str], None] | None = None,
    ):
        self.search, self.budget, self.ctx = search, budget, ctx
        self.workers = workers
        self.storage = storage
        self.pool = pool
        self.on_event = on_event or (lambda line: logger.info("%s", line))

    def candidates(self, trainset: list[dspy.Example], rng: random.Random, pool: WorkerPool) -> CandidateSet:
        """Step 1, once per run: made on the workers, or read back from the run directory."""
        saved = self.storage.read_json("candidates.json")
        if saved is not None:
            self.on_event("candidates: loaded from the run directory")
            return CandidateSet.model_validate(saved)
        b = self.budget
        self.on_event(f"candidates: making {candidate_plan(b)} on the Ray workers")
        [predictors] = pool.map([(0, "predictors", ())]).values()  # read where the resources are open
        candidates = generate_candidates(
            predictors, self.ctx.task.program.name, trainset, rng=rng,
            num_fewshot_candidates=b.num_fewshot_candidates,
            num_instruct_candidates=b.num_instruct_candidates,
            max_bootstrapped_demos=self.search.max_bootstrapped_demos,
            max_labeled_demos=self.search.max_labeled_demos,
            settings=self.search, pool=pool,
        )
        self.storage.write_json("candidates.json", candidates.model_dump())
        return candidates

    def compile(self, trainset: list[dspy.Example], valset: list[dspy.Example]) -> MiproResult:
        from dspy.teleprompt.utils import create_minibatch

        rng = random.Random(self.search.seed)
        if self.search.auto:
            # MIPROv2 draws its valset sample from the same RNG first; drawing it here too keeps the
            # candidate draws that follow identical to DSPy's.
            valset = create_minibatch(valset, batch_size=self.budget.val_size, rng=rng)
        with contextlib.ExitStack() as stack:
            pool = self.pool or stack.enter_context(WorkerPool(self.ctx, self.workers))
            candidates = self.candidates(trainset, rng, pool)
            scheduler = TrialScheduler(candidates, valset, self.budget, self.search, storage=self.storage, pool=pool,
                                       metric=self.ctx.task.metric, on_event=self.on_event)
            return scheduler.run()


def open_study(storage: RunStorage, seed: int):
    """The optuna study of a run, journaled in its run directory (created or reloaded)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    return optuna.create_study(study_name=STUDY_NAME, storage=optuna.storages.JournalStorage(storage.journal()),
                               sampler=sampler, direction="maximize", load_if_exists=True)


class TrialScheduler:
    """MIPROv2's search loop: trials W at a time, full evaluations on schedule, resumable at any point.

    ``run()`` repeats three steps until the budget is spent: start a full
    evaluation when one is due (:meth:`schedule_full_eval`), give every idle
    worker a request (:meth:`fill_workers`: queued work first, else a new trial
    asked from the study), and file the next result that comes back
    (:meth:`on_minibatch` / :meth:`on_full_chunk`).  Every result is written
    to the run directory before the study hears of it, so :meth:`recover` can
    rebuild the state of a killed run.
    """

    def __init__(self, candidates: CandidateSet, valset: list[dspy.Example], budget: ResolvedBudget,
                 search: SearchSettings, *, storage: RunStorage, pool: WorkerPool, metric: TaskMetric,
                 on_event: Callable[[str], None]):
        import ray

        self.candidates, self.budget, self.search = candidates, budget, search
        self.storage, self.pool, self.metric, self.on_event = storage, pool, metric, on_event
        self.val_ids = [str(e.id) for e in valset]
        if len(set(self.val_ids)) != len(self.val_ids):
            raise ValueError("valset ids must be unique")
        self.mb_size = budget.minibatch_size if budget.minibatch else len(self.val_ids)
        steps = search.full_eval_steps
        # Full evaluations after every `steps` minibatch trials, and one at the end (MIPROv2's schedule).
        self.full_evals_planned = (-(-budget.num_trials // steps)) if budget.minibatch else 0
        self.distributions = candidates.distributions()
        self.study = open_study(storage, search.seed)
        self.state = self._load_state()
        self.refs = (ray.put(candidates), ray.put({str(e.id): e for e in valset}))
        self.queue: collections.deque[TrialRequest] = collections.deque()
        self.full_chunks: dict[int, list[TrialResult]] = {}
        self.full_parts: dict[int, int] = {}  # full evaluation running -> number of chunks
        self.evaluated_now: list[int] = []
        self.asked = 0

    def run(self) -> MiproResult:
        self.recover()
        while True:
            self.schedule_full_eval()
            self.fill_workers()
            if not self.pool.busy:
                return self.result()
            request, result = self.wait()
            if request.kind == "minibatch":
                self.on_minibatch(result)
            else:
                self.on_full_chunk(request, result)

    # -- state and recovery ---------------------------------------------------------------

    def _load_state(self) -> _SearchState:
        state = _SearchState()
        for record in self.storage.read_all("trials"):
            result = TrialResult.model_validate(record)
            state.trials[result.number] = result
        for record in self.storage.read_all("full"):
            result = TrialResult.model_validate(record)
            state.full[result.full_eval] = result
        return state

    def recover(self) -> None:
        """Tell the study what a killed run finished but did not report, and queue what it left half done."""
        from optuna.trial import TrialState

        in_study = {t.user_attrs.get(FULL_EVAL_ATTR) for t in self.study.get_trials(deepcopy=False)}
        for seq, result in sorted(self.state.full.items()):
            if seq not in in_study:  # written, but the process died before telling the study
                self._add_full_to_study(result)
        for t in self.study.get_trials(deepcopy=False):
            if FULL_EVAL_ATTR in t.user_attrs:
                continue
            if t.state == TrialState.COMPLETE:
                self.asked += 1
            elif t.state == TrialState.RUNNING:
                if t.number in self.state.trials:
                    self.study.tell(t.number, self.state.trials[t.number].score)
                    self.asked += 1
                elif set(t.params) == set(self.distributions):
                    self.queue.append(self._minibatch_request(t.number, t.params))
                    self.asked += 1
                else:  # died between ask and its parameters being written
                    self.study.tell(t.number, state=TrialState.FAIL)
        if self.state.trials or self.state.full:
            self.on_event(f"resume: {len(self.state.trials)} trial(s) and {len(self.state.full)} full evaluation(s) "
                          f"already done; {len(self.queue)} unfinished trial(s) will run again")
        if 0 not in self.state.full:
            self.enqueue_full(0, self.candidates.default_params())

    # -- scheduling --------------------------------------------------------------------------

    def _minibatch_request(self, number: int, params: dict[str, int]) -> TrialRequest:
        ids = minibatch_ids(self.val_ids, self.mb_size, self.search.seed, number)
        return TrialRequest(number=number, kind="minibatch", params=params, example_ids=ids)

    def enqueue_full(self, seq: int, params: dict[str, int]) -> None:
        """A full evaluation, split into one chunk per worker, ahead of any queued trial."""
        parts = chunked(self.val_ids, self.pool.size)
        self.full_parts[seq], self.full_chunks[seq] = len(parts), []
        for i, ids in enumerate(parts):
            self.queue.appendleft(TrialRequest(number=-1, kind="full", params=params, example_ids=ids,
                                               full_eval=seq, chunk=i))

    def schedule_full_eval(self) -> None:
        """Start the next scheduled full evaluation if it is due and none is running."""
        state = self.state
        if self.full_parts or 0 not in state.full:
            return
        k = len(state.full) + state.skipped_full  # done (baseline included) -> the k-th after it is next
        if k > self.full_evals_planned or len(state.trials) < min(k * self.search.full_eval_steps,
                                                                  self.budget.num_trials):
            return
        ranked = self._rank_untried_combinations()
        if not ranked:
            state.skipped_full += 1  # every combination tried is already fully evaluated
            self.on_event(f"full evaluation {k}: skipped, no new combination to evaluate")
            return
        mean, params = ranked[0]
        self.on_event(f"full evaluation {k}: best mean minibatch combination ({mean:.3f}) "
                      f"on {len(self.val_ids)} examples")
        self.enqueue_full(len(state.full), params)

    def _rank_untried_combinations(self) -> list[tuple[float, dict[str, int]]]:
        """(mean minibatch score, params) of combinations not yet fully evaluated, best first."""
        done = self.state.fully_evaluated(self.candidates)
        groups: dict[str, list[TrialResult]] = collections.defaultdict(list)
        for r in self.state.trials.values():
            groups[self.candidates.combo_key(r.params)].append(r)
        ranked = sorted(((sum(r.score for r in rs) / len(rs), len(rs), -min(r.number for r in rs), rs[0].params)
                         for key, rs in groups.items() if key not in done), key=lambda t: t[:3], reverse=True)
        return [(mean, params) for mean, _, _, params in ranked]

    def fill_workers(self) -> None:
        while self.pool.has_idle():
            if self.queue:
                request = self.queue.popleft()
            elif self.asked < self.budget.num_trials:
                trial = self.study.ask(fixed_distributions=self.distributions)
                self.asked += 1
                request = self._minibatch_request(trial.number, trial.params)
            else:
                return
            self.pool.submit(request, "trial", request, *self.refs)

    def wait(self) -> tuple[TrialRequest, TrialResult]:
        import ray

        try:
            request, result = self.pool.wait_one()
        except ray.exceptions.RayError as exc:
            raise SearchError(f"a trial failed on its worker after retries: {exc}") from exc
        if result.summary.n and result.summary.lm_failures == result.summary.n:
            first = next(s.program_error for s in result.scores if s.program_error)
            raise SearchError(f"every LM call of trial {request.number} failed ({first}); "
                              f"fix the endpoint and run again with --resume")
        return request, result

    # -- results -------------------------------------------------------------------------------

    def on_minibatch(self, result: TrialResult) -> None:
        # Persist first, then tell: a kill in between is healed on resume from the file.
        self.storage.write_json(f"trials/{result.number:05d}-{uuid.uuid4().hex[:8]}.json", result.model_dump())
        self.study.tell(result.number, result.score)
        self.state.trials[result.number] = result
        self.evaluated_now.append(result.number)
        self.on_event(f"trial {result.number:>3} minibatch {result.score:.3f}  {_short(result.params)}"
                      f"  ({len(self.state.trials)}/{self.budget.num_trials}, {result.seconds:.1f}s)")

    def on_full_chunk(self, request: TrialRequest, result: TrialResult) -> None:
        seq = request.full_eval
        self.full_chunks[seq].append(result)
        if len(self.full_chunks[seq]) < self.full_parts[seq]:
            return
        merged = merge_chunks(self.full_chunks.pop(seq), self.metric)
        del self.full_parts[seq]
        self.storage.write_json(f"full/{seq:03d}-{uuid.uuid4().hex[:8]}.json", merged.model_dump())
        self._add_full_to_study(merged)
        self.state.full[seq] = merged
        label = "baseline" if seq == 0 else f"full evaluation {seq}"
        best = max(r.score for r in self.state.full.values())
        self.on_event(f"{label}: {merged.score:.3f} on {merged.summary.n} examples  {_short(merged.params)}"
                      f"  (best so far {best:.3f})")

    def _add_full_to_study(self, result: TrialResult) -> None:
        import optuna

        self.study.add_trial(optuna.trial.create_trial(
            params=result.params, distributions=self.distributions, value=result.score,
            user_attrs={FULL_EVAL_ATTR: result.full_eval},
        ))

    def result(self) -> MiproResult:
        scored: list[TrialResult] = list(self.state.full.values())
        if not self.budget.minibatch:
            scored += list(self.state.trials.values())  # every trial already saw the whole valset
        best = max(scored, key=lambda r: (r.score, -(r.full_eval or 0)))
        return MiproResult(
            best_params=best.params,
            best_score=best.score,
            baseline_score=self.state.full[0].score,
            trials=[self.state.trials[n] for n in sorted(self.state.trials)],
            full_evals=[self.state.full[k] for k in sorted(self.state.full)],
            candidates=self.candidates,
            evaluated_this_run=self.evaluated_now,
        )


def _short(params: dict[str, int]) -> str:
    return " ".join(f"{k.replace('_predictor_', ':')}={v}" for k, v in params.items())
