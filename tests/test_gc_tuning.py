"""A stage actor freezes its setup heap and collects the young generation less often; a driver is left alone."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.util import gc_tuning
from stages.base import DSPyStageUDF
from tasks import get_task


def test_a_stage_actor_settles_its_heap(ray_local):
    ray = ray_local
    stage = get_task("triage").stages[0]

    @ray.remote(num_cpus=0)
    class StageHost:
        def __init__(self, kwargs: dict):
            self.udf = DSPyStageUDF(**kwargs)

        def heap(self) -> tuple[int, int]:
            return gc.get_freeze_count(), gc.get_threshold()[0]

    host = StageHost.remote(stage.udf_kwargs(EndpointSettings(base_url="http://127.0.0.1:9/v1", model="m")))
    frozen, young = ray.get(host.heap.remote(), timeout=120)
    ray.kill(host)
    assert frozen > 10_000  # Ray, DSPy and the program: all of it out of later collections
    assert young == gc_tuning.YOUNG_THRESHOLD


def test_a_stage_built_in_the_driver_leaves_its_collector_alone(ray_local):
    before = gc.get_threshold(), gc.get_freeze_count()
    DSPyStageUDF(**get_task("triage").stages[0].udf_kwargs(EndpointSettings(base_url="http://127.0.0.1:9/v1",
                                                                            model="m")))
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_settle_heap_once_and_switched_off_by_the_environment():
    code = textwrap.dedent("""
        import gc, os, sys
        from dspy_ray.util.gc_tuning import YOUNG_THRESHOLD, settle_heap
        if sys.argv[1] == "off":
            os.environ["DSPY_RAY_GC_TUNING"] = "0"
            print(settle_heap(force=True), gc.get_freeze_count(), gc.get_threshold()[0] == YOUNG_THRESHOLD)
        else:
            first = settle_heap(force=True); frozen = gc.get_freeze_count()
            again = settle_heap(force=True)
            print(first, again, frozen > 0, gc.get_freeze_count() == frozen, gc.get_threshold()[0] == YOUNG_THRESHOLD)
    """)
    on = subprocess.run([sys.executable, "-c", code, "on"], capture_output=True, text=True, timeout=60)
    assert on.stdout.split() == ["True", "True", "True", "True", "True"], on.stderr[-2000:]
    off = subprocess.run([sys.executable, "-c", code, "off"], capture_output=True, text=True, timeout=60)
    assert off.stdout.split() == ["False", "0", "False"], off.stderr[-2000:]
