"""One typed object for an optimization run (CLI flags map onto it one to one).

    >>> cfg = OptimizeConfig(task="triage", optimizer="miprov2", workers=4)
    >>> cfg.search.minibatch_size
    35
    >>> OptimizeConfig(pipeline="triage").task    # the field's name before it was ``task`` (saved runs)
    'triage'
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from optimize.candidates import MiproCandidateSettings
from dspy_ray.util.cli import EXIT_USAGE


class OptimizeError(RuntimeError):
    """A run that cannot start or go on as asked (message says why and what to do)."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


AutoLevel = Literal["light", "medium", "heavy"]

# MIPROv2's auto settings (dspy/teleprompt/mipro_optimizer_v2.py).
AUTO_RUN_SETTINGS: dict[str, dict[str, int]] = {
    "light": {"n": 6, "val_size": 100},
    "medium": {"n": 12, "val_size": 300},
    "heavy": {"n": 18, "val_size": 1000},
}
MIN_MINIBATCH_SIZE = 50  # MIPROv2 scores on minibatches only when the valset is larger than this


class SearchSettings(MiproCandidateSettings):
    """Budget and candidate knobs; names and defaults follow DSPy's optimizers."""

    model_config = ConfigDict(extra="forbid")

    auto: AutoLevel | None = Field("light", description="Budget preset (MIPROv2/GEPA auto); explicit values win")
    num_candidates: int | None = Field(None, ge=3, description="Candidates per predictor (default: from auto)")
    num_trials: int | None = Field(None, ge=1, description="Minibatch trials (default: from auto)")
    minibatch_size: int = Field(35, ge=1, description="Examples per minibatch trial")
    full_eval_steps: int = Field(5, ge=1, description="Minibatch trials between full evaluations")
    max_bootstrapped_demos: int = Field(4, ge=0, description="Bootstrapped demos per predictor")
    max_labeled_demos: int = Field(4, ge=0, description="Labeled demos per predictor")
    seed: int = Field(9, description="Seed for candidates, minibatches and the TPE sampler")
    val_size: int | None = Field(None, ge=1, description="Valset size carved from train (default: auto's val_size)")
    # COPRO / GEPA
    breadth: int | None = Field(None, ge=2, description="COPRO candidates per round (default: from auto)")
    depth: int | None = Field(None, ge=1, description="COPRO rounds (default: from auto)")


class ResolvedBudget(BaseModel):
    """The numbers a run actually uses once auto presets are applied."""

    num_trials: int
    num_fewshot_candidates: int
    num_instruct_candidates: int
    minibatch: bool
    minibatch_size: int
    val_size: int
    zeroshot: bool


def candidate_plan(budget: ResolvedBudget) -> str:
    """What MIPROv2's candidate step makes, in the words both the estimate and the run print."""
    n, k = budget.num_fewshot_candidates, budget.num_instruct_candidates
    return (f"{n} demo sets per predictor ({max(0, n - 2)} bootstrapped, plus zero-shot and labeled), "
            f"{k} instructions per predictor ({max(0, k - 1)} proposed, plus the original)")


