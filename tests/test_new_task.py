"""The registry's proof: a new task is one task file, a program file and data - nothing else changes.

The test writes a toy sentiment task into a temporary folder (outside the repository), puts that
folder on PYTHONPATH, and runs it through all three lives with the project's own CLIs:
``python -m pipelines``, ``python -m optimize`` and ``python -m serve``, against the fake endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dspy_ray.testing.fake_llm import FakeLLM

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PROGRAM = '''
from typing import Literal

import dspy


class RateReview(dspy.Signature):
    """Say whether a product review is positive, negative or neutral, and list its key phrases."""

    review: str = dspy.InputField()
    sentiment: Literal["positive", "negative", "neutral"] = dspy.OutputField()
    key_phrases: list[str] = dspy.OutputField(desc="up to three phrases from the review")
    stars: int = dspy.OutputField(desc="1 to 5")


class SentimentRater(dspy.Module):
    def __init__(self):
        super().__init__()
        self.rate = dspy.Predict(RateReview)

    def forward(self, review: str):
        return self.rate(review=review)
'''

TASK = '''
from pathlib import Path

from dspy_ray.execution.loading import ProgramSpec
from dspy_ray.execution.scoring import TaskMetric
from sentiment_program import SentimentRater
from stages.base import DSPyStage
from tasks.base import CliDefaults, Task, TaskData

HERE = Path(__file__).parent
RATER = ProgramSpec("sentiment", SentimentRater)

TASK = Task(
    name="sentiment",
    description="Product-review sentiment.",
    program=RATER,
    stages=(DSPyStage(program=RATER, input_fields={"review": "review"},
                      output_fields=("sentiment", "key_phrases", "stars")),),
    data=TaskData(train=str(HERE / "sentiment_train.jsonl"), dev=str(HERE / "sentiment_dev.jsonl"),
                  inputs=("review",), labels=("sentiment",)),
    metric=TaskMetric(exact=("sentiment",)),
    cli=CliDefaults(text_column="review", summary_columns=("sentiment",)),
)
'''

REVIEWS = [
    ("Battery lasts all week, love it", "positive"), ("Broke after two days", "negative"),
    ("It is a kettle. It boils water.", "neutral"), ("Best headphones I have owned", "positive"),
    ("Arrived scratched and late", "negative"), ("Does what the box says", "neutral"),
    ("Gorgeous colour and very sturdy", "positive"), ("Stopped charging within a month", "negative"),
    ("Average fit, average fabric", "neutral"), ("My kids adore this game", "positive"),
    ("Customer service never answered", "negative"), ("Fine for the price", "neutral"),
    ("Crisp sound and easy pairing", "positive"), ("Smells of chemicals, returned it", "negative"),
    ("Neither good nor bad", "neutral"), ("Exceeded every expectation", "positive"),
    ("The zip jammed on day one", "negative"), ("Standard size, standard box", "neutral"),
    ("Would buy again tomorrow", "positive"), ("Cheap plastic that cracked", "negative"),
]


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy_task")
    (folder / "sentiment_program.py").write_text(PROGRAM)
    (folder / "sentiment_task.py").write_text(TASK)
    rows = [{"id": f"r{i:02d}", "review": text, "sentiment": label} for i, (text, label) in enumerate(REVIEWS)]
    (folder / "sentiment_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
    (folder / "sentiment_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[14:]))
    return folder


def _env(folder: Path, ray_address: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LM_", "JUDGE_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT)])
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


def test_a_task_from_outside_the_repository_runs_batch_optimize_and_serve(ray_local, toy_task, tmp_path, free_port):
    address = ray_local.get_runtime_context().gcs_address
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"id": f"x{i}", "review": text}) + "\n"
                               for i, (text, _) in enumerate(REVIEWS)))
    with FakeLLM(latency=0.01) as fake:
        lm = ["--lm-base-url", fake.base_url, "--lm-model", "fake-model"]

        # Batch: typed output columns straight from the signature (Literal -> string, list[str] -> list, int).
        _run(["pipelines", "--task", "sentiment_task", "--input", str(reviews), "--output", str(tmp_path / "out"),
              "--num-actors", "1", *lm], _env(toy_task, address), cwd=tmp_path)
        table = pq.read_table(sorted((tmp_path / "out").glob("*.parquet")))
        assert table.num_rows == len(REVIEWS) and not any(table.column("errors").to_pylist())
        key_phrases = table.schema.field("key_phrases").type
        assert pa.types.is_list(key_phrases) and pa.types.is_string(key_phrases.value_type)
        assert pa.types.is_int64(table.schema.field("stars").type)
        assert set(table.column("sentiment").to_pylist()) <= {"positive", "negative", "neutral"}

        # Optimize: the task's data and metric, an artifact filed under the task's program name.
        proc = _run(["optimize", "--task", "sentiment_task", "--optimizer", "bootstrap", "--workers", "1",
                     "--out", str(tmp_path / "artifacts"), "--val-size", "4", *lm], _env(toy_task, address),
                    cwd=tmp_path)
        assert "sentiment accuracy" in proc.stdout
        [artifact] = [p for p in (tmp_path / "artifacts").glob("sentiment_fake-model_*.json")
                      if not p.name.endswith(".meta.json")]
        meta = json.loads(artifact.with_name(artifact.name.replace(".json", ".meta.json")).read_text())
        assert meta["program"] == "sentiment" and meta["module_class"].endswith("SentimentRater")

        # Serve: its own local Ray (replicas inherit PYTHONPATH), the artifact, JSON types from the signature.
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "serve", "--program", "sentiment_task", "--artifact",
                                   str(artifact), "--port", str(port), "--max-replicas", "1", *lm],
                                  cwd=tmp_path, env=_env(toy_task), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        try:
            out = _post_when_up(f"http://127.0.0.1:{port}/sentiment/predict", {"review": "Lovely and warm"}, server)
            assert out["sentiment"] in {"positive", "negative", "neutral"}
            assert isinstance(out["key_phrases"], list) and isinstance(out["stars"], int)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/sentiment/info", timeout=10) as resp:
                assert json.loads(resp.read())["artifact"] == str(artifact)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    assert server.returncode == 0


def _post_when_up(url: str, body: dict, server: subprocess.Popen, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    data = json.dumps(body).encode()
    while True:
        if server.poll() is not None:
            pytest.fail(f"serve exited ({server.returncode}): {server.stdout.read()[-3000:]}")
        try:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except OSError:
            assert time.monotonic() < deadline, "the server did not answer in time"
            time.sleep(1)
