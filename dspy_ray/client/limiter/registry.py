"""One limiter per endpoint per process; who decides and reports for them, and when.

Every caller of an endpoint in a process (both stages of a task in one actor, the judge, the
embedding client) gets the same :class:`~.slots.EndpointLimiter` from :func:`endpoint_limiter`.

* Limiters that share the job's coordinator (with Ray) are reported together, in one call to it
  (:mod:`.coordinator`), at most every ``SYNC_INTERVAL_S``, by :func:`sync`: the threads that make
  the calls run it when they give a slot back or while they wait for one, and a stage actor's
  event loop runs it on its ticks.  No background thread ever makes a Ray call: a thread that
  outlives the worker's last task would call into a Ray worker being torn down, and crash it.
* Limiters that decide alone (no Ray) are decided by one daemon thread every ``SYNC_INTERVAL_S``;
  it touches no Ray, and is stopped and joined at interpreter exit (:func:`stop_ticker`).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

from dspy_ray.client.limiter.coordinator import (
    attach,
    forget_at_service,
    ray_initialized,
    report_all,
)
from dspy_ray.client.limiter.slots import EndpointLimiter, endpoint_key

logger = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.1  # how often a process reports to its coordinator (and a local policy decides)

_registry: dict[str, EndpointLimiter] = {}
_registry_lock = threading.Lock()
_ticker: threading.Thread | None = None
_stop = threading.Event()
_sync_lock = threading.Lock()  # one caller reports at a time; the others go on at once
_next_sync = 0.0


def endpoint_limiter(settings: Any, *, coordinate: bool | None = None) -> EndpointLimiter:
    """This process's limiter for ``settings``' endpoint (``base_url`` + ``model``), made on first use.

    ``settings`` is an :class:`dspy_ray.endpoints.settings.EndpointSettings` (or anything with ``base_url``,
    ``model``, ``max_in_flight`` and ``adaptive``).  ``coordinate``: share the limit through a
    Ray actor (default: when Ray is initialized in this process).
    """
    key = endpoint_key(settings.base_url, settings.model)
    ceiling = int(settings.max_in_flight)
    adaptive = bool(getattr(settings, "adaptive", True))
    with _registry_lock:
        limiter = _registry.get(key)
        if limiter is None:
            limiter = EndpointLimiter(key, ceiling, adaptive=adaptive)
            if coordinate is None:
                coordinate = ray_initialized()
            if coordinate:
                limiter.coordinated = True
                limiter.pump = sync
                attach(limiter)
            else:
                _start_ticker()
            _registry[key] = limiter
        elif ceiling < limiter.ceiling:  # two callers disagree: the lower ceiling holds
            limiter.ceiling = ceiling
            limiter.set_share(min(limiter.share, ceiling))
            if limiter.policy is not None:
                limiter.policy.ceiling = ceiling
                limiter.policy.limit = min(limiter.policy.limit, ceiling)
    return limiter


def limiters() -> list[EndpointLimiter]:
    with _registry_lock:
        return list(_registry.values())


def forget_endpoints() -> list[str]:
    """Forget every endpoint's learned limit in this process and at the job's coordinator; the keys forgotten.

    For a process that goes on with other endpoints at the same address (a notebook restarting its
    server; tests, whose fake endpoints reuse ports): the next call finds the capacity afresh.  Calls
    holding a slot of a forgotten limiter finish on it.
    """
    with _registry_lock:
        forgotten = list(_registry.values())
        _registry.clear()
    for limiter in forgotten:
        limiter.coordinated = False  # no more reports for it (a call still on it may run its pump)
    forget_at_service([limiter.key for limiter in forgotten if limiter.coordinator is not None])
    return [limiter.key for limiter in forgotten]


def sync(now: float | None = None, urgent: bool = False) -> None:
    """Report this process's coordinated limiters to the job's coordinator, when one is due.

    Cheap when none is due (one clock read); never blocks on the answer (:func:`.coordinator.report_all`).
    Run by callers of the endpoints (:class:`~.slots.EndpointLimiter` calls it as its ``pump``) and by a
    stage actor's event loop: threads that are working for a task, so never after the worker's last one.
    ``urgent``: a limiter just went idle, report now (this is the process's last chance to give its share back).
    """
    global _next_sync
    now = time.monotonic() if now is None else now
    if (now < _next_sync and not urgent) or _stop.is_set():
        return
    locked = _sync_lock.acquire(timeout=1.0) if urgent else _sync_lock.acquire(blocking=False)
    if not locked:  # another thread is reporting (an urgent one waits for it: its state may predate ours)
        return
    try:
        if now < _next_sync and not urgent:
            return
        _next_sync = now + SYNC_INTERVAL_S
        coordinated = [limiter for limiter in limiters() if limiter.coordinated]
        if coordinated:
            report_all(coordinated, now, urgent)
            if any(not limiter.coordinated for limiter in coordinated):  # Ray was shut down: decide alone
                _start_ticker()
    except Exception:  # noqa: BLE001 - a report never fails a call
        logger.exception("endpoint limits: report failed")
    finally:
        _sync_lock.release()


def _tick_local(now: float) -> None:
    """One round of the limiters that decide alone (no coordinator: no Ray call here)."""
    for limiter in limiters():
        if not limiter.coordinated:
            limiter.tick(now)


def _start_ticker() -> None:
    global _ticker
    if _ticker is not None and _ticker.is_alive():
        return
    _stop.clear()
    _ticker = threading.Thread(target=_tick_forever, name="endpoint-limiter", daemon=True)
    _ticker.start()


def stop_ticker(timeout: float = 5.0) -> None:
    """Stop the local ticker and wait for it (run at interpreter exit, before Ray's own shutdown hook)."""
    _stop.set()
    ticker = _ticker
    if ticker is not None and ticker is not threading.current_thread():
        ticker.join(timeout)


def _tick_forever() -> None:
    pid = os.getpid()
    while not _stop.wait(SYNC_INTERVAL_S):
        if os.getpid() != pid:  # a forked child does not decide for its parent
            return
        try:
            _tick_local(time.monotonic())
        except Exception:  # noqa: BLE001 - never let the ticker die
            logger.exception("endpoint limits: tick failed")


atexit.register(stop_ticker)
