"""The garbage collector of a long-lived worker: its setup heap frozen, the young generation collected less often.

A batch stage's actor holds Ray, DSPy, pyarrow and the program: about 170,000 container objects
that live as long as the process.  CPython's full collection walks every one of them (about
0.12 s each time here), and at thousands of rows a second it comes every few seconds: about a
quarter of a row's CPU went to it (``benchmarks/stage_profile.py``).  So once a worker is set up,
:func:`settle_heap` collects once and freezes what is left (``gc.freeze``: later collections
skip it), and raises the youngest generation's threshold, so fewer short-lived objects are
promoted to be walked again.  Ray Serve does the same for its replicas and proxy; this does it
for the batch stages' actors.

Only in a Ray worker process (an actor owns its process for its whole life) unless ``force``:
a driver or a test process that builds a stage in process keeps the interpreter's settings.
``DSPY_RAY_GC_TUNING=0`` turns it off.

    >>> settle_heap()          # in a driver: nothing changes
    False
"""

from __future__ import annotations

import gc
import os
import sys

YOUNG_THRESHOLD = 10_000  # allocations between collections of the youngest generation (CPython's default: 700)
ENV = "DSPY_RAY_GC_TUNING"

_settled = False


def settle_heap(*, force: bool = False) -> bool:
    """Freeze the heap built so far and collect the young generation less often, once per process.

    Call at the end of a worker's setup.  Returns whether it did (now or before).
    """
    global _settled
    if _settled:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not (force or _in_ray_worker()):
        return False
    gc.collect()
    gc.freeze()
    young, older, oldest = gc.get_threshold()
    gc.set_threshold(max(YOUNG_THRESHOLD, young), older, oldest)
    _settled = True
    return True


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE
