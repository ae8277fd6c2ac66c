"""A shared, content-addressed cache of LM answers: a re-run or an optimizer trial never pays twice for one call.

Every process of a job, and every later job, that opens the same store shares its entries.
An LM client uses it in three steps::

    store = open_cache()                      # from LM_CACHE; None when caching is off
    key = lookup_key(request)                 # None: a sampled call, or a value with no stable JSON form
    response = store.get(key) if store and key else None
    if response is None:
        response = send(request)              # raises on errors: only answers get past here
        if store and key:
            store.put(key, response, model=request["model"])

``request`` is the dict the call is made of (model, base_url, messages, response_format and
every sampling setting; the API key may be in it, it is never part of the key).  A store never
raises: an unreachable store, a corrupt entry, a full disk are misses and ignored puts.

The package, bottom up (each module imports only those above it):

* :mod:`.key` - :func:`cache_key`, :func:`cacheable`, :func:`lookup_key`, and :func:`sent_key` (the key of
  a body as a client sends it: what :class:`~dspy_ray.client.lm.ResilientLM` uses): pure, no I/O;
* :mod:`.writer` - the process's cache writer thread: a miss's answer is stored after the caller has it
  (:meth:`GuardedStore.put_later`, batched, :func:`flush_writes` at exit);
* :mod:`.store` - the entry format, :class:`CacheStats`, the :class:`CacheStore` interface and the
  :class:`GuardedStore` base that turns every failure into a miss (:class:`MemoryStore` for tests);
* :mod:`.local` - :class:`LocalStore`, the default: a size-bounded diskcache (SQLite) folder;
* :mod:`.remote` - :class:`RemoteStore`: one JSON object per entry in object storage or a shared folder;
* :mod:`.config` - :func:`open_cache`: ``LM_CACHE`` / ``LM_CACHE_SIZE_MB`` to a store, one per process;
* :mod:`.flags` - ``--no-cache`` (batch, optimize) / ``--cache`` (serve), declared once, and
  :func:`~.flags.cache_choice` that turns the choice into ``settings.cache``.

:class:`dspy_ray.client.lm.ResilientLM` is the client that uses it (``settings.cache`` names the
store; see ``docs/cache.md``).

``benchmarks/lm_cache.py`` measures the two stores side by side.
"""

from dspy_ray.client.cache.config import close_caches, default_directory, open_cache, size_limit_bytes
from dspy_ray.client.cache.key import cache_key, cacheable, endpoint_identity, lookup_key, sent_key
from dspy_ray.client.cache.local import DEFAULT_SIZE_LIMIT, LocalStore
from dspy_ray.client.cache.remote import RemoteStore
from dspy_ray.client.cache.store import (
    ENTRY_VERSION,
    REOPEN_AFTER_S,
    CacheStats,
    CacheStore,
    CorruptEntry,
    GuardedStore,
    MemoryStore,
    StoreUnavailable,
    decode_entry,
    encode_entry,
)
from dspy_ray.client.cache.writer import flush_writes

__all__ = [
    "DEFAULT_SIZE_LIMIT",
    "ENTRY_VERSION",
    "REOPEN_AFTER_S",
    "CacheStats",
    "CacheStore",
    "CorruptEntry",
    "GuardedStore",
    "LocalStore",
    "MemoryStore",
    "RemoteStore",
    "StoreUnavailable",
    "cache_key",
    "cacheable",
    "close_caches",
    "decode_entry",
    "default_directory",
    "encode_entry",
    "endpoint_identity",
    "flush_writes",
    "lookup_key",
    "open_cache",
    "sent_key",
    "size_limit_bytes",
]
