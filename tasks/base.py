"""What a task declares: everything batch, optimize, serve and drift need to run one kind of work.

A task is one file in this package (or any importable module) holding a
``TASK = Task(...)``; see ``tasks/triage.py`` for a whole one.  From it:

* ``python -m pipelines <task> --input ... --output ...`` runs :attr:`Task.stages`
  over a corpus (each stage a Ray Data actor pool);
* ``python -m optimize --task <task>`` optimizes :attr:`Task.program` on
  :attr:`Task.data`, scored by :attr:`Task.metric`;
* ``python -m serve --task <task>`` serves :attr:`Task.program` with an API
  from its signature, and the drift monitor judges live traffic with
  ``metric.live_rubric``.

Resources (a retrieval index) are declared on the program
(:class:`dspy_ray.execution.loading.Resource`); each becomes a CLI flag (``--index``) and is
opened once per actor or replica.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from dspy_ray.execution.loading import ProgramSpec, Resource
from dspy_ray.execution.runner import ProgramRunner
from dspy_ray.execution.scoring import TaskMetric
from dspy_ray.util.paths import REPO_ROOT, repo_path
from stages.base import DSPyStage



@dataclass(frozen=True)
class TaskData:
    """Labelled examples: JSONL rows with an ``id``, the program's inputs and the gold fields."""

    train: str  # relative paths are relative to the repository
    dev: str
    inputs: tuple[str, ...]  # program arguments read from each row
    labels: tuple[str, ...] = ()  # gold keys every row must have (besides the inputs)

    def path(self, which: str | os.PathLike) -> str:
        return resolve_repo_path(which)


def resolve_repo_path(path: str | os.PathLike) -> str:
    """``path`` as given when it exists or is a URI, else relative to the repository."""
    text = str(path)
    return text if "://" in text else str(repo_path(text))


@dataclass(frozen=True)
class CliDefaults:
    """Defaults of the task's batch CLI."""

    text_column: str = "text"  # the input column the stages read (``--text-column`` renames it)
    id_column: str = "id"
    summary_columns: tuple[str, ...] = ()  # label counts printed at the end of a run
    max_chars: int = 20_000
    # A registry of artifacts tuned for the embedded default model, shipped with the task: loaded when the
    # embedded model is the endpoint and no artifact was asked for (--no-default-artifact turns it off).
    embedded_artifacts: str | None = None


@dataclass(frozen=True)
class Task:
    """One kind of work; see the module docstring."""

    name: str
    description: str
    program: ProgramSpec  # optimized and served
    metric: TaskMetric
    data: TaskData | None = None
    stages: tuple[DSPyStage, ...] = ()  # the batch chain; empty = the program alone on its inputs
    cli: CliDefaults = field(default_factory=CliDefaults)
    refine_attempts: int = 3  # the same in batch, optimization and serving: one score

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"task {self.name!r} declares no stages")

    @property
    def primary_stage(self) -> DSPyStage:
        """The stage that runs :attr:`program` (its outputs are what Serve returns)."""
        for stage in self.stages:
            if stage.program.name == self.program.name:
                return stage
        raise ValueError(f"task {self.name!r}: no stage runs its program {self.program.name!r}")

    @property
    def programs(self) -> dict[str, ProgramSpec]:
        return {stage.program.name: stage.program for stage in self.stages}

    @property
    def resources(self) -> tuple[Resource, ...]:
        seen: dict[str, Resource] = {}
        for spec in self.programs.values():
            for resource in spec.resources:
                seen.setdefault(resource.name, resource)
        return tuple(seen.values())

    @property
    def needs_embedder(self) -> bool:
        return any(spec.needs_embedder for spec in self.programs.values())

    def embedded_artifact(self, program: str) -> str | None:
        """The best shipped artifact of ``program`` made for the embedded model, or None."""
        if not self.cli.embedded_artifacts:
            return None
        from dspy_ray.execution.artifacts import list_artifacts
        from dspy_ray.endpoints.local.llm_server import MODEL_ALIAS

        made_for_it = [r for r in list_artifacts(resolve_repo_path(self.cli.embedded_artifacts), program)
                       if r.metadata.model == MODEL_ALIAS and r.metadata.dev_score is not None]
        best = max(made_for_it, key=lambda r: (r.metadata.dev_score, r.metadata.created_at), default=None)
        if best is None:
            return None
        # Relative to the repository, so actors on other nodes (their own copy of it) find it too.
        path = Path(best.path).resolve()
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)

    def add_resource_args(self, parser) -> None:
        """One required flag per resource (``--index``) on an argparse parser."""
        for resource in self.resources:
            parser.add_argument(resource.flag, dest=f"resource_{resource.name}", required=True, help=resource.help,
                                metavar=resource.flag.lstrip("-").upper().replace("-", "_"))

    def resource_settings(self, args) -> dict[str, str]:
        return {r.name: getattr(args, f"resource_{r.name}") for r in self.resources}

    def output_fields(self) -> tuple[str, ...]:
        return self.primary_stage.output_fields

    def runner(self, program: dspy.Module, lm: dspy.BaseLM, *, max_in_flight: int = 64) -> ProgramRunner:
        """A runner of :attr:`program` with this task's policy (outputs, Refine, reward): the same in optimize and serve."""
        return ProgramRunner(program, lm, output_fields=self.output_fields(), refine_attempts=self.refine_attempts,
                             reward_fn=self.program.reward, max_in_flight=max_in_flight)

    def stages_for(self, *, text_column: str | None = None, overrides: Mapping[str, Any] | None = None,
                   artifacts: Mapping[str, str | None] | None = None) -> list[DSPyStage]:
        """The stage chain for one run: the text column renamed, execution settings and artifacts applied."""
        out = []
        for stage in self.stages:
            update = dict(overrides or {})
            if text_column and text_column != self.cli.text_column:
                update["input_fields"] = {arg: (text_column if col == self.cli.text_column else col)
                                          for arg, col in stage.input_fields.items()}
            if artifacts and artifacts.get(stage.program.name):
                update["artifact"] = artifacts[stage.program.name]
            out.append(stage.model_copy(update=update))
        return out
