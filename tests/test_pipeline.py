"""The triage pipeline on a real local Ray: faults, resume after a kill, the CLI, ray job submit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dspy_ray.client.limiter import coordinator_state
from dspy_ray.endpoints.settings import EndpointSettings
from pipelines.inputs import InputSpec
from pipelines.resume import written_ids
from pipelines.runner import (EARLIER_STAGE_WEIGHT, MAX_BLOCK_ROWS, block_rows, input_dataset, plan_input,
                              run_pipeline)
from tasks import get_task
from tests.batch_helpers import default_sigint, read_output, write_calls
from dspy_ray.testing.fake_llm import FakeLLM
from tests.gold import triage_gold

ROOT = Path(__file__).resolve().parents[1]
PRIORITIES = {"urgent", "non_urgent", "not_an_emergency"}
CATEGORIES = {"crime", "medical", "fire", "animal", "noise", "other"}
OUTPUT_COLUMNS = ["priority", "category", "summary", "location", "subject_description", "errors"]
TRIAGE = get_task("triage")


def triage_stages(**overrides):
    return TRIAGE.stages_for(overrides=overrides)


def cli_env(ray_local, **extra) -> dict:
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT), **extra}
    env.pop("LM_BASE_URL", None)
    return {**env, **extra}


@pytest.mark.slow
def test_thousand_rows_with_faults_come_out_once_each(ray_local, tmp_path):
    src = write_calls(tmp_path / "calls.jsonl", 1000)
    with FakeLLM(latency=0.01, p_429=0.05, retry_after=0.05, p_500=0.05, p_hang=0.003, p_malformed=0.02,
                 seed=5) as fake:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model", timeout_s=1.0, max_attempts=6)
        result = run_pipeline(InputSpec(str(src), text_column="transcript"), str(tmp_path / "out"),
                              triage_stages(num_actors=1, batch_size=32), settings, summary_columns=("priority",))
        stats = fake.stats()
    table = read_output(tmp_path / "out")
    ids = table.column("id").to_pylist()
    assert table.num_rows == 1000 and len(set(ids)) == 1000
    assert set(ids) == {f"call-{i:05d}" for i in range(1000)}
    assert set(OUTPUT_COLUMNS) <= set(table.column_names)
    assert stats["rate_limited"] and stats["server_error"] and stats["hung"] and stats["malformed"]
    # Failures only where retries ran out: rare, and each says so.
    failed = [e for e in table.column("errors").to_pylist() if e]
    assert len(failed) <= 5, failed
    for errors in failed:
        assert all("after retries" in e or "attempts" in e for e in errors), errors
    ok = [r for r in table.to_pylist() if not r["errors"]]
    assert all(r["priority"] in PRIORITIES and r["category"] in CATEGORIES for r in ok)
    assert result.rows_total == 1000 and result.rows_with_errors == len(failed)


def test_an_actor_keeps_more_than_ray_datas_four_batches_of_a_task_in_flight(ray_local, tmp_path):
    """Ray Data joins a read's rows into a few large blocks (here 1,500 rows: one block, split in a few), and runs
    4 batches of a task at once through an async UDF: the actors held 4 x 16 rows of each task in flight,
    whatever the endpoint allowed (256 in all at capacity 512).  A stage lets Ray Data run as many batches as
    its share of the limit needs (stages.base._batches_at_once)."""
    src = write_calls(tmp_path / "calls.jsonl", 1500)
    with FakeLLM(latency=0.3, seed=3) as fake:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model")
        run_pipeline(InputSpec(str(src), text_column="transcript"), str(tmp_path / "out"),
                     triage_stages(num_actors=1, batch_size=16), settings, summary_columns=("priority",))
        peak = fake.stats()["max_in_flight"]
        members = coordinator_state(fake.base_url, "fake-model")["members"].values()
    assert read_output(tmp_path / "out").num_rows == 1500
    assert peak > 4 * 64, peak  # more than 4 tasks' worth of Ray Data's default
    # The first stage's rows weigh 4x the second's when the limit is split (pipelines.runner.EARLIER_STAGE_WEIGHT).
    assert {m["weight"] for m in members} == {EARLIER_STAGE_WEIGHT, 1.0}, members


def test_an_actor_holds_blocks_enough_to_outlast_a_retry_after(ray_local):
    """A block is passed on only once its slowest row is done, and a row refused with a 429 waits out its
    Retry-After (often a second: ten latencies of a fast endpoint).  An actor given two blocks at once ran the
    other dry meanwhile, so it is given at least MIN_BLOCKS_PER_ACTOR, and more where twice its share of the
    endpoint's ceiling (1024 over 4 actors here) takes more blocks."""
    from stages.base import MIN_BLOCKS_PER_ACTOR

    stage = triage_stages()[0]
    settings = EndpointSettings(base_url="http://127.0.0.1:9/v1", model="fake-model")
    for rows_per_block, blocks in ((1024, MIN_BLOCKS_PER_ACTOR), (313, MIN_BLOCKS_PER_ACTOR), (64, 8)):
        ds = stage.apply(ray_local.data.range(10), settings, rows_per_block=rows_per_block, actors_on_endpoint=4)
        compute = ds._logical_plan.dag.compute  # the plan only: nothing runs
        assert compute.max_tasks_in_flight_per_actor == blocks, (rows_per_block, compute)


