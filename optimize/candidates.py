"""MIPROv2's candidates - few-shot demo sets and instructions per predictor - made in parallel.

DSPy's MIPROv2 makes them one after another from one RNG
(``create_n_fewshot_demo_sets``, then ``GroundedProposer``).  Only the RNG draws
are sequential; the LM work behind each draw is independent.  So the driver
replays DSPy's draws in DSPy's order (:func:`plan_demo_sets`,
:func:`plan_proposals`) and each demo set, the dataset summary and each
instruction proposal runs as its own call on the run's Ray workers.  With a deterministic LM the
result is the candidate set DSPy's own ``MIPROv2.compile`` would search
(``benchmarks/optimize_speedup.py`` checks this).

The result is a :class:`CandidateSet`: plain JSON, stored next to the study so a
resumed run searches the same candidates without making them again.

    >>> candidates = CandidateSet.model_validate_json(text)          # doctest: +SKIP
    >>> program = candidates.apply(fresh_program(), {"0_predictor_instruction": 2, "0_predictor_demos": 1})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from collections.abc import Iterator
from typing import Any, Literal

import dspy
from pydantic import BaseModel, ConfigDict, Field

from optimize.evaluation import Pool

logger = logging.getLogger(__name__)

# The constants MIPROv2 uses (dspy/teleprompt/mipro_optimizer_v2.py).
BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT = 3
LABELED_FEWSHOT_EXAMPLES_IN_CONTEXT = 0


# -- the candidate set ------------------------------------------------------------


class PredictorCandidates(BaseModel):
    name: str = Field(..., description="Predictor name in the program (named_predictors order)")
    instructions: list[str] = Field(..., description="Instruction candidates; index 0 is the original")
    demo_sets: list[list[dict[str, Any]]] = Field(
        default_factory=list, description="Few-shot demo set candidates; index 0 is the zero-shot set"
    )


class CandidateSet(BaseModel):
    """Everything a trial picks from; a trial's params are indices into these lists."""

    model_config = ConfigDict(extra="forbid")

    program: str = Field(..., description="Name of the program the candidates are for")
    predictors: list[PredictorCandidates] = Field(..., description="Candidates per predictor, in program order")
    search_demos: bool = Field(True, description="False in zero-shot runs: demo sets only informed proposals")

    @staticmethod
    def instruction_param(i: int) -> str:
        return f"{i}_predictor_instruction"  # DSPy's parameter names, so trial logs read the same

    @staticmethod
    def demos_param(i: int) -> str:
        return f"{i}_predictor_demos"

    def choices(self) -> dict[str, int]:
        """Parameter name -> number of choices."""
        out = {}
        for i, p in enumerate(self.predictors):
            out[self.instruction_param(i)] = len(p.instructions)
            if self.search_demos:
                out[self.demos_param(i)] = len(p.demo_sets)
        return out

    def default_params(self) -> dict[str, int]:
        """The unoptimized program: original instructions, no demos."""
        return {name: 0 for name in self.choices()}

    def distributions(self):
        import optuna

        return {name: optuna.distributions.CategoricalDistribution(list(range(n))) for name, n in self.choices().items()}

    def combo_key(self, params: dict[str, int]) -> str:
        return ",".join(f"{name}={params[name]}" for name in self.choices())

    def apply(self, program: dspy.Module, params: dict[str, int]) -> dspy.Module:
        """``program`` (a fresh one) with the chosen instruction and demo set in every predictor."""
        for i, (name, predictor) in enumerate(program.named_predictors()):
            cand = self.predictors[i]
            if cand.name != name:
                raise ValueError(f"candidate set is for predictor {cand.name!r} at position {i}, program has {name!r}")
            predictor.signature = predictor.signature.with_instructions(cand.instructions[params[self.instruction_param(i)]])
            if self.search_demos:
                predictor.demos = [dspy.Example(**d) for d in cand.demo_sets[params[self.demos_param(i)]]]
        return program


# -- plans: DSPy's RNG draws, replayed on the driver ---------------------------------


class DemoSetPlan(BaseModel):
    """One demo-set candidate, as ``create_n_fewshot_demo_sets`` would make it."""

    index: int = Field(..., description="Position in the candidate list")
    kind: Literal["zeroshot", "labeled", "bootstrap"] = Field(..., description="How the set is made")
    order: list[int] = Field(default_factory=list, description="Trainset positions in the order bootstrapping sees them")
    max_bootstrapped: int = Field(0, description="Bootstrapped demos wanted")
    max_labeled: int = Field(0, description="Labeled demos wanted")


