"""Shared fixtures: one local Ray per test session, the fake endpoint, sample data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dspy_ray.endpoints.local.child_server import free_port as pick_port

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Tests count requests, retries and faults: a response cached by an earlier test would hide them, and
# nothing a test writes belongs in the user's cache folder.  The cache tests turn it on themselves.
os.environ["LM_CACHE"] = "off"
os.environ["JUDGE_CACHE"] = "off"


@pytest.fixture(autouse=True)
def fresh_endpoint_limits():
    """Each test finds its endpoints' capacity afresh: a fake endpoint may get a port an earlier test's had,
    and a limit learned there (in this process or at the session's coordinator) must not carry over."""
    yield
    from dspy_ray.client.limiter import forget_endpoints

    forget_endpoints()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once (``ray.init`` costs seconds and ~1 GiB)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def fake_llm():
    from dspy_ray.testing.fake_llm import FakeLLM

    with FakeLLM() as fake:
        yield fake


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a free port on 127.0.0.1 (``port = free_port()``)."""
    return pick_port


class JobHead:
    """A throwaway loopback Ray head with the job API, apart from the session's own Ray."""

    def __init__(self, address: str, env: dict[str, str]):
        self.address, self.env = address, env
        self.ray_bin = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="session")
def ray_job_head():
    """A second local Ray cluster with the dashboard's job API, for `ray job submit` and JobSubmissionClient.

    Token auth is off for it (the head and the clients agree through RAY_AUTH_MODE);
    its own temp dir keeps it from becoming the machine's "current cluster" for a
    later ``ray.init()``; ``--block`` keeps it in this process group, so exactly this
    cluster is stopped afterwards (``ray stop`` would stop the session's Ray too).
    """
    import urllib.error
    import urllib.request

    port, dash, agent = pick_port(), pick_port(), pick_port()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--temp-dir", temp_dir, "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dash),
                             # the session's own Ray already holds the agent's default port (52365)
                             "--dashboard-agent-listen-port", str(agent), "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:  # the job API answers a little before the head's job agent is ready: run a no-op job
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head's job API did not come up"
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    pass
            except OSError:
                time.sleep(1)
                continue
            proc = subprocess.run([ray_bin, "job", "submit", "--address", address, "--", sys.executable, "-c", "pass"],
                                  env=env, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                break
            time.sleep(2)
        yield JobHead(address, env)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
