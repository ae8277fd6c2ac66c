"""The parent's side: :class:`FakeLLM` starts the fake server in a child process, stops it, and drives it.

The child runs ``python -m dspy_ray.testing.fake_llm`` (:mod:`dspy_ray.testing.fake_llm.cli`) from the
repository root, which is put on its ``PYTHONPATH``; the admin client speaks plain ``urllib`` (no aiohttp
in the parent)::

    with FakeLLM(latency=0.1, p_429=0.05) as fake:
        lm = dspy.LM("openai/fake-model", api_base=fake.base_url, api_key="x", cache=False)
        fake.configure(p_429=0.0)
        fake.stats()["rate_limited"]
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dspy_ray.testing.fake_llm.answers import input_key
from dspy_ray.testing.fake_llm.settings import BANNER, HOST, FakeSettings
from dspy_ray.util.paths import REPO_ROOT

ROOT = REPO_ROOT  # the child runs from here, with it on its PYTHONPATH
MODULE = "dspy_ray.testing.fake_llm"  # what the child runs with `python -m`


class FakeLLM:
    """Runs the fake server in a child process; use as a context manager.

    ``FakeLLM(**settings)`` takes any :class:`FakeSettings` field as a keyword
    (plus ``startup_timeout``); ``base_url`` is ready once ``start()`` /
    ``__enter__`` returns.
    """

    def __init__(self, *, startup_timeout: float = 30.0, **settings: Any) -> None:
        self.settings = FakeSettings(**settings)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._stderr_path: str | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1`` - what to pass as ``api_base``."""
        if self.port is None:
            raise RuntimeError("FakeLLM is not running; call start() or use it as a context manager")
        return f"http://{HOST}:{self.port}/v1"

    @staticmethod
    def input_key(text: str) -> str:
        """Key of ``stats()['inputs']`` and of the ``answers`` setting for a user message."""
        return input_key(text)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FakeLLM:
        if self.proc is not None:
            raise RuntimeError("FakeLLM already started")
        deadline = time.monotonic() + self.startup_timeout
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # stderr goes to a file: a pipe nobody reads would block the child once full.
        with tempfile.NamedTemporaryFile(prefix="fake-llm-", suffix=".log", delete=False) as log:
            self._stderr_path = log.name
            self.proc = subprocess.Popen(
                [sys.executable, "-m", MODULE, "--port", "0", "--parent-pid", str(os.getpid()),
                 "--settings", json.dumps(self.settings.to_dict())],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        try:
            self.port = self._read_port(deadline)
            self._wait_healthy(deadline)
        except BaseException:
            self.close()
            raise
        return self

    def _read_port(self, deadline: float) -> int:
        """The port from the child's banner line on stdout."""
        assert self.proc is not None and self.proc.stdout is not None
        fd, data = self.proc.stdout.fileno(), b""
        selector = selectors.DefaultSelector()  # not select(): a busy process may hold file numbers over 1024
        selector.register(fd, selectors.EVENT_READ)
        try:
            while b"\n" not in data:
                data = self._read_some(selector, fd, data, deadline)
        finally:
            selector.close()
        match = BANNER.search(data.decode(errors="replace"))
        if not match:
            self._fail(f"printed an unexpected banner {data!r}")
        return int(match.group(2))

    def _read_some(self, selector: selectors.BaseSelector, fd: int, data: bytes, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._fail("did not report its port")
        if selector.select(min(remaining, 0.2)):
            chunk = os.read(fd, 4096)
            if not chunk:
                self._fail("exited before reporting its port")
            return data + chunk
        if self.proc.poll() is not None:
            self._fail("exited before reporting its port")
        return data

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            try:
                if self._request("GET", "/health", timeout=1.0).get("status") == "ok":
                    return
            except OSError:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                self._fail("exited before /health answered")
            if time.monotonic() > deadline:
                self._fail(f"did not answer /health within {self.startup_timeout:g} s")
            time.sleep(0.05)

    def _fail(self, what: str) -> None:
        code = self.proc.poll() if self.proc else None
        stderr = Path(self._stderr_path).read_text(errors="replace")[-4000:] if self._stderr_path else ""
        raise RuntimeError(f"fake LLM server {what} (exit code {code}); its stderr:\n{stderr}")

    def close(self) -> None:
        """Stop the child: SIGTERM, then SIGKILL if it is still there after 5 s."""
        proc, self.proc, self.port = self.proc, None, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr_path:
            Path(self._stderr_path).unlink(missing_ok=True)
            self._stderr_path = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- admin -----------------------------------------------------------------

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Apply settings at once (``POST /admin/config``); returns all current settings."""
        current = self._request("POST", "/admin/config", changes)
        self.settings = FakeSettings(**current)
        return current

    def config(self) -> dict[str, Any]:
        """The server's current settings (``GET /admin/config``)."""
        return self._request("GET", "/admin/config")

    def stats(self) -> dict[str, Any]:
        """Counters from ``GET /admin/stats`` (see the package docstring)."""
        return self._request("GET", "/admin/stats")

    def reset_stats(self) -> dict[str, Any]:
        """Zero the counters and samples (``POST /admin/reset``); returns the fresh stats."""
        return self._request("POST", "/admin/reset", {})

    def wait_until_quiet(self, quiet_s: float = 1.0, timeout_s: float = 60.0,
                         watch: Callable[[], Any] | None = None) -> None:
        """Return once no request (chat or embeddings) has arrived, been in flight or queued, and ``watch()``
        (optional: something else the clients change) has not changed, for ``quiet_s`` seconds: after a
        client's driver is killed, Ray ends its workers a moment later and their last calls may still land.
        Raises TimeoutError when that takes over ``timeout_s``."""
        def state() -> tuple[Any, ...]:
            stats = self.stats()
            return (stats["requests"], stats["embeddings"]["requests"], stats["in_flight"], stats["queued"],
                    watch() if watch is not None else None)

        deadline = time.monotonic() + timeout_s
        last, since = state(), time.monotonic()
        while last[2] or last[3] or time.monotonic() - since < quiet_s:
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests kept reaching the fake endpoint for {timeout_s:g} s")
            time.sleep(0.1)
            now = state()
            if now != last:
                last, since = now, time.monotonic()

    def samples(self) -> list[dict[str, float]]:
        """In-flight samples since the last reset, oldest first (needs ``sample_interval`` > 0)."""
        data = self._request("GET", "/admin/samples")
        return [dict(zip(data["columns"], row)) for row in data["rows"]]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 timeout: float = 10.0) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{HOST}:{self.port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ValueError(f"fake LLM {method} {path} -> HTTP {exc.code}: {detail}") from None
