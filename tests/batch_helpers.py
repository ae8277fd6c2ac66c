"""Inputs and outputs of batch runs, and a scripted HTTP endpoint, shared by the pipeline, usage and client tests."""

from __future__ import annotations

import json
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
