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
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

from dspy_ray.client.cache.store import GuardedStore

DEFAULT_SIZE_LIMIT = 2**30  # 1 GiB: ~700k answers of 1.5 KB
# Evict by time of storing: a hit then only reads ("least-recently-used" writes the access time on every hit,
# 4x the hit latency in benchmarks/lm_cache.py).
EVICTION_POLICY = "least-recently-stored"
BUSY_TIMEOUT_S = 5.0  # how long a write waits for SQLite's lock before it is dropped (diskcache's default: 60 s)
# diskcache opens one SQLite connection per thread that touches it, and SQLite keeps a closed connection's
# file open while another holds a lock on the file (WAL mode: always), so a process with many threads at
# once (dspy.Parallel, a thread per caller) would pile up open files.  The first DIRECT_THREADS live threads
# to touch the store use it on their own thread (a hit costs ~20 us, against ~100 us for a hop to another
# thread); any other thread's reads and synchronous writes run on IO_THREADS threads of the store's own.
# The cache writer thread (.writer) is one more.  A dead thread's place goes to the next newcomer.
DIRECT_THREADS = 32
IO_THREADS = 4


class _Handle:
    """An open diskcache folder and the threads that may touch it: at most DIRECT_THREADS live ones
    directly, the rest through IO_THREADS threads of its own."""

    def __init__(self, cache):
        self.cache = cache
        self.io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="lm-cache-io")
        self._mine = threading.local()  # .state: this thread's _Direct, or False when it must hop
        self._direct: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def run(self, fn, *args):
        state = getattr(self._mine, "state", None)
        if state is None:
            state = self._mine.state = self._admit(threading.current_thread())
        if state is False:
            try:
                future = self.io.submit(fn, *args)
            except RuntimeError:  # the interpreter is exiting (the writer's last flush): open files no longer matter
                return fn(*args)
            return future.result()
        result = fn(*args)
        if not state.connection:
            state.connection.extend(filter(None, [getattr(self.cache._local, "con", None)]))
        return result

    def _admit(self, thread: threading.Thread) -> _Direct | bool:
        with self._lock:
            if len(self._direct) >= DIRECT_THREADS:
                self._direct = {t for t in self._direct if t.is_alive()}
            if len(self._direct) >= DIRECT_THREADS:
                return False
            self._direct.add(thread)
        return _Direct()

    def close(self) -> None:
        # A connection is its thread's own: each IO thread closes its own, all held at a barrier so every
        # one runs; this thread closes its own.  A direct thread still alive closes its own when it ends.
        barrier = threading.Barrier(IO_THREADS)

        def close_mine() -> None:
            barrier.wait(timeout=30)
            self.cache.close()

        for future in [self.io.submit(close_mine) for _ in range(IO_THREADS)]:
            future.result()
        self.io.shutdown(wait=True)
        self.cache.close()


class _Direct:
    """A direct thread's mark.  It goes when the thread ends, and its finalizer closes the thread's
    SQLite connection there and then: a dropped connection would wait for the cycle collector, its
    file open all that time, and threads that come and go would pile such files up."""

    def __init__(self) -> None:
        self.connection: list = []  # this thread's connection, once it has one
        weakref.finalize(self, _close_quietly, self.connection)


def _close_quietly(connection: list) -> None:
    for con in connection:
        try:
            con.close()
        except Exception:  # noqa: BLE001 - not on its own thread after all: the cycle collector frees it
            pass


def _set_many(cache, entries: list[tuple[str, bytes]]) -> None:
    with cache.transact():  # one SQLite transaction for the batch, not one per entry
        for key, data in entries:
            cache.set(key, data)
    _evict(cache)


def _set_one(cache, key: str, data: bytes) -> None:
    cache.set(key, data)
    _evict(cache)


def _evict(cache) -> None:
    """Once per write (a batch of entries, or one): evict the least recently stored entries while the folder
    is over its bound.  diskcache would check on every ``set`` (three more SQL statements each, a third of a
    write's cost): the folder is opened with ``cull_limit=0`` and checked here instead."""
    import diskcache

    if cache.volume() > cache.size_limit:
        try:
            cache.cull()
        except diskcache.Timeout:  # another process holds the lock: the entries are stored, the next write evicts
            pass


class LocalStore(GuardedStore):
    """A diskcache folder (created on first use) holding at most ``size_limit`` bytes."""

    def __init__(self, directory: str | os.PathLike, size_limit: int = DEFAULT_SIZE_LIMIT, *,
                 eviction_policy: str = EVICTION_POLICY, memory_entries: int = 0):
        super().__init__(os.path.abspath(os.fspath(directory)), memory_entries)
        self.size_limit = size_limit
        self.eviction_policy = eviction_policy

    def _open(self):
        import diskcache

        return _Handle(diskcache.Cache(self.location, size_limit=self.size_limit, timeout=BUSY_TIMEOUT_S,
                                       eviction_policy=self.eviction_policy, statistics=False,
                                       cull_limit=0))  # evicted once per write: _evict

    def _read(self, handle: _Handle, key: str) -> bytes | None:
        return handle.run(handle.cache.get, key, None)

    def _write(self, handle: _Handle, key: str, data: bytes) -> None:
        handle.run(_set_one, handle.cache, key, data)

    def _write_many(self, handle: _Handle, entries: list[tuple[str, bytes]]) -> None:
        handle.run(_set_many, handle.cache, entries)

    def _close(self, handle: _Handle) -> None:
        handle.close()

    def volume(self) -> int:
        """Bytes the folder holds (SQLite file and large values), as diskcache counts them for eviction."""
        handle = self._opened()
        return handle.run(handle.cache.volume)

    def __len__(self) -> int:
        handle = self._opened()
        return handle.run(handle.cache.__len__)
