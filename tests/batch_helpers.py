"""Inputs and outputs of batch runs, and a scripted HTTP endpoint, shared by the pipeline, usage and client tests."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import pyarrow.parquet as pq


def write_calls(path: Path, n: int, text: str = "Call {i}: my neighbour's shed is on fire") -> Path:
    """``n`` calls as jsonl, ids ``call-00000`` ...; ``text`` is formatted with the call's number ``i``."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"call-{i:05d}", "transcript": text.format(i=i)}) + "\n")
    return path


def read_output(out: Path):
    """Every parquet file a run wrote to ``out``, as one table."""
    return pq.read_table(sorted(out.glob("*.parquet")))


HI = json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode()  # a chat answer whose text is "hi"
HI_WITH_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(HI), HI)


def chat_scripts(last: bytes = HI_WITH_LENGTH) -> list[list[bytes | None]]:
    """The replies the HTTP clients' tests read, for :func:`scripted_http_server`: on a first connection an answer
    framed by Content-Length, one chunked with a trailer, then a 429 (Retry-After 2) that closes it; on a second a
    100 Continue before an answer, then the request read and the connection dropped unanswered; on a third,
    ``last``.  Every answer says "hi"."""
    chunked = b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(HI), HI)
    return [
        [HI_WITH_LENGTH,
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
         b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"],
        [b"HTTP/1.1 100 Continue\r\n\r\n" + HI_WITH_LENGTH, None],
        [last],
    ]


def scripted_http_server(scripts: list[list[bytes | None]]) -> tuple[int, list]:
    """A server on 127.0.0.1 that takes one connection per script and answers each request on it with the
    script's next reply (``None``: read the request, then close without answering); (its port, the JSON
    bodies of the requests it read)."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: list = []

    def serve():
        with server:
            answer_all()

    def answer_all():
        for script in scripts:
            conn, _ = server.accept()
            with conn:
                for reply in script:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length")))
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    seen.append(json.loads(rest))
                    if reply is None:
                        break
                    conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], seen


def default_sigint() -> None:
    """``preexec_fn`` for a CLI a test interrupts: SIGINT back to its default in the child.  A test run started
    as a shell's background job inherits SIGINT ignored, and a Python started so never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
