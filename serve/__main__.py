"""Serve a task's program over HTTP on a local Ray: python -m serve --program TASK [--artifact PATH|best|latest].

Endpoints resolve as in batch and optimize: flags > environment > .env >
cluster discovery > the embedded model (said on stderr and in /<task>/info).
Set SERVE_API_TOKEN (environment or .env) to require the header
"Authorization: Bearer <token>" on every route but /healthz; without a token
the server listens on 127.0.0.1 only (binding another address needs a token,
or --insecure-public to say you mean it).  Stops cleanly on SIGINT (Ctrl-C)
or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from dspy_ray.util.cli import HelpFormatter, add_embed_args, embed_flags
from dspy_ray.endpoints.settings import read_dotenv, resolve_settings
from serve.app import TOKEN_ENV, ServeOptions, build_app
from tasks import TaskError, get_task, task_names

_OPTION = ServeOptions.model_fields
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_parser(task=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--program", required=True, metavar="TASK",
                   help=f"task whose program is served: {', '.join(task_names())}, or 'package.module[:ATTR]'")
    p.add_argument("--artifact", default=None, help="optimized program JSON (path or URI), 'latest' or 'best'")
    p.add_argument("--artifact-dir", default="artifacts", help="artifact registry for 'latest'/'best'")
    p.add_argument("--no-default-artifact", action="store_true",
                   help="on the embedded model, serve the program as written instead of the task's artifact tuned "
                        "for it")
    if task is not None:
        task.add_resource_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--insecure-public", action="store_true", help=f"allow a non-local --host without {TOKEN_ENV}")
    p.add_argument("--lm-base-url", default=None, help="target LM endpoint (env LM_BASE_URL)")
    p.add_argument("--lm-model", default=None, help="target model id (env LM_MODEL)")
    scaling = p.add_argument_group("replicas (Ray Serve autoscaling on queue depth)")
    for name in ("min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
                 "max_queued_requests"):
        info = _OPTION[name]
        kind = float if name == "target_ongoing_requests" else int
        scaling.add_argument(f"--{name.replace('_', '-')}", type=kind, default=info.default, help=info.description)
    if task is not None and task.needs_embedder:
        add_embed_args(p)
    drift = p.add_argument_group("drift monitor (on when a judge endpoint is set)")
    drift.add_argument("--judge-base-url", default=None, help="judge LM endpoint (env JUDGE_BASE_URL)")
    drift.add_argument("--judge-model", default=None, help="judge model id (env JUDGE_MODEL)")
    drift.add_argument("--drift-sample-rate", type=float, default=_OPTION["drift_sample_rate"].default,
                       help="share of requests judged")
    drift.add_argument("--drift-window-days", type=float, default=7.0, help="rolling window in days")
    drift.add_argument("--drift-drop-points", type=float, default=5.0,
                       help="re-optimize when the rolling score is this many points below the dev score")
    drift.add_argument("--drift-min-samples", type=int, default=50, help="samples needed before deciding")
    drift.add_argument("--auto-deploy", action=argparse.BooleanOptionalAction, default=True,
                       help="deploy a better re-optimized artifact (--no-auto-deploy: only register it)")
    return p


def stop_event() -> threading.Event:
    """An event set by SIGINT or SIGTERM (also when the shell started us with SIGINT ignored)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def parse_args(argv: list[str] | None):
    """Two passes: ``--program`` first, so the task's own flags (its resources) join the parser."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--program")
    known, _ = pre.parse_known_args(argv)
    task = None
    if known.program:
        try:
            task = get_task(known.program)
        except TaskError as exc:
            build_parser().error(str(exc))
    return build_parser(task).parse_args(argv), task


def main(argv: list[str] | None = None) -> int:
    import os

    args, task = parse_args(argv)

    token = os.environ.get(TOKEN_ENV) or read_dotenv().get(TOKEN_ENV) or None
    if args.host not in _LOCAL_HOSTS and not token and not args.insecure_public:
        print(f"error: refusing to listen on {args.host} without {TOKEN_ENV}; set a token or pass --insecure-public",
              file=sys.stderr)
        return 2
    options = ServeOptions(
        program=args.program, artifact=args.artifact, artifact_dir=args.artifact_dir,
        resources=task.resource_settings(args),
        **{k: getattr(args, k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests",
                                         "max_ongoing_requests", "max_queued_requests", "drift_sample_rate")},
        drift_policy={"window_s": args.drift_window_days * 86400, "drop_points": args.drift_drop_points,
                      "min_samples": args.drift_min_samples, "auto_deploy": args.auto_deploy})
    lm = resolve_settings("LM", flags={"base_url": args.lm_base_url, "model": args.lm_model})
    judge = resolve_settings("JUDGE", flags={"base_url": args.judge_base_url, "model": args.judge_model})
    embed = resolve_settings("EMBED", flags=embed_flags(args)) if task.needs_embedder else None
    default = None if args.artifact or args.no_default_artifact else task.embedded_artifact(task.program.name)
    return run(task.name, options, lm, judge if judge.base_url else None, embed, token, args.host, args.port,
               default)


def run(name, options, lm, judge, embed, token, host, port, embedded_default=None) -> int:
    import ray
    from ray import serve

    from dspy_ray.endpoints.fallback import open_endpoints
    from dspy_ray.util.ray_runtime import init_ray

    init_ray()
    stop = stop_event()  # after ray.init, which installs a SIGTERM handler of its own that exits at once
    try:
        with open_endpoints(lm=lm, judge=judge, embed=embed) as endpoints:
            if endpoints.lm.origin == "embedded":
                print(f"serving {name} with the embedded model ({endpoints.lm.model}); set LM_BASE_URL for a real one",
                      file=sys.stderr)
                if embedded_default:
                    print(f"{name}: the embedded model serves the artifact tuned for it, {embedded_default}",
                          file=sys.stderr)
                    options = options.model_copy(update={"artifact": embedded_default})
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(options, endpoints.lm, endpoints.judge, token, endpoints.embed), name=name,
                      route_prefix="/")
            print(f"serving {name} at http://{host}:{port}/{name}/predict (docs: /docs); Ctrl-C or SIGTERM stops it",
                  flush=True)
            stop.wait()
            print("stopping", file=sys.stderr, flush=True)
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
