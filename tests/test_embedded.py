"""The embedded model servers stop with the process that started them, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PARENT = """
import sys, time
from dspy_ray.endpoints.local.llm_server import EmbeddedLM
from dspy_ray.endpoints.local.embedder_server import EmbeddedEmbedder
server = {"lm": EmbeddedLM, "embedder": EmbeddedEmbedder}[sys.argv[1]].start()
print(server.server.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): check its state
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.llm
@pytest.mark.parametrize("which", ["lm", "embedder"])
def test_embedded_server_dies_with_a_sigkilled_parent(which):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, which], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)  # no atexit, no cleanup of any kind
        parent.wait()
        deadline = time.monotonic() + 15
        while _alive(child):
            assert time.monotonic() < deadline, "the embedded server outlived its SIGKILLed parent"
            time.sleep(0.2)
    finally:
        if parent.poll() is None:
            parent.kill()

