"""What every cache store shares: the entry format, the counters, and the rule that the cache never fails a call.

An entry is one JSON object::

    {"version": 1, "key": "<64 hex>", "model": "m", "created": 1767225600.0, "response": {...}}

A stored value that is not such an object (half-written, truncated, garbage, another
``version``, another ``key``) is a miss, logged at debug; the next :meth:`put` of the key
overwrites it.  A failing store (a full disk, a missing bucket, no credentials) is a miss or an
ignored put, with one warning per store and process: an LM call is never failed by its cache.

    >>> store = MemoryStore()
    >>> store.put("k" * 64, {"choices": [{"message": {"content": "hi"}}], "model": "m"})
    >>> store.get("k" * 64)["choices"][0]["message"]["content"], store.get("x" * 64)
    ('hi', None)
    >>> store.stats().hits, store.stats().misses, store.stats().puts
    (1, 1, 1)
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

ENTRY_VERSION = 1
REOPEN_AFTER_S = 30.0  # a store that could not be opened is tried again after this long, not on every call


@dataclass
class CacheStats:
    """A store's counters in this process."""

    hits: int = 0
    misses: int = 0  # corrupt entries and failed reads included
    puts: int = 0
    corrupt: int = 0  # entries found unreadable (each also a miss)
    errors: int = 0  # reads and writes the store failed (the call went on without the cache)
    refused: int = 0  # puts of what is not a successful answer (an error body, not JSON)
    memory_hits: int = 0  # hits served by the in-process LRU (each also a hit)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@runtime_checkable
class CacheStore(Protocol):
    """The interface an LM client uses: look up, store, count, close."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict, *, model: str | None = None) -> None: ...

    def stats(self) -> CacheStats: ...

    def close(self) -> None: ...


class StoreUnavailable(OSError):
    """The store could not be opened a moment ago; it is not tried again before ``REOPEN_AFTER_S``."""


class CorruptEntry(ValueError):
    """A stored entry that cannot be used (the message says why)."""


def encode_entry(key: str, response: dict, model: str | None = None) -> bytes:
    """The stored bytes of one entry; ``model`` defaults to the response's own ``model`` field."""
    entry = {"version": ENTRY_VERSION, "key": key, "model": model if model is not None else response.get("model"),
             "created": time.time(), "response": response}
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode_entry(key: str, data: Any) -> dict:
    """The response stored in ``data``; CorruptEntry when it is not a whole entry of this version for ``key``."""
    if not isinstance(data, (bytes, bytearray, str)):
        raise CorruptEntry(f"a {type(data).__name__}, not bytes")
    try:
        entry = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: half-written or garbage
        raise CorruptEntry(f"not JSON ({e})") from None
    if not isinstance(entry, dict):
        raise CorruptEntry("not a JSON object")
    if entry.get("version") != ENTRY_VERSION:
        raise CorruptEntry(f"version {entry.get('version')!r}, not {ENTRY_VERSION}")
    if entry.get("key") != key:
        raise CorruptEntry("stored under another key")
    response = entry.get("response")
    if not isinstance(response, dict):
        raise CorruptEntry("no response object")
    return response


def redacted(location: str) -> str:
    """``location`` without the credentials a URI may carry: ``s3://KEY:SECRET@bucket/p`` -> ``s3://***@bucket/p``."""
    scheme, sep, rest = location.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return location
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


