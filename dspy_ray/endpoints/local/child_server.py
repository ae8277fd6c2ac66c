"""A local HTTP server in a child process that cannot outlive its parent.

The embedded models (:mod:`dspy_ray.endpoints.local.llm_server`, :mod:`dspy_ray.endpoints.local.embedder_server`) run
as child processes on 127.0.0.1.  They must stop with the process that started
them however it ends - a clean exit, Ctrl-C, SIGTERM from a supervisor, or a
SIGKILL that runs no cleanup at all.  Two mechanisms, so one failing is not enough
to leave an orphan:

* the child reads its stdin, a pipe only the parent holds (Python file
  descriptors are not inherited by other children), and stops at EOF, which the
  kernel delivers when the parent dies;
* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` as well (it fires when the
  parent *thread* that started the child ends, so it is set only when the
  child is started from the main thread).

    >>> server = ChildServer.start([sys.executable, "-m", "dspy_ray.endpoints.local.llm_server", "--port", "8123"], port=8123,
    ...                            health_path="/health", name="embedded LM")     # doctest: +SKIP
    >>> server.stop()                                                              # doctest: +SKIP

The child's side is :func:`stop_when_parent_dies`: the child's command line
gets ``--exit-with-parent`` so that a server started by hand from a terminal
does not read the terminal.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dspy_ray.util.http import healthy
from dspy_ray.util.paths import REPO_ROOT

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the stdin pipe still stops the child


class ChildServer:
    """A started child server: its process, port and log."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, name: str):
        self.proc, self.port, self.log_path, self.name = proc, port, log_path, name

    @classmethod
    def start(cls, cmd: list[str], *, port: int, health_path: str, name: str,
              timeout_s: float = 60.0) -> ChildServer:
        """Start ``cmd``, wait until ``GET health_path`` answers 200; raise with the log's tail if it never does."""
        cmd = [*cmd, EXIT_WITH_PARENT_FLAG]
        log_path = Path(tempfile.gettempdir()) / f"{name.replace(' ', '-')}-{port}.log"
        repo = str(REPO_ROOT)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        main_thread = threading.current_thread() is threading.main_thread()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, env=env,
                                    preexec_fn=_die_with_parent if main_thread and sys.platform == "linux" else None)
        server = cls(proc, port, log_path, name)
        atexit.register(server.stop)
        deadline = time.monotonic() + timeout_s
        while not healthy(f"http://127.0.0.1:{port}{health_path}", timeout_s=1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not become ready (log {log_path}):\n{tail}")
            time.sleep(0.2)
        return server

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()


EXIT_WITH_PARENT_FLAG = "--exit-with-parent"


def stop_when_parent_dies(stop: Callable[[], None], watch_stdin: bool) -> None:
    """In the child: call ``stop`` on SIGTERM/SIGINT and, with ``watch_stdin`` (the child was started by
    :class:`ChildServer`, which passes ``--exit-with-parent``), when stdin reaches EOF: the parent is gone."""
    signal.signal(signal.SIGTERM, lambda *_: stop())
    signal.signal(signal.SIGINT, lambda *_: stop())
    if not watch_stdin:
        return

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        stop()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class LocalEndpoint:
    """An OpenAI-compatible server running as a :class:`ChildServer` on 127.0.0.1; a context manager
    that stops it.  The embedded LM and the embedded embedder are two of these."""

    def __init__(self, server: ChildServer):
        self.server = server

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
