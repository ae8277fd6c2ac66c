"""The embedded model's default: the shipped tuned artifact, chosen only for that model; per-call nearest demos;
the warning when one label covers nearly every row."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dspy
import pytest

from dspy_ray.execution.artifacts import ArtifactMetadata, save_artifact
from dspy_ray.endpoints.local.llm_server import MODEL_ALIAS
from dspy_ray.execution.loading import load_program
from dspy_ray.endpoints.settings import EndpointSettings
from pipelines.inputs import InputSpec
from pipelines.runner import RunResult, run_pipeline
from programs.demo_pool import demo_pool
from tasks import get_task
from dspy_ray.testing.fake_llm import FakeLLM
from tests.gold import triage_gold

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = get_task("triage")


def test_the_shipped_artifact_is_made_for_the_embedded_model_and_loads():
    path = TRIAGE.embedded_artifact("triage")
    assert path is not None, "tasks/triage.py names a registry with no artifact for the embedded model"
    assert not Path(path).is_absolute()  # repository-relative: every node's copy of the repo has it
    loaded = load_program(TRIAGE.program, path)
    assert loaded.metadata.model == MODEL_ALIAS and loaded.metadata.command.startswith("python -m optimize")
    assert loaded.metadata.dev_score > loaded.metadata.baseline_dev_score
    assert TRIAGE.embedded_artifact("extract_details") is None  # nothing shipped for the other stage


def test_registry_pick_ignores_artifacts_made_for_other_models(tmp_path):
    from tasks.base import CliDefaults

    program = load_program(TRIAGE.program).program
    save_artifact(program, tmp_path, ArtifactMetadata(program="triage", model="big-model", dev_score=0.99))
    mine = save_artifact(program, tmp_path, ArtifactMetadata(program="triage", model=MODEL_ALIAS, dev_score=0.6))
    save_artifact(program, tmp_path, ArtifactMetadata(program="triage", model=MODEL_ALIAS, dev_score=0.4))
    task = dataclasses.replace(TRIAGE, cli=CliDefaults(embedded_artifacts=str(tmp_path)))
    assert Path(task.embedded_artifact("triage")).resolve() == Path(mine).resolve()


def test_nearest_demos_follow_the_input_and_a_small_set_is_kept_whole():
    program = load_program(TRIAGE.program).program
    rows = [json.loads(line) for line in (ROOT / "data/triage_train.jsonl").read_text().splitlines()]
    fields = tuple(program.triage.signature.fields)
    pool = demo_pool([dspy.Example(**r) for r in rows], fields)
    chosen = program.nearest.select(pool, "transcript", "There is a big dog loose biting people on my street")
    assert len(chosen) == program.nearest.k and {d.category for d in chosen} == {"animal"}
    assert program.nearest.select(pool[:5], "transcript", "anything") == pool[:5]  # few demos: all of them


@pytest.mark.slow
def test_embedded_endpoint_gets_the_default_artifact_unless_one_was_chosen(ray_local, tmp_path):
    """On the embedded model a stage with no artifact runs the tuned one; an explicit artifact always wins."""
    calls = tmp_path / "calls.jsonl"
    calls.write_text("".join(json.dumps({"id": f"c{i}", "transcript": f"loud party next door, night {i}"}) + "\n"
                             for i in range(4)))
    tuned = load_program(TRIAGE.program).program
    tuned.triage.signature = tuned.triage.signature.with_instructions("Triage; GOLDEN-RULES apply.")
    artifact = save_artifact(tuned, tmp_path / "reg", ArtifactMetadata(program="triage", model=MODEL_ALIAS,
                                                                       dev_score=0.9))
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({**json.loads(line), "priority": "non_urgent", "category": "noise"}) + "\n"
                                for line in calls.read_text().splitlines()))
    stage = TRIAGE.stages_for(overrides={"num_actors": 1})[0]
    with FakeLLM(gold=triage_gold([labelled]), gold_keyword="GOLDEN-RULES") as fake:
        # An endpoint that is the embedded model (origin), served here by the fake: the default applies.
        embedded = EndpointSettings(base_url=fake.base_url, model=MODEL_ALIAS, origin="embedded")
        spec = InputSpec(str(calls), text_column="transcript")
        result = run_pipeline(spec, str(tmp_path / "a"), [stage], embedded, summary_columns=("category",),
                              embedded_default=lambda s: artifact)
        assert result.label_counts["category"] == {"noise": 4}
        # Any other endpoint: no default artifact, the program as written.
        other = EndpointSettings(base_url=fake.base_url, model="other")
        result = run_pipeline(spec, str(tmp_path / "b"), [stage], other, summary_columns=("category",),
                              embedded_default=lambda s: artifact)
        assert result.label_counts["category"] != {"noise": 4}
        # An explicit artifact (here: the unoptimized program's JSON) wins over the default.
        plain = tmp_path / "plain.json"
        load_program(TRIAGE.program).program.save(str(plain))
        result = run_pipeline(spec, str(tmp_path / "c"), [stage.model_copy(update={"artifact": str(plain)})],
                              embedded, summary_columns=("category",), embedded_default=lambda s: artifact)
        assert result.label_counts["category"] != {"noise": 4}


@pytest.mark.parametrize(("counts", "warned"), [
    ({"urgent": 19, "non_urgent": 1}, True),
    ({"urgent": 18, "non_urgent": 2}, False),  # exactly 90% is not "more than"
    ({"urgent": 10}, False),  # too few rows to tell
])
def test_constant_output_warning(counts, warned):
    result = RunResult("out", sum(counts.values()), 0, 0, 1.0, label_counts={"priority": counts})
    lines = result.constant_output_warnings()
    assert bool(lines) == warned
    if warned:
        assert "priority=urgent" in lines[0] and "95%" in lines[0] and lines[0] in result.summary()


@pytest.mark.parametrize(("argv", "default"), [
    ([], True),                                  # the embedded model gets the tuned artifact ...
    (["--no-default-artifact"], False),          # ... unless the run asks for the program as written
    (["--artifact-dir", "some/registry"], False),  # ... or chose its own artifacts
])
def test_cli_flags_decide_the_embedded_default(argv, default):
    from pipelines.cli import build_parser, embedded_default_hook

    said = []
    args = build_parser(TRIAGE, "python -m pipelines triage").parse_args(["--input", "x", "--output", "y", *argv])
    hook = embedded_default_hook(TRIAGE, args, said.append)
    assert (hook is not None) == default
    if default:
        stages = {s.program.name: s for s in TRIAGE.stages_for()}
        assert hook(stages["triage"]) == TRIAGE.embedded_artifact("triage") and "tuned" in said[0]
        assert hook(stages["extract_details"]) is None  # nothing shipped for that stage
