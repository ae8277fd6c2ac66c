"""One limiter per endpoint per process, and the ticker thread that runs them all.

Every caller of an endpoint in a process (both stages of a task in one actor, the judge, the
embedding client) gets the same :class:`~.slots.EndpointLimiter` from :func:`endpoint_limiter`.
Every ``SYNC_INTERVAL_S`` one daemon thread decides for the limiters that run their own policy
and reports the others, together, in one call to the job's coordinator (:mod:`.coordinator`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from dspy_ray.client.limiter.coordinator import (
    attach,
    ray_initialized,
    report_all,
    retry_due,
)
from dspy_ray.client.limiter.slots import EndpointLimiter, endpoint_key

logger = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.1  # how often a process reports to its coordinator (and a local policy decides)

_registry: dict[str, EndpointLimiter] = {}
_registry_lock = threading.Lock()
_ticker: threading.Thread | None = None


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
                attach(limiter)
            _registry[key] = limiter
            _start_ticker()
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


def _tick_all(now: float) -> None:
    """One round: local limiters decide; coordinated ones report together in one call to the service."""
    coordinated = []
    for limiter in limiters():
        if limiter.coordinated and (limiter.coordinator is not None or retry_due(now)):
            coordinated.append(limiter)
        else:
            limiter.tick(now)
    if coordinated:
        report_all(coordinated, now)


def _start_ticker() -> None:
    global _ticker
    if _ticker is not None and _ticker.is_alive():
        return
    _ticker = threading.Thread(target=_tick_forever, name="endpoint-limiter", daemon=True)
    _ticker.start()


def _tick_forever() -> None:
    pid = os.getpid()
    while True:
        time.sleep(SYNC_INTERVAL_S)
        if os.getpid() != pid:  # a forked child does not report for its parent
            return
        try:
            _tick_all(time.monotonic())
        except SystemExit:  # Ray raises it in threads while the process shuts down
            return
        except Exception:  # noqa: BLE001 - never let the reporter die
            logger.exception("endpoint limits: tick failed")
