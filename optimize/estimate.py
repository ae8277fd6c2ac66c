"""How many LM calls a run will make, worked out before it makes any.

The numbers are estimates where the optimizer decides at run time (how many
teacher calls bootstrapping needs before it has its demos: assumed two per demo
wanted, at most the trainset; how long GEPA reflects).  Program calls count
one per example; with ``--judge`` every scored example adds a judge call.

    >>> est = estimate_calls(cfg, budget, n_train=200, n_val=100, n_dev=100, num_predictors=1)  # doctest: +SKIP
    >>> print(est.table())                                                                      # doctest: +SKIP
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from optimize.config import OptimizeConfig, ResolvedBudget

# Bootstrapping stops once it has its demos; assume half of the teacher's answers pass the metric.
TRIES_PER_BOOTSTRAPPED_DEMO = 2
COPRO_AUTO = {"light": (4, 2), "medium": (8, 3), "heavy": (12, 4)}  # (breadth, depth)


class CallEstimate(BaseModel):
    """LM calls by phase; ``total`` is what ``--max-calls`` is checked against."""

    lines: list[tuple[str, int]] = Field(default_factory=list, description="(phase, calls)")

    def add(self, phase: str, calls: int) -> None:
        self.lines.append((phase, int(calls)))

    @property
    def total(self) -> int:
        return sum(n for _, n in self.lines)

    def table(self) -> str:
        width = max([len(p) for p, _ in self.lines] + [5])
        rows = [f"  {p:<{width}}  {n:>9,}" for p, n in self.lines]
        rows.append(f"  {'total':<{width}}  {self.total:>9,}")
        return "\n".join(rows)


def bootstrap_calls(n_train: int, max_bootstrapped: int) -> int:
    return min(n_train, TRIES_PER_BOOTSTRAPPED_DEMO * max(1, max_bootstrapped))


def estimate_calls(
    cfg: OptimizeConfig, budget: ResolvedBudget, *, n_train: int, n_val: int, n_dev: int, num_predictors: int
) -> CallEstimate:
    s = cfg.search
    per_example = num_predictors + (1 if cfg.judge else 0)
    est = CallEstimate()
    if cfg.optimizer == "miprov2":
        bootstrap_sets = max(0, budget.num_fewshot_candidates - 2)  # minus the zero-shot and labeled-only sets
        boot = 3 if budget.zeroshot else s.max_bootstrapped_demos
        est.add(f"bootstrap {bootstrap_sets} demo sets", bootstrap_sets * bootstrap_calls(n_train, boot) * num_predictors)
        if s.data_aware_proposer:
            batches = max(1, min(10, -(-n_train // s.view_data_batch_size)))
            est.add("dataset summary", batches + 1)
        per_proposal = 1 + (2 if s.program_aware_proposer else 0)
        proposals = max(0, budget.num_instruct_candidates - 1) * num_predictors
        est.add(f"propose {proposals} instructions", proposals * per_proposal)
        if budget.minibatch:
            fulls = 1 + budget.num_trials // s.full_eval_steps + (1 if budget.num_trials % s.full_eval_steps else 0)
            est.add(f"{budget.num_trials} minibatch trials x {budget.minibatch_size}",
                    budget.num_trials * budget.minibatch_size * per_example)
            est.add(f"{fulls} full evaluations x {n_val}", fulls * n_val * per_example)
        else:
            est.add(f"{budget.num_trials + 1} full-valset trials x {n_val}", (budget.num_trials + 1) * n_val * per_example)
    elif cfg.optimizer == "bootstrap":
        est.add("bootstrap teacher calls", bootstrap_calls(n_train, s.max_bootstrapped_demos) * num_predictors)
    elif cfg.optimizer == "bootstrap_rs":
        n = budget.num_fewshot_candidates
        est.add(f"bootstrap {n} candidate programs", n * bootstrap_calls(n_train, s.max_bootstrapped_demos) * num_predictors)
        est.add(f"evaluate {n + 3} candidates x {n_val}", (n + 3) * n_val * per_example)
    elif cfg.optimizer == "copro":
        breadth, depth = COPRO_AUTO[s.auto or "light"]
        breadth, depth = s.breadth or breadth, s.depth or depth
        est.add(f"propose ({depth} rounds)", depth * num_predictors)
        est.add(f"evaluate {breadth}x{depth} candidates x {n_val}", breadth * depth * num_predictors * n_val * per_example)
    elif cfg.optimizer == "gepa":
        from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS as GEPA_AUTO
        from dspy.teleprompt.gepa.gepa import GEPA

        metric_calls = GEPA.auto_budget(
            None, num_preds=num_predictors, num_candidates=GEPA_AUTO[s.auto or "light"]["n"], valset_size=n_val
        )
        est.add("GEPA program evaluations", metric_calls * per_example)
        # Each GEPA step scores a 3-example minibatch before and after one reflection call.
        est.add("GEPA reflection calls", metric_calls // 6)
    est.add(f"dev evaluation (baseline + result) x {n_dev}", 2 * n_dev * per_example)
    return est
