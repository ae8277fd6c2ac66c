"""init_ray: how every entry point joins Ray, seen from another job on the same cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A job that joins the cluster through init_ray and leaves a detached actor of an importable class behind,
# as Ray Data does with its actor-location tracker and Serve with its controller.
CHILD = textwrap.dedent("""
    import sys
    import ray
    from ray.data._internal.execution.node_trackers.actor_location import ActorLocationTracker
    from dspy_ray.util.ray_runtime import init_ray

    @ray.remote
    def user_module_value():
        import my_task_module  # in a folder on this driver's PYTHONPATH only

        return my_task_module.VALUE

    init_ray(log_to_driver=False)
    name = sys.argv[1]
    actor = ActorLocationTracker.options(name=name, namespace=name, lifetime="detached").remote()
    ray.get(actor.update_actor_location.remote("a", "node-1"))
    print(ray.get(user_module_value.remote()))
""")


def test_a_later_job_can_use_a_detached_actor_an_init_ray_job_left(ray_local, tmp_path):
    """A job with a code_search_path does not publish its importable classes; this session's job (a plain
    ray.init, as under ray job submit) could then not get a handle to the actor ("Expected str or bytes")."""
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    name = f"probe-{uuid.uuid4().hex[:8]}"
    (tasks / "my_task_module.py").write_text(f"VALUE = {name!r}\n")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(tasks), str(ROOT)])}
    env.pop("RAY_JOB_ID", None)
    done = subprocess.run([sys.executable, "-c", CHILD, name], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == name  # the job's workers import the driver's own modules

    actor = ray_local.get_actor(name, namespace=name)
    try:
        assert ray_local.get(actor.get_actor_locations.remote(["a", "b"])) == {"a": "node-1", "b": None}
    finally:
        ray_local.kill(actor)
