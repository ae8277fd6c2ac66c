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

import functools
import math
import os
import sqlite3
import threading
import time
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
        self.bulk = False  # whether batches may be written many entries to a statement (_bulk_ready)
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


def _set_many(cache, entries: list[tuple[str, bytes]], bulk: bool = False) -> None:
    """``entries`` in one SQLite transaction; with ``bulk`` (the folder's schema was checked: :func:`_bulk_ready`),
    those stored in the database itself go in ``ROWS_PER_STATEMENT`` at a time (:func:`_upsert`)."""
    with cache.transact():  # one SQLite transaction for the batch, not one per entry
        if bulk:
            inline = cache.disk_min_file_size  # diskcache keeps a value this long or longer in a file of its own
            rest = [(key, data) for key, data in entries if len(data) >= inline]
            rows = [(key, data) for key, data in entries if len(data) < inline]
            connection, now = cache._con, time.time()
            for start in range(0, len(rows), ROWS_PER_STATEMENT):
                chunk = rows[start:start + ROWS_PER_STATEMENT]
                connection.execute(_upsert(len(chunk)),
                                   [v for key, data in chunk for v in (key, now, now, sqlite3.Binary(data))])
            entries = rest
        for key, data in entries:
            cache.set(key, data)
    _evict(cache, bulk)


# diskcache's set() makes a few SQLite calls an entry, and the sqlite3 module lets go of the GIL for each: the
# writer thread then waits for the GIL again each time, behind the event loop that runs the rows.  Beside a
# busy thread that made a write cost several times its CPU on an idle process, in the writer and in the loop it
# kept interrupting (benchmarks/lm_cache.py --writes).  One INSERT of many rows lets go of it once.  The rows
# are what set() writes for a str key (raw) and a bytes value kept in the database (MODE_RAW, size 0, no file,
# no expiry or tag), so diskcache's triggers keep its count and size, and its reads, eviction and volume work as
# they do for set(); an entry already stored in a file of its own is left as it is (replacing it would leave the
# file behind).
ROWS_PER_STATEMENT = 64
_COLUMNS = ("key", "raw", "store_time", "expire_time", "access_time", "access_count", "tag", "size", "mode",
            "filename", "value")


@functools.lru_cache(maxsize=ROWS_PER_STATEMENT)
def _upsert(rows: int) -> str:
    """The INSERT of ``rows`` entries (parameters: key, now, now, value per entry)."""
    from diskcache.core import MODE_RAW

    values = ",".join([f"(?, 1, ?, NULL, ?, 0, NULL, 0, {MODE_RAW}, NULL, ?)"] * rows)
    return (f"INSERT INTO Cache ({', '.join(_COLUMNS)}) VALUES {values} ON CONFLICT (key, raw) DO UPDATE SET "
            "store_time = excluded.store_time, expire_time = NULL, access_time = excluded.access_time, "
            "access_count = 0, tag = NULL, size = 0, mode = excluded.mode, value = excluded.value "
            "WHERE filename IS NULL")