def plan_demo_sets(
    n_train: int, num_sets: int, max_bootstrapped: int, max_labeled: int, rng: random.Random, min_num_samples: int = 1
) -> list[DemoSetPlan]:
    """The same branches and draws as ``dspy.teleprompt.utils.create_n_fewshot_demo_sets``."""
    plans = []
    positions = list(range(n_train))
    for index, seed in enumerate(range(-3, num_sets - 3)):
        if seed == -3:
            plans.append(DemoSetPlan(index=index, kind="zeroshot"))
        elif seed == -2 and max_labeled > 0:
            plans.append(DemoSetPlan(index=index, kind="labeled", order=positions, max_labeled=max_labeled))
        elif seed == -1:
            plans.append(DemoSetPlan(index=index, kind="bootstrap", order=positions,
                                     max_bootstrapped=max_bootstrapped, max_labeled=max_labeled))
        else:
            order = list(positions)
            rng.shuffle(order)
            size = rng.randint(min_num_samples, max_bootstrapped)
            plans.append(DemoSetPlan(index=index, kind="bootstrap", order=order,
                                     max_bootstrapped=size, max_labeled=max_labeled))
    return plans


class ProposalPlan(BaseModel):
    pred_i: int = Field(..., description="Predictor index")
    demo_set_i: int = Field(..., description="Demo set the proposal looks at")
    tip: str | None = Field(None, description="Prompting tip text (GroundedProposer TIPS)")
    rollout_id: int = Field(..., description="Rollout id drawn for this proposal (keeps LM caches apart)")
    needed: bool = Field(True, description="False for the first proposal: MIPROv2 replaces it by the original")


def plan_proposals(
    num_predictors: int, num_demo_sets: int, n: int, rng: random.Random, tip_aware: bool
) -> list[ProposalPlan]:
    """The draws ``GroundedProposer.propose_instructions_for_program`` makes, in its order."""
    from dspy.propose.grounded_proposer import TIPS

    num_demos = max(num_demo_sets, 1) if num_demo_sets else n
    plans = []
    for pred_i in range(num_predictors):
        for demo_set_i in range(num_demos)[: min(n, num_demos)]:
            tip = None
            if tip_aware:
                tip = TIPS[rng.choice(list(TIPS.keys()))]
            rollout_id = rng.randint(0, 10**9)
            plans.append(ProposalPlan(pred_i=pred_i, demo_set_i=demo_set_i, tip=tip, rollout_id=rollout_id,
                                      needed=demo_set_i != 0))
    return plans


# -- the work: pure functions of (plan, data, LM) -------------------------------------


def make_demo_set(
    plan: DemoSetPlan, student: dspy.Module, trainset: list[dspy.Example], metric, max_errors: int | None = None
) -> list[list[dict[str, Any]]]:
    """Demos per predictor for one plan (``student``: a fresh program); call under ``dspy.context(lm=...)``."""
    from dspy.teleprompt.bootstrap import BootstrapFewShot, LabeledFewShot

    ordered = [trainset[i] for i in plan.order]
    if plan.kind == "zeroshot":
        compiled = student.reset_copy()
    elif plan.kind == "labeled":
        compiled = LabeledFewShot(k=plan.max_labeled).compile(student, trainset=ordered, sample=True)
    else:
        compiled = BootstrapFewShot(
            metric=metric,
            max_errors=max_errors,
            max_bootstrapped_demos=plan.max_bootstrapped,
            max_labeled_demos=plan.max_labeled,
            max_rounds=1,
        ).compile(student, trainset=ordered)
    return [[_demo_dict(d) for d in predictor.demos] for predictor in compiled.predictors()]


def _demo_dict(demo: Any) -> dict[str, Any]:
    data = demo.toDict() if hasattr(demo, "toDict") else dict(demo)
    return {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in data.items()}


def summarize_dataset(trainset: list[dspy.Example], view_data_batch_size: int, lm: dspy.BaseLM) -> str | None:
    """DSPy's dataset summary; None when it fails (MIPROv2 then runs without one, as DSPy does)."""
    from dspy.propose.dataset_summary_generator import create_dataset_summary

    try:
        return create_dataset_summary(trainset=trainset, view_data_batch_size=view_data_batch_size, prompt_model=lm)
    except Exception as exc:  # noqa: BLE001 - DSPy also carries on without the summary
        logger.warning("dataset summary failed (%s); proposing without it", exc)
        return None


class _PresetDraw:
    """Stands in for the proposer's RNG: the rollout id was already drawn on the driver."""

    def __init__(self, rollout_id: int):
        self.rollout_id = rollout_id

    def randint(self, a: int, b: int) -> int:
        return self.rollout_id


