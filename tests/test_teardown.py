"""Stage actors come and go without a crash dump: no Ray call from a thread that outlives the worker.

A stage actor's limiter used to report to the job's coordinator from a daemon thread; when the
actor was torn down while that thread sat in ``ray.get``, the worker died with "Fatal Python
error: Segmentation fault" (SIGSEGV in ``CoreWorker::Get``) after its rows were complete.  Here
many short stage-actor lifetimes run on the session's real local Ray, both the ways they end in a
job (Ray Data dropping its pool, a graceful ``__ray_terminate__`` right after the last row), and
the workers' logs are read for a crash dump.  (Against the code with the ticker thread, one run
of this test found three dumps among its twelve plain actor lifetimes.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.testing.fake_llm import FakeLLM
from stages.base import DSPyStageUDF
from tasks import get_task

CRASH_MARKERS = ("Fatal Python error", "Segmentation fault", "SIGSEGV", "*** SIGABRT")
PIPELINE_RUNS = 3
ACTOR_LIFETIMES = 12  # in waves of WAVE at once
WAVE = 4


def log_sizes(logs: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in logs.glob("*worker*") if p.is_file()}


def crash_dumps_since(logs: Path, sizes: dict[Path, int]) -> list[str]:
    """Lines of the workers' logs written since ``sizes`` was taken that hold a crash marker."""
    found = []
    for path in sorted(logs.glob("*worker*")):
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            f.seek(sizes.get(path, 0))
            text = f.read().decode("utf-8", "replace")
        found += [f"{path.name}: {line.strip()}" for line in text.splitlines()
                  if any(marker in line for marker in CRASH_MARKERS)]
    return found


def transcripts(tag: str, n: int) -> list[dict]:
    return [{"id": f"{tag}-{i}", "transcript": f"call {tag} {i}: smoke in the hallway"} for i in range(n)]


@pytest.mark.slow
def test_short_stage_actor_lifetimes_leave_no_crash_dump(ray_local):
    ray = ray_local
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    sizes = log_sizes(logs)
    stage = get_task("triage").stages[0].model_copy(update={"num_actors": 1, "num_cpus": 0.01, "batch_size": 8})

    @ray.remote(num_cpus=0)
    class StageHost:
        """One stage actor as a job has it, ended by its owner right after its last row."""

        def __init__(self, kwargs: dict):
            self.udf = DSPyStageUDF(**kwargs)

        async def run(self, rows: list[dict]) -> list[list[str]]:
            table = pa.Table.from_pylist(rows)
            outs = [out async for out in self.udf(table)]
            return pa.concat_tables(outs).column("errors").to_pylist()

    with FakeLLM(latency=0.02) as fake:
        settings = EndpointSettings(base_url=fake.base_url, model="fake-model")
        for run in range(PIPELINE_RUNS):  # Ray Data starts a pool, then drops it when the rows are out
            ds = ray.data.from_items(transcripts(f"p{run}", 24), override_num_blocks=3)
            rows = stage.apply(ds, settings, actors_on_endpoint=1).take_all()
            assert len(rows) == 24 and all(not r["errors"] for r in rows)
        for wave in range(ACTOR_LIFETIMES // WAVE):
            hosts = [StageHost.remote(stage.udf_kwargs(settings)) for _ in range(WAVE)]
            errors = ray.get([h.run.remote(transcripts(f"a{wave}-{i}", 16)) for i, h in enumerate(hosts)])
            assert all(e == [] for per_host in errors for e in per_host)
            done = [h.__ray_terminate__.remote() for h in hosts]  # graceful: atexit hooks run, then the exit
            ray.wait(done, num_returns=len(done), timeout=30)
            del hosts, done
    time.sleep(3.0)  # exiting workers write their last lines
    dumps = crash_dumps_since(logs, sizes)
    assert not dumps, "\n".join(dumps[:20])


def test_no_background_thread_makes_a_ray_call():
    """The limiter's only thread decides for limiters without a coordinator; coordinated ones are
    reported by their callers (``pump``), so no ticker exists for them."""
    from dspy_ray.client.limiter import registry
    from dspy_ray.client.limiter.slots import EndpointLimiter

    limiter = EndpointLimiter("test|teardown", ceiling=8)
    limiter.coordinated = True
    reported = []
    limiter.pump = lambda urgent=False: reported.append(threading.current_thread().name)
    with limiter.slot():
        pass
    assert reported == [threading.current_thread().name]  # the caller's own thread
    registry.stop_ticker(timeout=5.0)
    assert registry._ticker is None or not registry._ticker.is_alive()
    registry._start_ticker()  # the limiters other tests of this process made still need it
