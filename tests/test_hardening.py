"""Edge cases found by using the CLIs as a new user would: each was observed failing before it was fixed.

Secrets in Ray's logs, Serve and ``.env``, stopping on signals, unwritable outputs, bad counts,
resuming optimize with other settings, the estimate of a resumed run, Ctrl-C, and --help.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from dspy_ray.testing.fake_llm import FakeLLM
from tests.batch_helpers import default_sigint

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-live-key-7c41f0e2-never-logged"
TOKEN = "tok-serve-5d9a33b1-never-logged"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LM_", "JUDGE_", "EMBED_", "RAY_ADDRESS", "SERVE_API_TOKEN"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _grep_tree(root: Path, *needles: str) -> list[str]:
    """Files under ``root`` containing any needle (binary files too: logs, sqlite, spilled objects)."""
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {n}" for n in needles if n.encode() in data]
        except OSError:
            continue
    return found


@pytest.fixture
def ray_tmp():
    """A short temp root for a CLI's own Ray (its Unix sockets must fit in 107 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- secrets and .env -------------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_run_with_a_key_in_dotenv_leaves_it_nowhere_in_rays_session(tmp_path, ray_tmp):
    calls = tmp_path / "calls.jsonl"
    calls.write_text("".join(json.dumps({"id": f"c{i}", "transcript": f"smoke on floor {i}"}) + "\n"
                             for i in range(6)))
    with FakeLLM() as fake:
        (tmp_path / ".env").write_text(f"LM_BASE_URL={fake.base_url}\nLM_MODEL=fake-model\nLM_API_KEY={KEY}\n")
        proc = subprocess.run([sys.executable, "-m", "pipelines", "--task", "triage", "--input", str(calls),
                               "--output", str(tmp_path / "out"), "--num-actors", "1"], cwd=tmp_path,
                              env=_env(TMPDIR=str(ray_tmp)), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert fake.stats()["requests"] >= 12  # the .env endpoint was used, by both stages
    sessions = list(ray_tmp.rglob("session_*"))
    assert sessions, "the run's Ray session folder was not where expected"
    assert not _grep_tree(ray_tmp, KEY)
    assert KEY not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_serve_honours_dotenv_keeps_secrets_out_of_ray_and_stops_on_sigint(tmp_path, ray_tmp, free_port):
    """Endpoint and token only in .env; SIGINT to a background server (SIGINT ignored, as a shell's `&` does)."""
    port = free_port()
    with FakeLLM() as fake:
        (tmp_path / ".env").write_text(f"LM_BASE_URL={fake.base_url}\nLM_MODEL=fake-model\nLM_API_KEY={KEY}\n"
                                       f"SERVE_API_TOKEN={TOKEN}\n")
        server = subprocess.Popen([sys.executable, "-m", "serve", "--task", "triage", "--port", str(port),
                                   "--max-replicas", "1"], cwd=tmp_path, env=_env(TMPDIR=str(ray_tmp)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            base = f"http://127.0.0.1:{port}"
            out = _request_when_up(f"{base}/triage/predict", {"transcript": "fire in the kitchen"}, server,
                                   headers={"Authorization": f"Bearer {TOKEN}"})
            assert out["priority"]
            assert fake.stats()["requests"] >= 1  # the endpoint from .env answered, not the embedded model
            info = _request_when_up(f"{base}/triage/info", None, server, headers={"Authorization": f"Bearer {TOKEN}"})
            assert info["endpoint"] == fake.base_url and info["endpoint_origin"] == "configured"
            started = time.monotonic()
            server.send_signal(signal.SIGINT)
            server.wait(timeout=40)
            assert time.monotonic() - started < 40
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    output = server.stdout.read()
    assert server.returncode == 0, output[-3000:]
    assert not _grep_tree(ray_tmp, KEY, TOKEN)
    assert KEY not in output and TOKEN not in output


def _request_when_up(url: str, body, server: subprocess.Popen, headers=None, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    data = json.dumps(body).encode() if body is not None else None
    while True:
        if server.poll() is not None:
            pytest.fail(f"server exited ({server.returncode}): {server.stdout.read()[-3000:]}")
        try:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                                  **(headers or {})})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except OSError:
            assert time.monotonic() < deadline, "the server did not answer in time"
            time.sleep(1)


# -- batch CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["/sys/kernel", "/proc/dspy-ray-test/out"])
def test_unwritable_output_is_refused_before_any_lm_call(tmp_path, output):
    calls = tmp_path / "calls.jsonl"
    calls.write_text(json.dumps({"id": "a", "transcript": "fire"}) + "\n")
    with FakeLLM() as fake:
        proc = subprocess.run([sys.executable, "-m", "pipelines", "--task", "triage", "--input", str(calls),
                               "--output", output, "--lm-base-url", fake.base_url], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert fake.stats()["requests"] == 0
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: output {output}"), proc.stderr[-2000:]


@pytest.mark.parametrize("limit", ["0", "-1", "two"])
def test_limit_below_one_is_refused(tmp_path, limit):
    proc = subprocess.run([sys.executable, "-m", "pipelines.triage", "--input", str(ROOT / "data/sample_calls.jsonl"),
                           "--output", str(tmp_path / "out"), "--limit", limit], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--limit" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_is_plain_text_with_defaults():
    serve_help = subprocess.run([sys.executable, "-m", "serve", "--help"], cwd=ROOT, env=_env(),
                                capture_output=True, text=True).stdout
    assert "``" not in serve_help and "SERVE_API_TOKEN" in serve_help
    serve_help = serve_help.split("options:", 1)[1]  # the flags' descriptions, not the usage line
    for flag, default in (("--port", "8000"), ("--max-replicas", "4"), ("--min-replicas", "1")):
        line = serve_help[serve_help.index(flag + " "):][:200]
        assert f"default: {default}" in " ".join(line.split()), (flag, line)
    batch_help = " ".join(subprocess.run([sys.executable, "-m", "pipelines.triage", "--help"], cwd=ROOT, env=_env(),
                                         capture_output=True, text=True).stdout.split("options:", 1)[1].split())
    for flag in ("--batch-size", "--max-chars", "--refine-attempts", "--concurrency", "--num-actors"):
        assert "(default: " in batch_help[batch_help.index(flag + " "):][:220], flag
    readme = (ROOT / "README.md").read_text()
    default_batch = batch_help.split("--batch-size BATCH_SIZE ", 1)[1].split("(default: ", 1)[1].split(")")[0]
    assert f"--batch-size {default_batch}" in readme  # the README shows the same default


# -- optimize CLI ---------------------------------------------------------------------------------------


def _optimize(args: list[str], fake: FakeLLM, cwd: Path, ray_address: str, **popen) -> subprocess.Popen:
    argv = [sys.executable, "-m", "optimize", "--task", "triage", "--lm-base-url", fake.base_url,
            "--lm-model", "fake-model", "--workers", "2", "--threads-per-worker", "4", "--train-limit", "60",
            "--dev-limit", "10", "--val-size", "20", *args]
    return subprocess.Popen(argv, cwd=cwd, env=_env(RAY_ADDRESS=ray_address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_resume_with_other_settings_in_the_default_run_dir_is_refused_and_estimates_count_what_is_left(
        ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    with FakeLLM() as fake:
        first = _optimize(["--optimizer", "miprov2", "--auto", "none", "--num-candidates", "3", "--num-trials", "3"],
                          fake, tmp_path, address)
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
        # The estimate's plan and the run's own words agree.
        plan = "3 demo sets per predictor (1 bootstrapped, plus zero-shot and labeled), 3 instructions per " \
               "predictor (2 proposed, plus the original)"
        assert f"; {plan}, 3 trials" in err  # with the estimate
        assert f"candidates: making {plan} on the Ray workers" in err  # when the step runs

        fake.reset_stats()
        other = _optimize(["--optimizer", "miprov2", "--auto", "none", "--num-candidates", "3", "--num-trials", "3",
                           "--seed", "3", "--resume"], fake, tmp_path, address)
        _, err = other.communicate(timeout=300)
        assert other.returncode == 2, err[-2000:]
        assert "cannot resume" in err and "search.seed: 9 then, 3 now" in err
        assert fake.stats()["requests"] == 0

        # Resuming the finished run: nothing is left, so even --max-calls 1 lets it through, with no LM call.
        same = _optimize(["--optimizer", "miprov2", "--auto", "none", "--num-candidates", "3", "--num-trials", "3",
                          "--resume", "--max-calls", "1"], fake, tmp_path, address)
        out, err = same.communicate(timeout=300)
        assert same.returncode == 0, err[-2000:]
        assert "estimated LM calls still to make" in err
        total = [line for line in err.splitlines() if line.strip().startswith("total")][0]
        assert total.split()[-1] == "0", err
        assert fake.stats()["requests"] == 0 and "artifact:" in out


@pytest.mark.slow
def test_ctrl_c_in_optimize_prints_one_line_with_the_resume_command(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    with FakeLLM(latency=0.2) as fake:
        proc = _optimize(["--optimizer", "miprov2", "--auto", "none", "--num-candidates", "3", "--num-trials", "20",
                          "--run-dir", str(tmp_path / "run")], fake, tmp_path, address, preexec_fn=default_sigint)
        deadline = time.monotonic() + 300
        while not list((tmp_path / "run" / "trials").glob("*.json")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert "trial(s)" in line and str(tmp_path / "run") in line and "--resume" in line