def propose_instruction(
    plan: ProposalPlan,
    student: dspy.Module,
    demo_candidates: dict[int, list[list[dict[str, Any]]]] | None,
    data_summary: str | None,
    settings: MiproCandidateSettings,
    lm: dspy.BaseLM,
) -> str:
    """One instruction, exactly as ``GroundedProposer.propose_instruction_for_predictor`` makes it."""
    from dspy.propose.grounded_proposer import GroundedProposer

    demos = (
        {i: [[dspy.Example(**d) for d in s] for s in sets] for i, sets in demo_candidates.items()}
        if demo_candidates else None
    )
    proposer = GroundedProposer(
        prompt_model=lm,
        program=student,
        trainset=[],
        program_aware=settings.program_aware_proposer,
        use_dataset_summary=False,  # made once, in its own task; set below
        use_task_demos=settings.fewshot_aware_proposer,
        num_demos_in_context=BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT,
        use_tip=settings.tip_aware_proposer,
        set_tip_randomly=settings.tip_aware_proposer,
        use_instruct_history=False,
        set_history_randomly=False,
        rng=_PresetDraw(plan.rollout_id),
        init_temperature=settings.init_temperature,
    )
    proposer.data_summary = data_summary
    proposer.use_dataset_summary = settings.data_aware_proposer and data_summary is not None
    if not demos:
        proposer.use_task_demos = False
    if settings.tip_aware_proposer:
        proposer.use_tip = bool(plan.tip)
    predictor = student.predictors()[plan.pred_i]
    return proposer.propose_instruction_for_predictor(
        program=student, predictor=predictor, pred_i=plan.pred_i, demo_candidates=demos,
        demo_set_i=plan.demo_set_i, trial_logs={}, tip=plan.tip,
    )


class MiproCandidateSettings(BaseModel):
    """The proposal switches of MIPROv2 (same names and defaults as ``MIPROv2.compile``)."""

    program_aware_proposer: bool = Field(True, description="Describe the program's code to the proposer")
    data_aware_proposer: bool = Field(True, description="Give the proposer a summary of the trainset")
    tip_aware_proposer: bool = Field(True, description="Give the proposer a random prompting tip")
    fewshot_aware_proposer: bool = Field(True, description="Show the proposer bootstrapped demos")
    view_data_batch_size: int = Field(10, ge=1, description="Examples per dataset-summary call")
    init_temperature: float = Field(1.0, ge=0, description="Proposer sampling temperature")


# -- orchestration -----------------------------------------------------------------------


@contextlib.contextmanager
def quiet_dspy(lm: dspy.BaseLM, adapter: dspy.Adapter) -> Iterator[None]:
    """``lm`` as DSPy's LM, with DSPy's progress bars and prints kept out of the worker logs."""
    dspy_logger = logging.getLogger("dspy")
    level = dspy_logger.level
    dspy_logger.setLevel(logging.ERROR)  # e.g. its own proposer passes fields its signatures lack
    try:
        with dspy.context(lm=lm, adapter=adapter), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        dspy_logger.setLevel(level)


def generate_candidates(
    predictors: list[tuple[str, str]],
    program_name: str,
    trainset: list[dspy.Example],
    *,
    rng: random.Random,
    num_fewshot_candidates: int,
    num_instruct_candidates: int,
    max_bootstrapped_demos: int,
    max_labeled_demos: int,
    settings: MiproCandidateSettings,
    pool: Pool,
    max_errors: int | None = None,
) -> CandidateSet:
    """Bootstrap demo sets and propose instructions on the pool's workers; ``rng`` is MIPROv2's seeded RNG.

    ``predictors``: (name, original instructions) of each predictor, in program
    order; the workers' ``demo_set``, ``summary`` and ``propose`` methods do the LM work.
    """
    import ray

    zeroshot = max_bootstrapped_demos == 0 and max_labeled_demos == 0
    names = [name for name, _ in predictors]
    plans = plan_demo_sets(
        len(trainset), num_fewshot_candidates,
        BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT if zeroshot else max_bootstrapped_demos,
        LABELED_FEWSHOT_EXAMPLES_IN_CONTEXT if zeroshot else max_labeled_demos,
        rng,
    )
    train_ref = ray.put(trainset)
    # The summary depends only on the trainset: it runs while the demo sets are bootstrapped.
    calls = [("summary", "summary", (train_ref, settings.view_data_batch_size))] if settings.data_aware_proposer else []
    calls += [(("demos", p.index), "demo_set", (p, train_ref, max_errors)) for p in plans]
    done = pool.map(calls)
    demo_sets = {p.index: done[("demos", p.index)] for p in plans}
    demo_candidates = {i: [demo_sets[p.index][i] for p in plans] for i in range(len(names))}
    data_summary = done.get("summary")

    proposals = plan_proposals(len(names), len(plans), num_instruct_candidates, rng, settings.tip_aware_proposer)
    needed = [p for p in proposals if p.needed]
    demo_ref = ray.put(demo_candidates)
    done = pool.map([((p.pred_i, p.demo_set_i), "propose", (p, demo_ref, data_summary, settings)) for p in needed])
    made = []
    for i, (name, instructions) in enumerate(predictors):
        texts = [instructions]  # MIPROv2 puts the original first, in place of proposal 0
        texts += [done[(p.pred_i, p.demo_set_i)] for p in proposals if p.pred_i == i and p.needed]
        made.append(PredictorCandidates(name=name, instructions=texts, demo_sets=[] if zeroshot else demo_candidates[i]))
    return CandidateSet(program=program_name, predictors=made, search_demos=not zeroshot)
