"""Which store an LM client uses: ``LM_CACHE`` and ``LM_CACHE_SIZE_MB``, one store per setting per process.

=====================================  ===============================================================
``LM_CACHE``                            store
=====================================  ===============================================================
unset, empty, ``on``, ``1``, ``true``   :class:`LocalStore` in ``$XDG_CACHE_HOME/dspy-ray/lm``
                                        (``~/.cache/dspy-ray/lm``)
``off``, ``0``, ``false``, ``none``     none: :func:`open_cache` returns None
a path (``/scratch/lm``, ``~/lm``)      :class:`LocalStore` in that folder
a URI (``s3://b/p``, ``gs://``,         :class:`RemoteStore`, one JSON object per entry
``file:///shared/lm``)
=====================================  ===============================================================

``LM_CACHE_SIZE_MB`` bounds a local store (default 1024); a remote one is bounded by the
bucket's lifecycle rules.

    >>> store = open_cache("off")
    >>> store is None
    True
    >>> open_cache("/tmp/lm") is open_cache("/tmp/lm/")     # every thread of an actor shares one  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from dspy_ray.client.cache.local import DEFAULT_SIZE_LIMIT, LocalStore
from dspy_ray.client.cache.remote import RemoteStore
from dspy_ray.client.cache.store import CacheStore
from dspy_ray.util.fs import is_uri

OFF = frozenset({"off", "0", "false", "no", "none", "disabled"})
ON = frozenset({"", "on", "1", "true", "yes"})

_stores: dict[tuple, CacheStore] = {}
_stores_pid = os.getpid()
_lock = threading.Lock()


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/dspy-ray/lm``, or ``~/.cache/dspy-ray/lm`` when it is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dspy-ray" / "lm"


def size_limit_bytes() -> int:
    """``LM_CACHE_SIZE_MB`` in bytes (1 GiB when unset); a value that is no positive number is a ValueError."""
    raw = os.environ.get("LM_CACHE_SIZE_MB", "").strip()
    if not raw:
        return DEFAULT_SIZE_LIMIT
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"LM_CACHE_SIZE_MB={raw!r} is not a number of megabytes") from None
    if not mb > 0:
        raise ValueError(f"LM_CACHE_SIZE_MB={raw!r} must be positive")
    return int(mb * 2**20)


def open_cache(setting: str | None = None) -> CacheStore | None:
    """The store ``setting`` (None or empty: ``$LM_CACHE``) names, None when caching is off.

    One store per setting per process: every thread of an actor shares it (after a fork the child
    opens its own).  Nothing is touched on disk or over the network here; a store that cannot be
    reached turns its first call into a miss and a warning.  ``LM_CACHE_SIZE_MB`` that is not a
    positive number raises ValueError: that is a mistake to fix, not to run on with.
    """
    if not (setting or "").strip():  # unset here: the process's LM_CACHE (settings built in code say "")
        setting = os.environ.get("LM_CACHE", "")
    setting = setting.strip()
    if setting.lower() in OFF:
        return None
    if setting.lower() in ON:
        ident: tuple = ("local", str(default_directory()), size_limit_bytes())
    elif is_uri(setting):
        ident = ("remote", setting.rstrip("/"))
    else:
        ident = ("local", os.path.abspath(os.path.expanduser(setting)), size_limit_bytes())
    global _stores_pid
    with _lock:
        if _stores_pid != os.getpid():  # a forked child: the parent's stores hold its locks and connections
            _stores.clear()
            _stores_pid = os.getpid()
        store = _stores.get(ident)
        if store is None:
            store = _stores[ident] = LocalStore(ident[1], ident[2]) if ident[0] == "local" else RemoteStore(ident[1])
        return store


def pinned_location(setting: str) -> str:
    """``setting`` as every process of a job must read it: a relative or ``~`` folder made absolute here.

    A Ray worker's working directory and home need not be the driver's, so the driver pins the folder
    before the setting travels; ``on``, ``off``, the default (empty) and URIs are returned as they are.

        >>> pinned_location("off"), pinned_location("s3://b/lm"), pinned_location("/scratch/lm")
        ('off', 's3://b/lm', '/scratch/lm')
    """
    text = setting.strip()
    if text.lower() in OFF or text.lower() in ON or is_uri(text):
        return setting
    return os.path.abspath(os.path.expanduser(text))


def close_caches() -> None:
    """Close and forget this process's stores (tests; a process about to exit need not call it)."""
    from dspy_ray.client.cache.writer import flush_writes

    flush_writes()  # what the writer thread still holds goes to the stores first
    with _lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()
