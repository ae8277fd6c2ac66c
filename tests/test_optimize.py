"""Optimization: parallel MIPROv2 on Ray against the fake endpoint, resume after kill, artifacts, the judge.

The fake endpoint runs in few-shot mode (``tests.gold``): it answers an input
correctly only for the labels its prompt teaches, so a better prompt measurably
scores higher and every run is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dspy
import pytest

from dspy_ray.execution.artifacts import (
    ArtifactMetadata,
    ArtifactMismatchError,
    ProgramLoadError,
    list_artifacts,
    save_artifact,
    sidecar_path,
)
from dspy_ray.execution.loading import load_program
from dspy_ray.execution.scoring import EvalSummary
from dspy_ray.endpoints.settings import EndpointSettings
from optimize.config import OptimizeConfig, SearchSettings
from programs.triage import CallTriager
from tasks import get_task
from dspy_ray.testing.fake_llm import FakeLLM
from tests.gold import triage_gold

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-never-in-artifacts-4242"
DATA = ["data/triage_train.jsonl", "data/triage_dev.jsonl"]
TRIAGE = get_task("triage")


def load_artifact(path, program=None, artifact_dir="artifacts"):
    return load_program(program or TRIAGE.program, path, artifact_dir=artifact_dir)


@pytest.fixture(scope="module")
def gold():
    return triage_gold(DATA)


@pytest.fixture
def gold_llm(gold):
    with FakeLLM(gold=gold, latency=0.005) as fake:
        yield fake


def _settings(fake: FakeLLM, **kw) -> EndpointSettings:
    return EndpointSettings(base_url=fake.base_url, model="fake-model", api_key=SECRET, max_in_flight=32, **kw)


def _config(tmp_path: Path, **kw) -> OptimizeConfig:
    search = SearchSettings(**{"num_trials": 10, "minibatch_size": 20, "val_size": 40, **kw.pop("search", {})})
    values = {"task": "triage", "optimizer": "miprov2", "workers": 4, "threads_per_worker": 4,
              "out": str(tmp_path / "artifacts"), "train_limit": 100, "dev_limit": 30, "search": search}
    return OptimizeConfig(**{**values, **kw})


def _all_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.suffix == ".json")


# -- parallel MIPROv2 -------------------------------------------------------------------


def test_parallel_miprov2_beats_baseline_and_writes_a_dspy_loadable_artifact(ray_local, gold_llm, tmp_path, capsys):
    from optimize.run import print_report, run_optimization

    cfg = _config(tmp_path)
    result = run_optimization(cfg, _settings(gold_llm))
    print_report(result)
    shown = capsys.readouterr()

    assert result.optimized.score >= result.baseline.score + 0.2, (result.baseline, result.optimized)
    assert result.optimized.n == result.baseline.n == 30
    assert set(result.optimized.field_accuracy) == {"priority", "category"}
    assert "baseline" in shown.out and "optimized" in shown.out and result.artifact in shown.out
    assert "estimated LM calls" in shown.err and "trial" in shown.err  # progress lines
    assert len(result.trials_evaluated_this_run) == 10

    # The artifact: named <program>_<model>_<date>_<score>.json, DSPy itself loads it, the sidecar is complete.
    path = Path(result.artifact)
    assert path.name.startswith("triage_fake-model_") and path.name.endswith(f"_{result.optimized.score:.3f}.json")
    plain = CallTriager()
    plain.load(str(path))  # DSPy's own loader, no framework code
    assert plain.triage.demos or plain.triage.signature.instructions != CallTriager().triage.signature.instructions
    meta = json.loads(sidecar_path(path).read_text())
    for key in ("program", "module_class", "signature_hash", "model", "optimizer", "optimizer_settings",
                "dataset_hash", "dev_score", "dspy_version", "created_at"):
        assert meta[key] not in (None, "", {}), key
    assert meta["optimizer"] == "miprov2" and meta["dspy_version"] == dspy.__version__
    assert Path(result.plot).stat().st_size > 10_000  # a real PNG, not an empty figure
    # No secret anywhere: artifact, sidecar, run directory.
    assert SECRET not in _all_text(tmp_path)
    loaded = load_artifact("best", artifact_dir=cfg.out)
    assert loaded.path == str(path) and loaded.metadata.dev_score == pytest.approx(result.optimized.score, abs=1e-4)


def test_estimate_over_max_calls_stops_before_any_lm_call(gold_llm, tmp_path, capsys):
    from optimize.__main__ import main

    rc = main(["--task", "triage", "--lm-base-url", gold_llm.base_url, "--lm-model", "fake-model",
               "--out", str(tmp_path), "--auto", "light", "--max-calls", "100"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "estimated LM calls" in err and "exceed --max-calls 100" in err
    assert gold_llm.stats()["requests"] == 0
    assert not list(tmp_path.iterdir())


def test_mlflow_logs_params_metrics_and_the_artifact(ray_local, gold_llm, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from optimize.run import run_optimization

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # no database in a test (skinny has no SQLAlchemy)
    cfg = _config(tmp_path, optimizer="bootstrap", mlflow=True)
    result = run_optimization(cfg, _settings(gold_llm))
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["optimizer"] == "bootstrap"
    assert run.data.metrics["dev_score"] == pytest.approx(result.optimized.score)
    assert run.data.metrics["baseline_dev_score"] == pytest.approx(result.baseline.score)
    logged = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run.info.run_id)} if hasattr(
        mlflow.artifacts, "list_artifacts") else {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert Path(result.artifact).name in logged and Path(result.plot).name in logged
    assert SECRET not in _all_text(tmp_path / "mlruns")


def test_cli_errors_name_the_problem(tmp_path, capsys):
    from optimize.__main__ import main

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"id": "a", "transcript": "x", "priority": "urgent", "category": "fire"}\nnot json\n')
    assert main(["--pipeline", "triage", "--train", str(bad), "--out", str(tmp_path), "--max-calls", "0"]) == 2
    assert f"{bad} line 2: invalid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "nope", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_kill_redoes_no_finished_trial(ray_local, gold, tmp_path):
    """Kill the optimization driver midway (a preempted node), resume, and check nothing finished is redone."""
    import ray

    from optimize.run import run_optimization

    with FakeLLM(gold=gold, latency=0.15) as fake:
        run_dir = tmp_path / "run"
        argv = [sys.executable, "-m", "optimize", "--task", "triage", "--lm-base-url", fake.base_url, "--lm-model", "fake-model",
                "--out", str(tmp_path / "artifacts"), "--run-dir", str(run_dir), "--workers", "2",
                "--threads-per-worker", "4", "--train-limit", "100", "--dev-limit", "30", "--val-size", "40",
                "--num-trials", "12", "--minibatch-size", "20"]
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        deadline = time.monotonic() + 240
        try:
            while len(list((run_dir / "trials").glob("*.json"))) < 3:
                if proc.poll() is not None:
                    pytest.fail(f"optimizer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
                assert time.monotonic() < deadline, "no trials finished in time"
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        before = {json.loads(p.read_text())["number"] for p in (run_dir / "trials").glob("*.json")}
        assert 3 <= len(before) < 12

        cfg = OptimizeConfig(task="triage", workers=2, threads_per_worker=4, out=str(tmp_path / "artifacts"),
                             run_dir=str(run_dir), resume=True, train_limit=100, dev_limit=30,
                             search=SearchSettings(num_trials=12, minibatch_size=20, val_size=40))
        result = run_optimization(cfg, EndpointSettings(base_url=fake.base_url, model="fake-model"))

    redone = before & set(result.trials_evaluated_this_run)
    assert not redone, f"finished trials evaluated again: {sorted(redone)}"
    after = [json.loads(p.read_text())["number"] for p in (run_dir / "trials").glob("*.json")]
    assert len(after) == len(set(after)) == 12  # every trial exactly once across both processes
    assert set(result.trials_evaluated_this_run) == set(after) - before
    assert result.optimized.score > result.baseline.score


def test_a_worker_lost_midway_is_replaced_and_the_search_completes(ray_local, gold, tmp_path):
    """A trial worker dies mid-run (its node preempted): Ray restarts it, its trial is retried, nothing is lost."""
    import threading

    import ray

    from optimize.config import resolve_budget
    from optimize.data import split_train_val
    from optimize.evaluation import EvalContext
    from optimize.mipro import ParallelMIPROv2
    from optimize.storage import RunStorage
    from optimize.workers import WorkerPool
    from tasks.examples import load_task_data

    train, _ = load_task_data(TRIAGE.data, train_limit=80)
    search = SearchSettings(auto=None, num_candidates=3, num_trials=10, minibatch_size=15, val_size=30)
    budget = resolve_budget(search, 1, len(train))
    trainset, valset = split_train_val(train, budget.val_size, search.seed)
    with FakeLLM(gold=gold, latency=0.1) as fake:
        ctx = EvalContext(task=TRIAGE, lm=_settings(fake), threads=4, num_cpus=0.01)
        storage = RunStorage(str(tmp_path / "run"))
        with WorkerPool(ctx, 2) as pool:
            optimizer = ParallelMIPROv2(search, budget, ctx, workers=2, storage=storage, pool=pool,
                                        on_event=lambda line: None)
            outcome: dict = {}
            thread = threading.Thread(target=lambda: outcome.update(result=optimizer.compile(trainset, valset)))
            thread.start()
            deadline = time.monotonic() + 120
            while len(storage.list("trials")) < 2:
                assert time.monotonic() < deadline and thread.is_alive(), "no trials finished"
                time.sleep(0.05)
            ray.kill(pool.actors[0], no_restart=False)  # the process dies; Ray may restart the actor
            thread.join(timeout=300)
    result = outcome["result"]
    numbers = [t.number for t in result.trials]
    assert len(numbers) == len(set(numbers)) == 10
    assert result.best_score >= result.baseline_score


def test_resume_refuses_other_settings_and_fresh_run_refuses_used_dir(ray_local, gold_llm, tmp_path):
    from optimize.run import OptimizeError, run_optimization

    cfg = _config(tmp_path, optimizer="bootstrap", run_dir=str(tmp_path / "run"))
    run_optimization(cfg, _settings(gold_llm))
    with pytest.raises(OptimizeError, match="already holds a run; add --resume"):
        run_optimization(cfg, _settings(gold_llm))
    other = cfg.model_copy(update={"resume": True, "search": cfg.search.model_copy(update={"max_bootstrapped_demos": 2})})
    with pytest.raises(OptimizeError, match="other settings.*search.max_bootstrapped_demos: 4 then, 2 now"):
        run_optimization(other, _settings(gold_llm))
    # Same settings with --resume: nothing left to compute, so no LM call at all.
    gold_llm.reset_stats()
    again = run_optimization(cfg.model_copy(update={"resume": True}), _settings(gold_llm))
    assert gold_llm.stats()["requests"] == 0
    assert again.optimized.n == 30
    assert len(list_artifacts(cfg.out, "triage")) == 1  # the finished run's artifact, not a second copy


@pytest.mark.parametrize("optimizer", ["bootstrap_rs", "copro", "gepa"])
def test_dspy_optimizers_run_with_evaluation_on_ray(ray_local, gold_llm, tmp_path, optimizer):
    from optimize.run import run_optimization

    cfg = _config(tmp_path, optimizer=optimizer, search={"num_candidates": 3, "breadth": 2, "depth": 1,
                                                         "val_size": 20, "num_trials": 4})
    result = run_optimization(cfg, _settings(gold_llm))
    assert load_artifact(result.artifact).metadata.optimizer == optimizer
    assert result.optimized.n == 30
    # Their full-valset evaluations ran on the Ray workers (RayEvaluate records each one).
    points = json.loads((Path(result.run_dir) / "compiled.json").read_text())["points"]
    assert any(p["kind"] == "full" and p["n"] == 20 for p in points), points
    if optimizer == "bootstrap_rs":
        assert result.optimized.score > result.baseline.score


# -- the metric and the judge ----------------------------------------------------------------


def _runner(program, lm):
    from dspy_ray.execution.runner import ProgramRunner

    return ProgramRunner(program, lm, output_fields=TRIAGE.output_fields(), refine_attempts=TRIAGE.refine_attempts)


def test_judge_errors_are_counted_not_scored_zero(gold):
    from dspy_ray.client.lm import build_lm
    from dspy_ray.execution.scoring import FieldJudge
    from optimize.evaluation import evaluate_program

    rows = [json.loads(line) for line in (ROOT / "data/triage_dev.jsonl").read_text().splitlines()[:6]]
    examples = [dspy.Example(**{k: r[k] for k in ("id", "transcript", "priority", "category", "summary")})
                .with_inputs("transcript") for r in rows]
    with FakeLLM(gold=gold, gold_keyword="GOLDEN-RULES") as target, FakeLLM(p_500=1.0) as judge_ep:
        judge = FieldJudge(build_lm(EndpointSettings(base_url=judge_ep.base_url, model="judge", max_attempts=1)))
        lm = build_lm(EndpointSettings(base_url=target.base_url, model="fake-model"))
        program = load_program(TRIAGE.program).program
        program.triage.signature = program.triage.signature.with_instructions("Apply the GOLDEN-RULES.")  # the fake answers gold
        scores = evaluate_program(program, examples, TRIAGE.metric, runner=_runner(program, lm), judge=judge,
                                  threads=3)
        assert judge_ep.stats()["requests"] >= len(examples)

    summary = EvalSummary.of(scores, TRIAGE.metric)
    assert summary.judge_errors == len(examples) and summary.program_errors == 0
    assert all(not s.judged and "judge" not in (s.program_error or "") for s in scores)
    assert summary.score == 1.0  # exact match only; a failed judge does not drag the score to 0
    assert summary.judged_mean == {}


def test_working_judge_scores_the_summary(gold):
    from dspy_ray.client.lm import build_lm
    from dspy_ray.execution.scoring import FieldJudge
    from optimize.evaluation import evaluate_program

    row = json.loads((ROOT / "data/triage_dev.jsonl").read_text().splitlines()[0])
    example = dspy.Example(**row).with_inputs("transcript")
    with FakeLLM(field_overrides={"verdict": "partial"}) as ep:
        judge = FieldJudge(build_lm(EndpointSettings(base_url=ep.base_url, model="judge")))
        program = load_program(TRIAGE.program).program
        lm = build_lm(EndpointSettings(base_url=ep.base_url, model="m"))
        [score] = evaluate_program(program, [example], TRIAGE.metric, runner=_runner(program, lm), judge=judge)
    assert score.judged == {"summary": 0.5} and score.judge_error is None
    assert score.score == pytest.approx((sum(score.fields.values()) + 0.5) / 3)


# -- artifacts ----------------------------------------------------------------------------


class ChangedTriager(dspy.Module):
    """Same predictor name as CallTriager, different signature (a field renamed)."""

    def __init__(self):
        super().__init__()
        self.triage = dspy.Predict("transcript -> priority, category, one_liner")


def test_artifact_round_trip_registry_and_signature_mismatch(tmp_path):
    program = CallTriager()
    program.triage.signature = program.triage.signature.with_instructions("Triage carefully.")
    program.triage.demos = [dspy.Example(transcript="smoke", priority="urgent", category="fire", summary="Fire.")]
    older = save_artifact(program, tmp_path, ArtifactMetadata(program="triage", model="org/Model-7B", dev_score=0.9,
                                                             created_at="2026-11-01T00:00:00+00:00",
                                                             lm={"api_key": "***"}))
    newer = save_artifact(CallTriager(), tmp_path, ArtifactMetadata(program="triage", model="org/Model-7B",
                                                                   dev_score=0.5))
    assert Path(older).name == "triage_Model-7B_20261101T000000_0.900.json"
    assert [str(r.path) for r in list_artifacts(tmp_path, "triage")] == [older, newer]
    assert load_artifact("best", artifact_dir=tmp_path).path == older
    assert load_artifact("latest", artifact_dir=tmp_path).path == newer

    loaded = load_artifact(older)
    assert loaded.program.triage.signature.instructions == "Triage carefully."
    assert loaded.program.triage.demos[0]["category"] == "fire"
    assert loaded.metadata.signature_hash and loaded.metadata.module_class.endswith("CallTriager")

    with pytest.raises(ArtifactMismatchError) as info:
        load_artifact(older, program=ChangedTriager)
    message = str(info.value)
    assert older in message and "'triage'" in message and "one_liner" in message
    with pytest.raises(ProgramLoadError, match="no triage artifact"):
        load_artifact("best", artifact_dir=tmp_path / "empty")


def test_artifacts_and_optimization_on_an_object_store_uri(ray_local, gold_llm):
    """--out s3://... works the same: the artifact, its sidecar and plot, the run state, the registry."""
    import fsspec

    from optimize.run import run_optimization

    out = "memory://bucket/artifacts"
    cfg = OptimizeConfig(task="triage", optimizer="bootstrap", workers=2, threads_per_worker=4, out=out,
                         train_limit=40, dev_limit=10, search=SearchSettings(val_size=10))
    result = run_optimization(cfg, _settings(gold_llm))
    assert result.artifact.startswith(out + "/triage_fake-model_") and result.run_dir.startswith(out + "/runs/")
    fs = fsspec.filesystem("memory")
    assert fs.exists(result.plot.removeprefix("memory://"))
    assert SECRET not in fs.cat(result.artifact.removeprefix("memory://")[: -len(".json")] + ".meta.json").decode()
    best = load_artifact("best", artifact_dir=out)
    assert best.path == result.artifact and best.metadata.optimizer == "bootstrap"
    assert best.program.triage.demos  # the compiled program, loaded from the store
    with pytest.raises(ArtifactMismatchError):
        load_artifact(result.artifact, program=ChangedTriager)


