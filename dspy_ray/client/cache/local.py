"""The default store: a diskcache folder on this machine, shared by every process on it.

diskcache keeps entries in SQLite (WAL mode: readers never wait, writers queue briefly), so
any number of actors and jobs on one machine read and write one folder at once.  Its size is
bounded: past ``size_limit`` bytes the least recently stored entries are evicted.

    >>> store = LocalStore(tmp_path / "lm", size_limit=64 * 2**20)        # doctest: +SKIP
    >>> store.put(key, response); store.get(key) == response              # doctest: +SKIP
    True

Entries are stored as the JSON bytes of :mod:`.store`'s format, never pickled.  Not for a folder on
NFS or another network filesystem (SQLite's locks are not reliable there): use a ``file://``
URI, :class:`~dspy_ray.client.cache.remote.RemoteStore`, for a shared filesystem.
"""

from __future__ import annotations

import os

from dspy_ray.client.cache.store import GuardedStore

DEFAULT_SIZE_LIMIT = 2**30  # 1 GiB: ~700k answers of 1.5 KB
# Evict by time of storing: a hit then only reads ("least-recently-used" writes the access time on every hit,
# 4x the hit latency in benchmarks/lm_cache.py).
EVICTION_POLICY = "least-recently-stored"
BUSY_TIMEOUT_S = 5.0  # how long a write waits for SQLite's lock before it is dropped (diskcache's default: 60 s)


class LocalStore(GuardedStore):
    """A diskcache folder (created on first use) holding at most ``size_limit`` bytes."""

    def __init__(self, directory: str | os.PathLike, size_limit: int = DEFAULT_SIZE_LIMIT, *,
                 eviction_policy: str = EVICTION_POLICY, memory_entries: int = 0):
        super().__init__(os.path.abspath(os.fspath(directory)), memory_entries)
        self.size_limit = size_limit
        self.eviction_policy = eviction_policy

    def _open(self):
        import diskcache

        return diskcache.Cache(self.location, size_limit=self.size_limit, timeout=BUSY_TIMEOUT_S,
                               eviction_policy=self.eviction_policy, statistics=False)

    def _read(self, cache, key: str) -> bytes | None:
        return cache.get(key, default=None)

    def _write(self, cache, key: str, data: bytes) -> None:
        cache.set(key, data)

    def _write_many(self, cache, entries: list[tuple[str, bytes]]) -> None:
        with cache.transact():  # one SQLite transaction for the batch, not one per entry
            for key, data in entries:
                cache.set(key, data)

    def _close(self, cache) -> None:
        cache.close()

    def volume(self) -> int:
        """Bytes the folder holds (SQLite file and large values), as diskcache counts them for eviction."""
        return self._opened().volume()

    def __len__(self) -> int:
        return len(self._opened())
