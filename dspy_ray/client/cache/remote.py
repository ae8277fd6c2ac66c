"""A store in object storage or on a shared filesystem: one JSON object per entry.

``LM_CACHE=s3://bucket/prefix`` (or ``gs://``, ``hdfs://``, ``file:///shared/lm-cache``, any
fsspec URL) puts each entry at ``<prefix>/<key[:2]>/<key>.json`` (256 folders, so no listing
or folder grows past what a filesystem likes), in the format of :mod:`.store`::

    >>> store = RemoteStore("file:///shared/lm-cache")                    # doctest: +SKIP
    >>> store.put(key, response)   # -> /shared/lm-cache/3f/3f9c...e1.json  # doctest: +SKIP

Writes are whole or absent: on a filesystem the entry is written under a temporary name and
renamed (:func:`dspy_ray.util.fs.write_bytes`); on an object store one PUT is atomic already,
so it is written in place.  Two processes putting one key race harmlessly: both wrote the
same request's answer and the last rename or PUT wins.  Nothing is evicted here: give the
bucket a lifecycle rule (expire after N days) instead.  A small LRU in this process serves
repeated hits without a round trip.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from dspy_ray.client.cache.store import GuardedStore
from dspy_ray.util.fs import filesystem_for, read_bytes, write_bytes

MEMORY_ENTRIES = 1024  # the in-process LRU: ~2 MB of typical answers
# Filesystems where a rename is atomic and cheap; on the others (object stores) a rename is a copy.
_RENAMING = (pafs.LocalFileSystem, pafs.HadoopFileSystem)


class RemoteStore(GuardedStore):
    """Entries as ``<root>/<key[:2]>/<key>.json`` under an fsspec / pyarrow URI; connects on first use."""

    slow_reads = True  # a round trip to object storage or a shared filesystem

    def __init__(self, uri: str, *, memory_entries: int = MEMORY_ENTRIES):
        super().__init__(uri.rstrip("/"), memory_entries)

    def path_for(self, key: str) -> str:
        """Where ``key``'s entry lives inside the filesystem."""
        return f"{self._opened()[1]}/{key[:2]}/{key}.json"

    def _open(self) -> tuple[pafs.FileSystem, str]:
        # May fail (no credentials, no network, an unknown scheme): the first get or put says so.
        fs, root = filesystem_for(self.location)
        return fs, root.rstrip("/")

    def _read(self, handle, key: str) -> bytes | None:
        fs, root = handle
        return read_bytes(fs, f"{root}/{key[:2]}/{key}.json")

    def _write(self, handle, key: str, data: bytes) -> None:
        fs, root = handle
        path = f"{root}/{key[:2]}/{key}.json"
        if isinstance(fs, _RENAMING):
            write_bytes(fs, path, data)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