def resolve_budget(search: SearchSettings, num_predictors: int, n_train: int) -> ResolvedBudget:
    """MIPROv2's ``_set_hyperparams_from_run_mode`` and ``_set_num_trials_from_num_candidates``."""
    zeroshot = search.max_bootstrapped_demos == 0 and search.max_labeled_demos == 0
    preset = AUTO_RUN_SETTINGS[search.auto] if search.auto else None
    n = search.num_candidates or (preset["n"] if preset else None)
    if n is None:
        raise OptimizeError("set --auto or --num-candidates")
    num_instruct = n if (zeroshot or search.num_candidates) else int(n * 0.5)
    num_vars = num_predictors * (1 if zeroshot else 2)
    default_trials = int(max(2 * num_vars * math.log2(n), 1.5 * n))
    if search.num_trials is None and preset is None:
        raise OptimizeError(f"set --num-trials (about {default_trials} for {n} candidates) or --auto")
    val_size = search.val_size or (preset["val_size"] if preset else 100)
    val_size = max(1, min(val_size, n_train // 2))
    minibatch = val_size > MIN_MINIBATCH_SIZE if preset else True
    minibatch_size = min(search.minibatch_size, val_size)
    return ResolvedBudget(
        num_trials=search.num_trials or default_trials,
        num_fewshot_candidates=n,
        num_instruct_candidates=num_instruct,
        minibatch=minibatch and minibatch_size < val_size,
        minibatch_size=minibatch_size if minibatch else val_size,
        val_size=val_size,
        zeroshot=zeroshot,
    )


class OptimizeConfig(BaseModel):
    """A whole run: what to optimize, how, where the state lives and how hard to push the endpoint."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(..., validation_alias=AliasChoices("task", "pipeline"),
                      description="Task to optimize: a built-in name or 'package.module[:ATTR]' (also read as "
                                  "'pipeline', its name in runs saved before)")
    optimizer: str = Field("miprov2", description="Optimizer name in optimize.optimizers.OPTIMIZERS")
    search: SearchSettings = Field(default_factory=SearchSettings, description="Budget and candidate settings")
    workers: int = Field(4, ge=1, description="Ray workers evaluating trials at once")
    threads_per_worker: int = Field(8, ge=1, description="Examples in flight per worker (capped by the LM budget)")
    worker_cpus: float = Field(0.25, gt=0, description="CPUs reserved per worker task (I/O bound)")
    out: str = Field("artifacts", description="Artifact directory")
    run_dir: str | None = Field(None, description="Run state URI (path, s3://, gs://, fsspec); default under --out")
    resume: bool = Field(False, description="Continue the run in run_dir; finished trials are not redone")
    max_calls: int | None = Field(None, ge=0, description="Stop before starting when the estimate exceeds this")
    judge: bool = Field(False, description="Score summaries with the judge LM (JUDGE_* settings)")
    mlflow: bool = Field(False, description="Log to MLflow when it is installed")
    train_path: str | None = Field(None, description="Training JSONL (default: the task's)")
    dev_path: str | None = Field(None, description="Dev JSONL (default: the task's)")
    train_limit: int | None = Field(None, ge=2, description="Use only the first N training rows")
    dev_limit: int | None = Field(None, ge=1, description="Use only the first N dev rows")
    extra_train: str | None = Field(None, description="Extra training JSONL (gold rows or judged drift samples)")
    extra_train_min_score: float = Field(0.8, description="Judge score a drift sample needs to be used")
    resources: dict[str, str] = Field(default_factory=dict, description="Resource settings (e.g. index path)")

    def fingerprint_fields(self, dataset_hash: str, model: str) -> dict[str, Any]:
        """What determines a run's candidates and trials; a resumed run must match every one
        (runs saved before the rename name the task ``pipeline``: :func:`saved_fingerprint_fields`)."""
        return {
            "task": self.task,
            "optimizer": self.optimizer,
            **{f"search.{k}": v for k, v in self.search.model_dump().items()},
            "judge": self.judge,
            "resources": self.resources,
            "dataset": dataset_hash,
            "model": model,
        }

    def fingerprint(self, dataset_hash: str, model: str) -> str:
        fields = self.fingerprint_fields(dataset_hash, model)
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def command(self, resource_flags: dict[str, str] | None = None) -> str:
        """The ``python -m optimize`` command line for these settings (recorded in the artifact's sidecar).

        ``resource_flags``: resource name -> its command-line flag (the task's)."""
        import shlex

        args = ["python", "-m", "optimize", "--task", self.task, "--optimizer", self.optimizer,
                "--auto", self.search.auto or "none", "--workers", str(self.workers), "--out", self.out]
        defaults = SearchSettings()
        for name in ("num_candidates", "num_trials", "minibatch_size", "full_eval_steps", "max_bootstrapped_demos",
                     "max_labeled_demos", "seed", "val_size", "breadth", "depth"):
            value = getattr(self.search, name)
            if value is not None and value != getattr(defaults, name):
                args += [f"--{name.replace('_', '-')}", str(value)]
        flags = {"--train": self.train_path, "--dev": self.dev_path, "--train-limit": self.train_limit,
                 "--dev-limit": self.dev_limit, "--extra-train": self.extra_train}
        args += [item for flag, value in flags.items() if value is not None for item in (flag, str(value))]
        flag_of = resource_flags or {}
        args += [item for name, value in self.resources.items()
                 for item in (flag_of.get(name, f"--{name.replace('_', '-')}"), value)]
        if self.judge:
            args.append("--judge")
        return shlex.join(args)

    def public(self) -> dict[str, Any]:
        """Settings to record in artifacts and run.json (no endpoint secrets live here)."""
        return self.model_dump(exclude={"resume"})


def saved_fingerprint_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A run record's fingerprint fields, in today's names: a run started before ``pipeline`` became
    ``task`` still resumes."""
    fields = dict(record.get("fingerprint_fields") or {})
    if "pipeline" in fields and "task" not in fields:
        fields["task"] = fields.pop("pipeline")
    return fields