class MemoryLRU:
    """The last ``capacity`` entries' bytes in this process, least recently used out first; thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class GuardedStore:
    """A store whose failures are misses: subclasses implement ``_open``, ``_read`` and ``_write``.

    ``_open()`` returns the store's handle (a connection, a filesystem), called on first use and
    again ``REOPEN_AFTER_S`` after a failure (an unreachable bucket must not cost every call a
    timeout).  ``_read(handle, key)`` returns the stored bytes or None.  Any of them may raise
    anything (a store's client library has its own exceptions: botocore's, gcsfs's, sqlite3's),
    which is caught here.  ``memory_entries`` > 0 puts an in-process LRU of that many entries in front.
    """

    # Whether a read may wait on the network (an async caller then reads off its event loop).
    slow_reads = False

    def __init__(self, location: str, memory_entries: int = 0):
        self.location = location
        self.shown = redacted(location)  # for logs: a URI may carry an access key
        self._counts = CacheStats()
        self._lock = threading.Lock()
        self._warned = False
        self._memory = MemoryLRU(memory_entries) if memory_entries > 0 else None
        self._handle = None
        self._open_lock = threading.Lock()
        self._retry_at = 0.0
        self._pending: dict[str, tuple[dict, str | None]] = {}  # handed to the writer thread, not yet written

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shown!r})"

    def get(self, key: str) -> dict | None:
        """The response stored under ``key`` (a fresh dict, the caller may change it), None on a miss."""
        pending = self._pending.get(key) if self._pending else None
        if pending is not None:  # put_later's entry, not written yet: it is an answer all the same
            self._count(hits=1, memory_hits=1)
            return copy.deepcopy(pending[0])
        data = self._memory.get(key) if self._memory is not None else None
        from_memory = data is not None
        if data is None:
            try:
                data = self._read(self._opened(), key)
            except Exception as e:  # noqa: BLE001 - any store failure is a miss, never the LM call's failure
                self._failed("read", e)
                self._count(misses=1)
                return None
        if data is None:
            self._count(misses=1)
            return None
        try:
            response = decode_entry(key, data)
        except CorruptEntry as e:
            logger.debug("LM cache entry %s at %s is unusable (%s): a miss", key, self.shown, e)
            self._count(misses=1, corrupt=1)
            return None
        if self._memory is not None and not from_memory:
            self._memory.put(key, bytes(data))
        self._count(hits=1, memory_hits=int(from_memory))
        return response

    def put(self, key: str, value: dict, *, model: str | None = None) -> None:
        """Store a finished, successful response under ``key`` (an existing entry is replaced).

        Callers put only answers they used: never an error, a timeout or a refusal, which would
        then be served to every later call.  A body with a top-level ``"error"`` is refused here.
        """
        if not isinstance(value, dict) or value.get("error"):
            self._count(refused=1)
            logger.debug("LM cache: refused to store a %s under %s", type(value).__name__, key)
            return
        try:
            data = encode_entry(key, value, model)
        except (TypeError, ValueError) as e:
            self._count(refused=1)
            logger.debug("LM cache: response for %s is not JSON (%s): not stored", key, e)
            return
        try:
            self._write(self._opened(), key, data)
        except Exception as e:  # noqa: BLE001 - a failed put is an ignored put
            self._failed("write", e)
            return
        if self._memory is not None:
            self._memory.put(key, data)
        self._count(puts=1)

    def put_later(self, key: str, value: dict, *, model: str | None = None) -> None:
        """:meth:`put` done by the process's cache writer thread (:mod:`.writer`): the caller does not wait.

        Until it is written, :meth:`get` answers ``key`` from memory.  ``value`` must not change afterwards.
        """
        from dspy_ray.client.cache.writer import submit

        self._pending[key] = (value, model)
        submit(self, key)

    def write_pending(self, keys: list[str]) -> None:
        """Write the entries :meth:`put_later` left under ``keys``, together (the writer thread calls it)."""
        entries, items = [], []
        for key in dict.fromkeys(keys):
            pending = self._pending.get(key)
            if pending is None:
                continue
            value, model = pending
            if not isinstance(value, dict) or value.get("error"):
                self._count(refused=1)
                self._pending.pop(key, None)
                continue
            try:
                entries.append((key, encode_entry(key, value, model)))
                items.append((key, pending))
            except (TypeError, ValueError) as e:
                self._count(refused=1)
                self._pending.pop(key, None)
                logger.debug("LM cache: response for %s is not JSON (%s): not stored", key, e)
        try:
            if entries:
                self._write_many(self._opened(), entries)
        except Exception as e:  # noqa: BLE001 - a failed put is an ignored put
            self._failed("write", e)
        else:
            if self._memory is not None:
                for key, data in entries:
                    self._memory.put(key, data)
            self._count(puts=len(entries))
        for key, pending in items:
            if self._pending.get(key) is pending:
                del self._pending[key]

    def stats(self) -> CacheStats:
        """A copy of this process's counters."""
        with self._lock:
            return CacheStats(**asdict(self._counts))

    def close(self) -> None:
        """Let go of the handle (a later call opens it again)."""
        with self._open_lock:
            handle, self._handle, self._retry_at = self._handle, None, 0.0
        if handle is None:
            return
        try:
            self._close(handle)
        except Exception as e:  # noqa: BLE001 - closing a broken store is not worth an error
            logger.debug("LM cache at %s: close failed: %s", self.shown, e)

    def _opened(self):
        handle = self._handle
        if handle is not None:
            return handle
        with self._open_lock:
            if self._handle is None:
                if time.monotonic() < self._retry_at:
                    raise StoreUnavailable(f"{self.shown} could not be opened; trying again later")
                try:
                    self._handle = self._open()
                except Exception:
                    self._retry_at = time.monotonic() + REOPEN_AFTER_S
                    raise
            return self._handle

    # -- for subclasses -----------------------------------------------------------------

    def _open(self) -> Any:
        return self

    def _read(self, handle: Any, key: str) -> bytes | None:
        raise NotImplementedError

    def _write(self, handle: Any, key: str, data: bytes) -> None:
        raise NotImplementedError

    def _write_many(self, handle: Any, entries: list[tuple[str, bytes]]) -> None:
        """Several writes at once (a store with transactions makes them one)."""
        for key, data in entries:
            self._write(handle, key, data)

    def _close(self, handle: Any) -> None:
        pass

    # -- bookkeeping ---------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._counts, name, getattr(self._counts, name) + delta)

    def _failed(self, what: str, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}".replace(self.location, self.shown)
        with self._lock:
            self._counts.errors += 1
            first, self._warned = not self._warned, True
        if first:
            logger.warning("LM cache at %s failed to %s (%s); LM calls go on without it "
                           "(further failures are logged at debug)", self.shown, what, error)
        else:
            logger.debug("LM cache at %s failed to %s: %s", self.shown, what, error)


class MemoryStore(GuardedStore):
    """Entries in this process only (tests, a notebook): the same format and rules as the shared stores."""

    def __init__(self) -> None:
        super().__init__("memory")
        self._data: dict[str, bytes] = {}

    def _read(self, handle: Any, key: str) -> bytes | None:
        return self._data.get(key)

    def _write(self, handle: Any, key: str, data: bytes) -> None:
        self._data[key] = data
