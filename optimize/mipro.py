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

    >>> optimizer = ParallelMIPROv2(spec, search, budget, ctx, workers=4, storage=RunStorage("runs/r1"))  # doctest: +SKIP
    >>> result = optimizer.compile(trainset, valset)                                                    # doctest: +SKIP
    >>> result.program.save("triage.json")                                                              # doctest: +SKIP
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

from optimize.candidates import CandidateSet, generate_candidates
from optimize.config import ResolvedBudget, SearchSettings
from optimize.data import PipelineSpec
from optimize.evaluation import EvalContext, chunked
from optimize.storage import RunStorage
from optimize.trial import TrialRequest, TrialResult, merge_chunks
from optimize.workers import WorkerPool

logger = logging.getLogger(__name__)

STUDY_NAME = "miprov2"
FULL_EVAL_ATTR = "full_eval"  # user attribute marking study trials that are full evaluations


class SearchError(RuntimeError):
    """The search cannot go on (endpoint failing everywhere, candidates unusable); the run can be resumed."""


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

    @property
    def program(self) -> dspy.Module:
        return self.candidates.build(self.best_params)


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
        spec: PipelineSpec,
        search: SearchSettings,
        budget: ResolvedBudget,
        ctx: EvalContext,
        *,
        workers: int,
        storage: RunStorage,
        pool: WorkerPool | None = None,
        on_event: Callable[[str], None] | None = None,
    ):
        self.spec, self.search, self.budget, self.ctx = spec, search, budget, ctx
        self.workers = workers
        self.storage = storage
        self.pool = pool
        self.on_event = on_event or (lambda line: logger.info("%s", line))

    # -- step 1: candidates -------------------------------------------------------

    def candidates(self, trainset: list[dspy.Example], rng: random.Random, pool: WorkerPool) -> CandidateSet:
        saved = self.storage.read_json("candidates.json")
        if saved is not None:
            self.on_event("candidates: loaded from the run directory")
            return CandidateSet.model_validate(saved)
        b = self.budget
        self.on_event(
            f"candidates: bootstrapping {b.num_fewshot_candidates} demo sets and proposing "
            f"{b.num_instruct_candidates} instructions per predictor (on the Ray workers)"
        )
        candidates = generate_candidates(
            self.spec, trainset, rng=rng,
            num_fewshot_candidates=b.num_fewshot_candidates,
            num_instruct_candidates=b.num_instruct_candidates,
            max_bootstrapped_demos=self.search.max_bootstrapped_demos,
            max_labeled_demos=self.search.max_labeled_demos,
            settings=self.search, lm_settings=self.ctx.lm, pool=pool,
        )
        self.storage.write_json("candidates.json", candidates.model_dump())
        return candidates

    # -- the whole run ------------------------------------------------------------

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
            return self._search(candidates, valset, pool)

    def _open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=self.search.seed, multivariate=True, constant_liar=True)
        return optuna.create_study(
            study_name=STUDY_NAME,
            storage=optuna.storages.JournalStorage(self.storage.journal()),
            sampler=sampler,
            direction="maximize",
            load_if_exists=True,
        )

    def _load_state(self) -> _SearchState:
        state = _SearchState()
        for record in self.storage.read_all("trials"):
            result = TrialResult.model_validate(record)
            state.trials[result.number] = result
        for record in self.storage.read_all("full"):
            result = TrialResult.model_validate(record)
            state.full[result.full_eval] = result
        return state

    def _search(self, candidates: CandidateSet, valset: list[dspy.Example], pool: WorkerPool) -> MiproResult:
        import optuna
        import ray
        from optuna.trial import TrialState

        b, steps = self.budget, self.search.full_eval_steps
        val_ids = [str(e.id) for e in valset]
        if len(set(val_ids)) != len(val_ids):
            raise ValueError("valset ids must be unique")
        examples_by_id = {str(e.id): e for e in valset}
        distributions = candidates.distributions()
        study = self._open_study()
        state = self._load_state()
        # Full evaluations after every `steps` minibatch trials, and one at the end (MIPROv2's schedule).
        full_evals_planned = (b.num_trials // steps + (1 if b.num_trials % steps else 0)) if b.minibatch else 0
        mb_size = b.minibatch_size if b.minibatch else len(val_ids)

        candidates_ref = ray.put(candidates)
        examples_ref = ray.put(examples_by_id)
        queue: collections.deque[TrialRequest] = collections.deque()
        full_chunks: dict[int, list[TrialResult]] = {}
        full_in_progress: dict[int, int] = {}  # seq -> number of chunks
        evaluated_now: list[int] = []

        def enqueue_full(seq: int, params: dict[str, int]) -> None:
            parts = chunked(val_ids, self.workers)
            full_in_progress[seq] = len(parts)
            full_chunks[seq] = []
            for i, ids in enumerate(parts):
                queue.appendleft(TrialRequest(number=-1, kind="full", params=params, example_ids=ids,
                                              full_eval=seq, chunk=i))

        def add_full_to_study(result: TrialResult) -> None:
            study.add_trial(optuna.trial.create_trial(
                params=result.params, distributions=distributions, value=result.score,
                user_attrs={FULL_EVAL_ATTR: result.full_eval},
            ))

        # -- recover what a killed run left --------------------------------------------------
        in_study = {t.user_attrs.get(FULL_EVAL_ATTR) for t in study.get_trials(deepcopy=False)}
        for seq, result in sorted(state.full.items()):
            if seq not in in_study:  # written, but the process died before telling the study
                add_full_to_study(result)
        asked = 0
        for t in study.get_trials(deepcopy=False):
            if FULL_EVAL_ATTR in t.user_attrs:
                continue
            if t.state == TrialState.COMPLETE:
                asked += 1
            elif t.state == TrialState.RUNNING:
                if t.number in state.trials:
                    study.tell(t.number, state.trials[t.number].score)
                    asked += 1
                elif set(t.params) == set(distributions):
                    queue.append(TrialRequest(number=t.number, kind="minibatch", params=t.params,
                                              example_ids=minibatch_ids(val_ids, mb_size, self.search.seed, t.number)))
                    asked += 1
                else:  # died between ask and its parameters being written
                    study.tell(t.number, state=TrialState.FAIL)
        if state.trials or state.full:
            self.on_event(f"resume: {len(state.trials)} trial(s) and {len(state.full)} full evaluation(s) "
                          f"already done; {len(queue)} unfinished trial(s) will run again")
        if 0 not in state.full:
            enqueue_full(0, candidates.default_params())

        def next_full_eval() -> None:
            """Start the next scheduled full evaluation if it is due and none is running."""
            if full_in_progress or 0 not in state.full:
                return
            k = len(state.full) + state.skipped_full  # done (baseline included) -> the k-th after it is next
            if k > full_evals_planned or len(state.trials) < min(k * steps, b.num_trials):
                return
            done = state.fully_evaluated(candidates)
            means: dict[str, list[TrialResult]] = collections.defaultdict(list)
            for r in state.trials.values():
                means[candidates.combo_key(r.params)].append(r)
            ranked = sorted(
                ((sum(r.score for r in rs) / len(rs), len(rs), -min(r.number for r in rs), key, rs[0].params)
                 for key, rs in means.items() if key not in done),
                reverse=True,
            )
            if not ranked:
                state.skipped_full += 1  # every combination tried is already fully evaluated
                self.on_event(f"full evaluation {k}: skipped, no new combination to evaluate")
                return
            mean, _, _, _, params = ranked[0]
            self.on_event(f"full evaluation {k}: best mean minibatch combination ({mean:.3f}) on {len(val_ids)} examples")
            enqueue_full(len(state.full), params)

        def submit(request: TrialRequest) -> None:
            pool.submit(request, "trial", request, candidates_ref, examples_ref)

        # -- the loop ----------------------------------------------------------------------
        while True:
            next_full_eval()
            while pool.has_idle():
                if queue:
                    submit(queue.popleft())
                elif asked < b.num_trials:
                    trial = study.ask(fixed_distributions=distributions)
                    asked += 1
                    submit(TrialRequest(number=trial.number, kind="minibatch", params=trial.params,
                                        example_ids=minibatch_ids(val_ids, mb_size, self.search.seed, trial.number)))
                else:
                    break
            if not pool.busy:
                break
            try:
                request, result = pool.wait_one()
            except ray.exceptions.RayError as exc:
                raise SearchError(f"a trial failed on its worker after retries: {exc}") from exc
            if result.summary.n and result.summary.lm_failures == result.summary.n:
                first = next(s.program_error for s in result.scores if s.program_error)
                raise SearchError(f"every LM call of trial {request.number} failed ({first}); "
                                  f"fix the endpoint and run again with --resume")
            if request.kind == "minibatch":
                # Persist first, then tell: a kill in between is healed on resume from the file.
                self.storage.write_json(f"trials/{result.number:05d}-{uuid.uuid4().hex[:8]}.json", result.model_dump())
                study.tell(result.number, result.score)
                state.trials[result.number] = result
                evaluated_now.append(result.number)
                self.on_event(f"trial {result.number:>3} minibatch {result.score:.3f}  {_short(result.params)}"
                              f"  ({len(state.trials)}/{b.num_trials}, {result.seconds:.1f}s)")
                continue
            seq = request.full_eval
            full_chunks[seq].append(result)
            if len(full_chunks[seq]) < full_in_progress[seq]:
                continue
            merged = merge_chunks(full_chunks.pop(seq), self.spec.label_fields)
            del full_in_progress[seq]
            self.storage.write_json(f"full/{seq:03d}-{uuid.uuid4().hex[:8]}.json", merged.model_dump())
            add_full_to_study(merged)
            state.full[seq] = merged
            label = "baseline" if seq == 0 else f"full evaluation {seq}"
            best = max(r.score for r in state.full.values())
            self.on_event(f"{label}: {merged.score:.3f} on {merged.summary.n} examples  {_short(merged.params)}"
                          f"  (best so far {best:.3f})")

        return self._result(candidates, state, evaluated_now)

    def _result(self, candidates: CandidateSet, state: _SearchState, evaluated_now: list[int]) -> MiproResult:
        scored: list[TrialResult] = list(state.full.values())
        if not self.budget.minibatch:
            scored += list(state.trials.values())  # every trial already saw the whole valset
        best = max(scored, key=lambda r: (r.score, -(r.full_eval or 0)))
        return MiproResult(
            best_params=best.params,
            best_score=best.score,
            baseline_score=state.full[0].score,
            trials=[state.trials[n] for n in sorted(state.trials)],
            full_evals=[state.full[k] for k in sorted(state.full)],
            candidates=candidates,
            evaluated_this_run=evaluated_now,
        )


def _short(params: dict[str, int]) -> str:
    return " ".join(f"{k.replace('_predictor_', ':')}={v}" for k, v in params.items())