def test_a_counted_corpus_reaches_the_stages_in_blocks_of_the_planned_size(ray_local, tmp_path):
    """Ray Data joins what a read task yields into blocks of up to 128 MiB: 5,000 rows in one file came out as 4
    blocks of 1,250, and the second stage of a chain waited for the first to finish a whole one (in a short run,
    all of its rows).  A counted corpus is read into blocks of the planned size (pipelines.runner.block_rows)."""
    src = write_calls(tmp_path / "calls.jsonl", 5000)
    spec = InputSpec(str(src), text_column="transcript")
    plan = plan_input(spec, precheck_first=True)
    per_block = block_rows(plan.rows, batch_size=16, actors=2, on_endpoint=4)
    assert per_block == 313  # four blocks for each of the 4 actors calling the endpoint
    ds = input_dataset(plan, spec, per_block, blocks=-(-plan.rows // per_block))
    sizes = [meta.num_rows for bundle in ds.materialize().iter_internal_ref_bundles() for meta in bundle.metadata]
    assert sum(sizes) == 5000 and len(sizes) >= 16 and max(sizes) <= per_block, sizes


def test_block_rows_bounds():
    assert block_rows(None, batch_size=16, actors=2, on_endpoint=4) == 64  # not counted: a few batches
    assert block_rows(40, batch_size=16, actors=2, on_endpoint=4) == 10  # small: two blocks per actor of a stage
    assert block_rows(5000, batch_size=16, actors=2, on_endpoint=4) == 313
    assert block_rows(2_000_000, batch_size=16, actors=2, on_endpoint=4) == MAX_BLOCK_ROWS
    assert block_rows(1000, batch_size=16, actors=2, on_endpoint=4) == 64  # at least a few batches


@pytest.mark.slow
def test_resume_after_kill_redoes_nothing_written(ray_local, tmp_path):
    n = 600
    src = write_calls(tmp_path / "calls.jsonl", n)
    out = tmp_path / "out"
    with FakeLLM(latency=0.2, capacity=8) as fake:
        args = [sys.executable, "-m", "pipelines.triage", "--input", str(src), "--output", str(out),
                "--lm-base-url", fake.base_url, "--lm-model", "fake-model", "--num-actors", "1",
                "--concurrency", "8", "--batch-size", "16",
                "--no-cache"]  # what resume itself sends: the LM cache would answer the killed run's finished calls
        proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(ray_local), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not list(out.glob("*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)  # a preempted node gives no warning
        proc.wait()
        done = written_ids(out)
        assert 0 < len(done) < n, f"kill landed at {len(done)} rows written"
        fake.reset_stats()
        resumed = subprocess.run([*args, "--resume"], cwd=ROOT, env=cli_env(ray_local),
                                 capture_output=True, text=True, timeout=300)
        stats = fake.stats()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"({len(done)} already done, skipped)" in resumed.stdout
    ids = read_output(out).column("id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n
    # Two stages, one distinct prompt per row each: only the unfinished rows reached the LM.
    assert len(stats["inputs"]) == 2 * (n - len(done))


@pytest.mark.slow
def test_ctrl_c_says_one_line_and_how_to_resume(ray_local, tmp_path):
    """SIGINT to the process group (Ctrl-C, or a scheduler stopping the job): exit 130, one line, no traceback."""
    src = write_calls(tmp_path / "calls.jsonl", 400)
    out = tmp_path / "out"
    with FakeLLM(latency=0.2, capacity=8) as fake:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.triage", "--input", str(src), "--output", str(out),
                                 "--lm-base-url", fake.base_url, "--lm-model", "fake-model", "--num-actors", "1",
                                 "--concurrency", "8", "--batch-size", "16"],
                                cwd=ROOT, env=cli_env(ray_local), start_new_session=True, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
        deadline = time.monotonic() + 120
        while fake.stats()["requests"] == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stdout + stderr, stderr[-2000:]
    assert f"interrupted: the rows finished so far are in {out}; run the same command with --resume" in stderr


def test_object_store_uris_for_input_and_output(ray_local, tmp_path):
    """Input and output given as URIs go through pyarrow filesystems (file:// here; s3:// the same way)."""
    from pipelines.inputs import InputError, load_corpus
    from pipelines.runner import OutputError

    (tmp_path / "in").mkdir()
    src = write_calls(tmp_path / "in" / "calls.jsonl", 20)
    out_uri = f"file://{tmp_path}/out"
    with FakeLLM() as fake:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model")
        stages = triage_stages(num_actors=1)[:1]
        result = run_pipeline(InputSpec(f"file://{src.parent}", text_column="transcript"), out_uri, stages, settings,
                              summary_columns=("priority",))
        assert result.rows_total == 20 and result.output == out_uri
        with pytest.raises(OutputError, match="already holds results"):
            run_pipeline(InputSpec(f"file://{src}", text_column="transcript"), out_uri, stages, settings)
        again = run_pipeline(InputSpec(f"file://{src}", text_column="transcript"), out_uri, stages, settings,
                             resume=True)
    assert again.rows_resumed == 20 and again.rows_this_run == 0
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == sorted(f"call-{i:05d}" for i in range(20))

    # Problems are reported with the URI the user gave, not the local staging copy.
    import fsspec

    with fsspec.open("memory://corpus/bad.jsonl", "w") as f:
        f.write('{"id": "a", "transcript": "x"}\nnot json\n')
    with pytest.raises(InputError, match=r"memory://corpus/bad.jsonl line 2: invalid JSON"):
        load_corpus(InputSpec("memory://corpus/bad.jsonl", text_column="transcript"))
    with pytest.raises(InputError, match="input not found: memory://nowhere"):
        load_corpus(InputSpec("memory://nowhere/calls.jsonl", text_column="transcript"))


def test_stages_load_the_best_artifact_from_a_registry(ray_local, tmp_path):
    """--artifact-dir: each stage loads its program's best artifact (through the one loader) or runs unoptimized."""
    import dspy

    from dspy_ray.execution.artifacts import ArtifactMetadata, save_artifact
    from dspy_ray.execution.loading import load_program
    from pipelines.cli import build_parser, stage_chain

    registry = tmp_path / "artifacts"
    tuned = load_program(TRIAGE.program).program
    tuned.triage.signature = tuned.triage.signature.with_instructions("Triage the call; GOLDEN-RULES apply.")
    tuned.triage.demos = [dspy.Example(transcript="smoke everywhere", priority="urgent", category="fire",
                                       summary="Smoke.")]
    best = save_artifact(tuned, registry, ArtifactMetadata(program="triage", model="fake-model", dev_score=0.8))
    save_artifact(load_program(TRIAGE.program).program, registry,
                  ArtifactMetadata(program="triage", model="fake-model", dev_score=0.3))
    args = build_parser(TRIAGE, "test").parse_args(["--input", "x", "--output", "y", "--artifact-dir", str(registry),
                                                    "--num-actors", "1"])
    lines = []
    triage, extract = stage_chain(TRIAGE, args, lines.append)
    assert triage.artifact == best and extract.artifact is None
    assert any("extract_details stage runs unoptimized" in line for line in lines)

    # The fake answers these labels only to a prompt whose instruction has the keyword: the tuned artifact's.
    src = write_calls(tmp_path / "calls.jsonl", 6)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({**json.loads(line), "priority": "not_an_emergency", "category": "noise"})
                                + "\n" for line in src.read_text().splitlines()))
    with FakeLLM(gold=triage_gold([labelled]), gold_keyword="GOLDEN-RULES") as fake:
        result = run_pipeline(InputSpec(str(src), text_column="transcript"), str(tmp_path / "out"), [triage],
                              EndpointSettings(base_url=fake.base_url, model="fake-model"),
                              summary_columns=("priority", "category"))
    assert result.rows_total == 6 and result.rows_with_errors == 0
    assert result.label_counts == {"priority": {"not_an_emergency": 6}, "category": {"noise": 6}}


def test_cli_reports_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "calls.jsonl"
    bad.write_text('{"id": 1, "transcript": "fire"}\n{"id": 2, "transcript": \n')
    proc = subprocess.run([sys.executable, "-m", "pipelines", "--task", "triage", "--input", str(bad), "--output",
                           str(tmp_path / "out"), "--lm-base-url", "http://127.0.0.1:9/v1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "calls.jsonl" in proc.stderr and "line 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "pipelines.triage", "--input", str(tmp_path / "nope.jsonl"),
                              "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_refuses_to_mix_runs_without_resume(ray_local, tmp_path):
    src = write_calls(tmp_path / "calls.jsonl", 10)
    with FakeLLM() as fake:
        args = [sys.executable, "-m", "pipelines", "--task", "triage", "--input", str(src), "--output",
                str(tmp_path / "out"), "--lm-base-url", fake.base_url]
        first = subprocess.run(args, cwd=ROOT, env=cli_env(ray_local), capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "results:" in first.stdout and "rows/s" in first.stdout and "priority:" in first.stdout
        second = subprocess.run(args, cwd=ROOT, env=cli_env(ray_local), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "--resume" in second.stderr


@pytest.mark.llm
@pytest.mark.slow
def test_end_to_end_on_embedded_llamacpp_model(ray_local, tmp_path):
    """The real embedded model: no endpoint configured, so the CLI starts llama.cpp itself."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines.triage", "--input", str(ROOT / "data/sample_calls.jsonl"),
                           "--output", str(out), "--limit", "4", "--num-actors", "1"],
                          cwd=ROOT, env=cli_env(ray_local), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "embedded llama.cpp" in proc.stderr
    rows = read_output(out).to_pylist()
    assert len(rows) == 4
    labelled = [r for r in rows if r["priority"] is not None]
    assert labelled, rows  # a 135M model still yields schema-valid labels
    for r in labelled:
        assert r["priority"] in PRIORITIES and r["category"] in CATEGORIES


@pytest.mark.slow
def test_same_module_runs_under_ray_job_submit(ray_job_head, tmp_path):
    """`ray job submit --working-dir . -- python -m pipelines --task triage` against a head of its own."""
    src = write_calls(tmp_path / "calls.jsonl", 30)
    out = tmp_path / "out"
    with FakeLLM() as fake:
        cmd = [ray_job_head.ray_bin, "job", "submit", "--address", ray_job_head.address, "--working-dir", str(ROOT),
               "--", sys.executable, "-m", "pipelines", "--task", "triage", "--input", str(src), "--output", str(out),
               "--lm-base-url", fake.base_url, "--num-actors", "1"]
        proc = subprocess.run(cmd, env=ray_job_head.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"call-{i:05d}" for i in range(30))
