"""Losing a node mid-run: a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

The batch CLI runs as its own driver against the cluster; the worker node is killed (no warning, as a
spot instance is reclaimed) while rows are in flight, and a fresh node joins.  Every input row must
come out exactly once.  The cluster is separate from the session's local Ray (``ray_local``): this
process only starts and stops its nodes, it never connects to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dspy_ray.testing.fake_llm import FakeLLM
from tests.batch_helpers import read_output, write_calls

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def start_cluster(head_cpus: int):
    """A head (the drivers' node) and a worker node with two CPUs; returns (cluster, worker node)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return cluster, worker


@pytest.fixture
def two_nodes():
    cluster, worker = start_cluster(head_cpus=1)
    try:
        yield cluster, worker
    finally:
        cluster.shutdown()


@pytest.fixture
def cpu_less_head():
    """Every actor that needs a CPU runs on the worker node, so losing it takes work in flight with it."""
    cluster, worker = start_cluster(head_cpus=0)
    try:
        yield cluster, worker
    finally:
        cluster.shutdown()


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The run's output once it ends; a run still going after ``timeout`` fails the test with its last lines."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        tail = (proc.communicate()[0] or "")[-6000:]
        pytest.fail(f"the run did not end within {timeout:g}s after the node was lost; its last output:\n{tail}")


def test_batch_run_that_loses_a_node_writes_every_row_exactly_once(two_nodes, tmp_path):
    cluster, worker = two_nodes
    n = 400
    src = write_calls(tmp_path / "calls.jsonl", n)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
    env.pop("LM_BASE_URL", None)
    with FakeLLM(latency=0.1, capacity=16) as fake:
        args = [sys.executable, "-m", "pipelines.triage", "--input", str(src), "--output", str(out),
                "--lm-base-url", fake.base_url, "--lm-model", "fake-model", "--num-actors", "2",
                "--concurrency", "4", "--batch-size", "8"]
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # Kill the worker once the LM has answered a fair share of the calls, and before the end.
            started = wait_for(lambda: fake.stats()["requests"] >= n // 2, 240, proc)
            assert started, "the run ended or stalled before the node could be killed"
            answered_before = fake.stats()["requests"]
            cluster.remove_node(worker, allow_graceful=False)
            cluster.add_node(num_cpus=2)  # the replacement a spot group launches
            stdout = finish(proc, 300)
        finally:
            if proc.poll() is None:
                proc.kill()
        answered = fake.stats()["requests"]
    assert proc.returncode == 0, stdout[-3000:]
    assert answered_before < 2 * n <= answered, (answered_before, answered)  # two stages: the run went on after the kill
    ids = read_output(out).column("id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n


def test_index_build_that_loses_a_node_embeds_every_passage_exactly_once(two_nodes, tmp_path):
    import faiss
    import pyarrow.parquet as pq

    from dspy_ray.retrieval import read_manifest
    from dspy_ray.retrieval.manifest import PASSAGES
    from dspy_ray.retrieval.store import EmbeddingStore
    from tests.index_helpers import CORPUS, MODEL

    cluster, worker = two_nodes
    index = tmp_path / "index"
    with FakeLLM(latency=0.25) as fake:
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "EMBED_BASE_URL": fake.base_url, "EMBED_MODEL": MODEL,
               "EMBED_BATCH_SIZE": "4", "EMBED_MAX_IN_FLIGHT": "2", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.index", "--corpus", str(CORPUS), "--index",
                                 str(index), "--shard-rows", "16", "--num-actors", "2", "--batch-size", "16"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            started = wait_for(lambda: len(EmbeddingStore(str(index)).shards()) >= 2, 240, proc)
            assert started, "the build ended or stalled before the node could be killed"
            cluster.remove_node(worker, allow_graceful=False)
            cluster.add_node(num_cpus=2)
            stdout = finish(proc, 300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stdout[-3000:]
    passages = pq.read_table(index / PASSAGES)
    ids = passages.column("id").to_pylist()
    assert len(ids) == len(set(ids)) > 0
    manifest = read_manifest(str(index))
    vectors = faiss.read_index(str(index / "index.faiss"))
    assert manifest.passages == len(ids) == vectors.ntotal  # every passage once, one vector each


def test_optimize_run_that_loses_a_node_redoes_only_the_trials_it_held(cpu_less_head, tmp_path):
    from tests.gold import triage_gold

    cluster, worker = cpu_less_head
    run_dir = tmp_path / "run"
    with FakeLLM(gold=triage_gold(["data/triage_train.jsonl", "data/triage_dev.jsonl"]), latency=0.15) as fake:
        argv = [sys.executable, "-m", "optimize", "--task", "triage", "--lm-base-url", fake.base_url,
                "--lm-model", "fake-model", "--out", str(tmp_path / "artifacts"), "--run-dir", str(run_dir),
                "--workers", "2", "--threads-per-worker", "4", "--train-limit", "100", "--dev-limit", "30",
                "--val-size", "40", "--num-trials", "12", "--minibatch-size", "20", "--no-cache"]
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
        env.pop("LM_BASE_URL", None)
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        trials = run_dir / "trials"
        try:
            started = wait_for(lambda: len(list(trials.glob("*.json"))) >= 3, 240, proc)
            assert started, "the run ended or stalled before the node could be killed"
            cluster.remove_node(worker, allow_graceful=False)
            # What was finished when the node died, byte for byte: it must not be evaluated again.
            finished = {p.name: p.read_bytes() for p in trials.glob("*.json")}
            cluster.add_node(num_cpus=2)
            stdout = finish(proc, 400)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stdout[-3000:]
    assert all((trials / name).read_bytes() == data for name, data in finished.items())
    numbers = [json.loads(p.read_text())["number"] for p in trials.glob("*.json")]
    assert len(numbers) == len(set(numbers)) == 12  # every trial once; those lost with the node were redone
    assert 3 <= len(finished) < 12
