"""The command line: ``python -m dspy_ray.testing.fake_llm [--port N] [--settings JSON] [--<setting> V]``.

Every :class:`FakeSettings` field but the dicts (pass those in ``--settings``) is a flag; flags win
over ``--settings``.  Prints the banner with the base URL, then serves until SIGTERM / SIGINT or, with
``--parent-pid``, until that process is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
from collections.abc import Callable

from dspy_ray.testing.fake_llm.server import FakeServer
from dspy_ray.testing.fake_llm.settings import FakeSettings


def parse_args(argv: list[str] | None = None) -> tuple[int, FakeSettings, int | None]:
    parser = argparse.ArgumentParser(
        prog="python -m dspy_ray.testing.fake_llm",
        description="Fault-injecting fake OpenAI-compatible chat-completions server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port (default 8001)")
    parser.add_argument("--settings", default="{}", help="settings as a JSON object (flags below win)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this parent process is gone")
    for f in dataclasses.fields(FakeSettings):
        if f.name in ("answers", "field_overrides", "gold"):
            continue  # dicts: pass them in --settings
        kind = int if f.name in ("capacity", "reject_over") else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"default {f.default!r}")
    args = parser.parse_args(argv)
    values = json.loads(args.settings)
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(FakeSettings)
                   if getattr(args, f.name, None) is not None})
    return args.port, FakeSettings(**values), args.parent_pid


def main(argv: list[str] | None = None) -> None:
    port, settings, parent_pid = parse_args(argv)

    async def run() -> None:  # the server's asyncio objects must be made inside the loop
        await FakeServer(settings).serve(port, parent_pid)

    factory = _loop_factory()
    if factory is None or not hasattr(asyncio, "Runner"):  # asyncio.Runner: Python 3.11+
        asyncio.run(run())
        return
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (it comes with ``ray[serve]`` on Linux and macOS), as in Ray's
    own workers: the fake shares the cores with the client it serves in every benchmark, and uvloop takes
    about a fifth less CPU per request than asyncio's own loop.  ``FAKE_LLM_UVLOOP=0`` keeps asyncio's."""
    if os.environ.get("FAKE_LLM_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
