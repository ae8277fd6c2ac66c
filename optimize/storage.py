"""Persistent run state on a local path or an object store, through ``pyarrow.fs``.

A run directory holds everything a killed run needs to continue::

    run.json                 the run's fingerprint and settings (redacted)
    candidates.json          the CandidateSet (instructions, demo sets)
    journal/00000042.json    the optuna study, as journal entries (JournalStorage)
    trials/00012-3fa9c1d2.json   one file per finished minibatch trial (TrialResult)
    full/003-8b1e0c44.json       one file per finished full evaluation (000 = baseline)
    dev/baseline.json, dev/optimized.json   held-out scores

Every file is written once, under a temporary name and then renamed, so a kill
leaves either the whole file or none of it; an object store never sees a
partial object.  URIs: a plain path, ``file://``, ``s3://``, ``gs://``, ``hdfs://``
(pyarrow), or any fsspec URL (``memory://`` in tests).

The optuna journal gets a backend of its own, :class:`ObjectJournalBackend`:
each ``append_logs`` call is one new numbered object, since object stores cannot
append to a file.  Only the driver writes to a run (workers return results, the
driver persists them), so numbering needs no lock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow.fs as pafs
from optuna.storages.journal import BaseJournalBackend

from dspy_ray.util.fs import filesystem_for, read_bytes, write_bytes


class RunStorage:
    """JSON files under one run directory (local or object store)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem_for(uri)

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        if not self.exists():
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))

    def write_json(self, rel: str, obj: Any) -> None:
        """Write ``obj`` as JSON atomically (temporary name, then rename)."""
        data = (json.dumps(obj, indent=None, separators=(",", ":"), default=str) + "\n").encode()
        write_bytes(self.fs, self._path(rel), data)

    def read_json(self, rel: str) -> Any | None:
        try:
            data = read_bytes(self.fs, self._path(rel))
        except OSError as exc:
            raise OSError(f"{self.uri}/{rel}: cannot read ({exc})") from exc
        return None if data is None else json.loads(data.decode())

    def list(self, rel: str) -> list[str]:
        """Names of the finished files in ``rel`` (temporary files excluded), sorted."""
        return [name for name in self._names(rel, pafs.FileType.File) if not name.startswith(".tmp-")]

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the folders in ``rel``, sorted."""
        return self._names(rel, pafs.FileType.Directory)

    def _names(self, rel: str, kind: pafs.FileType) -> list[str]:
        """Names of the entries of one ``kind`` in ``rel``, sorted; none when ``rel`` does not exist."""
        path = self._path(rel)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=False))
        return sorted(i.base_name for i in infos if i.type == kind)

    def read_all(self, rel: str) -> list[Any]:
        return [self.read_json(f"{rel}/{name}") for name in self.list(rel)]

    def journal(self) -> ObjectJournalBackend:
        return ObjectJournalBackend(self, "journal")


class ObjectJournalBackend(BaseJournalBackend):
    """Optuna journal as numbered immutable objects: ``journal/00000000.json``, ``00000001.json``, …

    One writer (the driver) per run.  What this process wrote is kept in memory,
    so only the first read lists the store.
    """

    def __init__(self, storage: RunStorage, prefix: str):
        self.storage, self.prefix = storage, prefix
        self._logs: list[dict[str, Any]] | None = None
        self._objects = 0

    def _load(self) -> list[dict[str, Any]]:
        if self._logs is None:
            logs: list[dict[str, Any]] = []
            names = [n for n in self.storage.list(self.prefix) if n.endswith(".json")]
            for expected, name in enumerate(names):
                if name != f"{expected:08d}.json":
                    raise RuntimeError(f"{self.storage.uri}/{self.prefix}: journal object {name} out of sequence")
                logs.extend(self.storage.read_json(f"{self.prefix}/{name}"))
            self._logs, self._objects = logs, len(names)
        return self._logs

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        return list(self._load()[log_number_from:])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        known = self._load()
        self.storage.write_json(f"{self.prefix}/{self._objects:08d}.json", logs)
        self._objects += 1
        known.extend(logs)