def _bulk_ready(cache) -> bool:
    """Whether this folder's schema is the one :func:`_upsert` writes (else every entry goes through set())."""
    try:
        columns = {row[1] for row in cache._con.execute("PRAGMA table_info(Cache)")}
        triggers = {row[0] for row in cache._con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    except (AttributeError, sqlite3.Error):
        return False
    return (sqlite3.sqlite_version_info >= (3, 24) and set(_COLUMNS) <= columns
            and {"Settings_count_insert", "Settings_size_insert", "Settings_size_update"} <= triggers)


def _set_one(cache, key: str, data: bytes, bulk: bool = False) -> None:
    cache.set(key, data)
    _evict(cache, bulk)


def _evict(cache, bulk: bool = False) -> None:
    """Once per write (a batch of entries, or one): evict the least recently stored entries while the folder
    is over its bound.  diskcache would check on every ``set`` (three more SQL statements each, a third of a
    write's cost): the folder is opened with ``cull_limit=0`` and checked here instead.  With ``bulk`` (the
    schema checked), an eviction makes ``EVICT_ROOM`` of room at once (:func:`_evict_room`)."""
    import diskcache

    volume, limit = cache.volume(), cache.size_limit
    if volume <= limit:
        return
    try:
        if bulk:
            _evict_room(cache, volume, limit)
        cache.cull()  # what is still over the bound, diskcache's way
    except (diskcache.Timeout, sqlite3.OperationalError):  # another process holds the lock: the next write evicts
        pass


# A folder at its bound (a long-used machine's: every later write evicts) is brought EVICT_ROOM of the bound
# under it, not just under it.  diskcache's cull() makes room for what was just written, ten entries to a
# transaction, each with its own size check: at the bound every batch of writes paid for that, and a write cost
# several times what it costs below the bound (benchmarks/lm_cache.py --writes).  Here the oldest entries go
# EVICT_ROWS to a transaction, and the next eviction is due after EVICT_ROOM of the bound (20 MiB of the
# default 1 GiB) has been written.
EVICT_ROOM = 0.02
EVICT_ROWS = 2000


def _evict_room(cache, volume: int, limit: int) -> None:
    """Delete the entries the folder's eviction policy names first until it holds under ``(1 - EVICT_ROOM)`` of
    ``limit`` (the rows to delete are estimated from the entries' mean size; ``cull()`` then finishes the job)."""
    from diskcache.core import EVICTION_POLICY

    select = EVICTION_POLICY[cache.eviction_policy]["cull"]
    if select is None:  # a policy that never evicts
        return
    target = limit * (1 - EVICT_ROOM)
    while volume > target:
        count = len(cache)
        if not count:
            return
        rows = min(EVICT_ROWS, max(1, math.ceil((volume - target) * count / volume)))
        now = time.time()
        with cache.transact():
            connection = cache._con
            files = [f for (f,) in connection.execute(select.format(fields="filename", now=now), (rows,)) if f]
            connection.execute(f"DELETE FROM Cache WHERE rowid IN ({select.format(fields='rowid', now=now)})",
                               (rows,))
        for filename in files:  # after the commit, as diskcache does: a rolled-back delete keeps its files
            cache._disk.remove(filename)
        before, volume = volume, cache.volume()
        if volume >= before:  # the file did not shrink (a folder made without auto-vacuum): cull() decides
            return


class LocalStore(GuardedStore):
    """A diskcache folder (created on first use) holding at most ``size_limit`` bytes."""

    def __init__(self, directory: str | os.PathLike, size_limit: int = DEFAULT_SIZE_LIMIT, *,
                 eviction_policy: str = EVICTION_POLICY, memory_entries: int = 0):
        super().__init__(os.path.abspath(os.fspath(directory)), memory_entries)
        self.size_limit = size_limit
        self.eviction_policy = eviction_policy

    def _open(self):
        import diskcache

        handle = _Handle(diskcache.Cache(self.location, size_limit=self.size_limit, timeout=BUSY_TIMEOUT_S,
                                         eviction_policy=self.eviction_policy, statistics=False,
                                         cull_limit=0))  # evicted once per write: _evict
        handle.bulk = handle.run(_bulk_ready, handle.cache)
        return handle

    def _read(self, handle: _Handle, key: str) -> bytes | None:
        return handle.run(handle.cache.get, key, None)

    def _write(self, handle: _Handle, key: str, data: bytes) -> None:
        handle.run(_set_one, handle.cache, key, data, handle.bulk)

    def _write_many(self, handle: _Handle, entries: list[tuple[str, bytes]]) -> None:
        handle.run(_set_many, handle.cache, entries, handle.bulk)

    def _close(self, handle: _Handle) -> None:
        handle.close()

    def volume(self) -> int:
        """Bytes the folder holds (SQLite file and large values), as diskcache counts them for eviction."""
        handle = self._opened()
        return handle.run(handle.cache.volume)

    def __len__(self) -> int:
        handle = self._opened()
        return handle.run(handle.cache.__len__)