def test_run_storage_on_an_object_store_uri():
    """The run state works on fsspec URIs too (memory:// here; s3:// and gs:// go through pyarrow)."""
    from optimize.storage import RunStorage

    store = RunStorage("memory://runs/test-1")
    assert store.is_empty()
    store.write_json("trials/00001-a.json", {"number": 1})
    store.write_json("trials/00000-b.json", {"number": 0})
    assert store.list("trials") == ["00000-b.json", "00001-a.json"]
    assert [r["number"] for r in store.read_all("trials")] == [0, 1]
    journal = store.journal()
    journal.append_logs([{"op": 1}])
    journal.append_logs([{"op": 2}, {"op": 3}])
    assert list(RunStorage("memory://runs/test-1").journal().read_logs(1)) == [{"op": 2}, {"op": 3}]
    assert RunStorage("memory://runs/test-1").read_json("missing.json") is None


# -- the real model -------------------------------------------------------------------------


@pytest.mark.slow
def test_small_real_optimization_on_the_embedded_model(ray_local, tmp_path):
    """BootstrapFewShot with a tiny budget on the embedded llama.cpp model, end to end through the CLI."""
    from optimize.__main__ import main

    rc = main(["--task", "triage", "--optimizer", "bootstrap", "--out", str(tmp_path), "--workers", "2", "--threads-per-worker", "2",
               "--train-limit", "8", "--dev-limit", "6", "--max-bootstrapped-demos", "2",
               "--max-labeled-demos", "2", "--max-calls", "100"])
    assert rc == 0
    [record] = list_artifacts(tmp_path, "triage")
    assert record.metadata.model == "smollm2-135m-instruct" and record.metadata.optimizer == "bootstrap"
    assert record.metadata.command.startswith("python -m optimize --task triage --optimizer bootstrap")
    assert 0.0 <= record.metadata.dev_score <= 1.0
    assert load_artifact(record.path).program.triage.demos  # bootstrapped or labelled demos landed
    assert record.metadata.dev_program_errors < 6  # the model answered parseable labels
