"""Cache writes off the caller's path: one writer thread per process, batched, flushed at exit.

A miss costs its caller the LM call and then the put: encoding the entry and a SQLite transaction
(or an object upload), about as much CPU as the rest of the call's client side.  With
:meth:`~.store.GuardedStore.put_later` the caller hands the answer over and returns at once; this
thread encodes and writes whatever has piled up, in one transaction per store where the store can
(:meth:`~.store.GuardedStore.write_pending`).  Until an entry is written, the store answers it from
memory, so a repeat of the call in this process is a hit all the same.  The thread touches no Ray;
it is drained at interpreter exit (an actor's graceful exit runs that hook too).

    >>> from dspy_ray.client.cache.store import MemoryStore
    >>> from dspy_ray.client.cache.writer import flush_writes
    >>> store = MemoryStore()
    >>> store.put_later("k" * 64, {"choices": [{"message": {"content": "hi"}}]})
    >>> store.get("k" * 64)["choices"][0]["message"]["content"]    # answered before it is written
    'hi'
    >>> flush_writes(5.0), store.stats().puts
    (True, 1)
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

BATCH = 1024  # entries written in one go at most
# Once an entry comes, wait this long for more before writing: a batch run's misses come hundreds a second, and
# written a few at a time the cache cost the process 0.244 ms of CPU a row in all, a tenth of a second's worth at
# a time 0.180 ms (benchmarks/stage_profile.py --drive --cache both).  Meanwhile the store answers them from memory.
LINGER_S = 0.1


class CacheWriter:
    """The process's writer thread: stores hand it keys; it writes what they hold pending."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, store: Any, key: str) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="lm-cache-writer", daemon=True)
                    self._thread.start()
        self._queue.put((store, key))

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is written; False if that took longer than ``timeout``."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            if not isinstance(items[0], threading.Event):  # a flush does not wait
                time.sleep(LINGER_S)
            while len(items) < BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            by_store: dict[int, tuple[Any, list[str]]] = {}
            markers = []
            for item in items:
                if isinstance(item, threading.Event):
                    markers.append(item)
                else:
                    by_store.setdefault(id(item[0]), (item[0], []))[1].append(item[1])
            for store, keys in by_store.values():
                try:
                    store.write_pending(keys)
                except Exception:  # noqa: BLE001 - the writer never dies; a lost put is a later miss
                    logger.exception("LM cache: background write failed")
            for marker in markers:
                marker.set()


_writer = CacheWriter()


def submit(store: Any, key: str) -> None:
    """Have ``store``'s pending entry ``key`` written by the process's writer thread."""
    _writer.submit(store, key)


def flush_writes(timeout: float = 10.0) -> bool:
    """Write everything handed over so far (tests, the end of a run, interpreter exit)."""
    return _writer.flush(timeout)


atexit.register(flush_writes)
