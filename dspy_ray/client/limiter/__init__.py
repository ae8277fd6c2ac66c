"""Adaptive concurrency per endpoint: how many requests to keep in flight, found at run time.

Nobody tells the framework how many requests an endpoint holds; too few leaves it idle, too
many gets 429s (a hosted API) or a queue (vLLM, llama.cpp).  The limit is found the way TCP
finds a path's capacity, with the signals an LM endpoint gives:

* it **grows** while calls succeed and latency stays flat: doubling each window at first
  (slow start), later quickly back to just under the last level that failed, then one
  probe above it now and then (1 s, 2 s, 4 s ... 32 s apart while probes keep failing; a
  probe counts as held once the requests in flight reached the level that failed);
* it is **cut** when the endpoint says it is full (more 429 / 503 answers than its
  background rate of them, in one window or added up over a second) or latency rises well
  above its floor (a queue is forming).
  The cut goes to what the endpoint actually served, by Little's law: calls answered per
  second x the latency floor.  A provider that throttles at random is told apart by
  cause and effect: when a cut leaves the share of 429s as it was, that share is
  background, and only 429s beyond it count from then on;
* it **never exceeds the ceiling**, ``max_in_flight`` (``LM_MAX_IN_FLIGHT``), counted over
  every process that calls the endpoint.

One limit per endpoint (base URL + model).  In one process every caller of that endpoint
(both stages of a task in one actor, the judge, the embedding client) shares one
:class:`EndpointLimiter`; with Ray, the processes of a job share ONE small named actor for
all the job's endpoints (:class:`LimitService`, holding one :class:`LimitCoordinator` per
endpoint).  Every process sends it one report for all its endpoints every 100 ms
(``SYNC_INTERVAL_S``); it merges their signals, runs each endpoint's limit and hands each
process its share (by demand, in whole slots that add up to the limit).  The hot path makes
no Ray call: a process takes and returns slots locally, reacts to a burst of 429s at once
(and holds that cut until the coordinator has decided with those 429s), and reports in the
background.  Without Ray (tests, a notebook) the same policy runs in the process.

Using it, from threads or from asyncio (the LM client and the embedding client do)::

    limiter = endpoint_limiter(settings)          # EndpointSettings: base_url, model, max_in_flight
    with limiter.slot():                          # blocks while the endpoint is full
        response = send(request)                  # an exception with .status 429/503 = "full"
    async with limiter.aslot():
        response = await asend(request)

Hold a slot for one HTTP attempt, never across a retry's sleep.  An exception leaving the
block is classified by :func:`is_overload`; a call that succeeded contributes its latency.

The package, bottom up (each module imports only those above it):

* :mod:`.policy` - :class:`Signals` and :class:`AimdPolicy`: the decisions, pure (no threads, clocks or Ray);
* :mod:`.slots` - :class:`EndpointLimiter`: a process's slots and waiters for one endpoint;
* :mod:`.coordinator` - the job's :class:`LimitService` actor and the calls a process makes to it;
* :mod:`.registry` - :func:`endpoint_limiter` (one limiter per endpoint per process) and the ticker thread.
"""

from dspy_ray.client.limiter.coordinator import (
    MEMBER_TIMEOUT_S,
    SERVICE_NAME,
    LimitCoordinator,
    LimitService,
    coordinator_state,
    ensure_coordinator,
)
from dspy_ray.client.limiter.policy import (
    OVERLOAD_STATUS,
    AimdPolicy,
    Signals,
    is_overload,
    overload_threshold,
)
from dspy_ray.client.limiter.registry import (
    SYNC_INTERVAL_S,
    endpoint_limiter,
    forget_endpoints,
    limiters,
)
from dspy_ray.client.limiter.slots import EndpointLimiter, endpoint_key

__all__ = [
    "MEMBER_TIMEOUT_S",
    "OVERLOAD_STATUS",
    "SERVICE_NAME",
    "SYNC_INTERVAL_S",
    "AimdPolicy",
    "EndpointLimiter",
    "LimitCoordinator",
    "LimitService",
    "Signals",
    "coordinator_state",
    "endpoint_key",
    "endpoint_limiter",
    "ensure_coordinator",
    "forget_endpoints",
    "is_overload",
    "limiters",
    "overload_threshold",
]
