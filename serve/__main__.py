"""Serve a task's program over HTTP on a local Ray: python -m serve --task TASK [--artifact PATH|best|latest].

Endpoints resolve as in batch and optimize: flags > environment > .env >
cluster discovery > the embedded model (said on stderr and in /<task>/info).
Set SERVE_API_TOKEN (environment or .env) to require the header
"Authorization: Bearer <token>" on every route but /healthz; without a token
the server listens on 127.0.0.1 only (binding another address needs a token,
or --insecure-public to say you mean it).  --cache answers repeated identical LM
calls from the LM cache (LM_CACHE; off by default when serving) and marks each
response X-Cache: hit or miss.  Stops cleanly on SIGINT (Ctrl-C)
or SIGTERM.  Exit codes: 0 stopped, 2 bad settings (one line on stderr).
--program is the older spelling of --task.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from dspy_ray.client.cache.flags import add_cache_arg
from dspy_ray.endpoints.settings import read_dotenv, resolve_settings
from dspy_ray.util.cli import (EXIT_OK, EXIT_USAGE, HelpFormatter, add_endpoint_args, add_task_arg, endpoint_flags,
                               parse_with_task, positive_float, positive_int, report_error, say)
from serve.app import TOKEN_ENV, ServeOptions, build_app
from tasks import get_task, task_names

_OPTION = ServeOptions.model_fields
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TASK_ALIASES = ("--program",)  # the older spelling, still accepted
_SCALING = {"min_replicas": int, "max_replicas": positive_int, "target_ongoing_requests": positive_float,
            "max_ongoing_requests": positive_int, "max_queued_requests": positive_int}  # min: 0 scales to zero


def build_parser(task=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    add_task_arg(p, aliases=TASK_ALIASES, names=task_names(),
                 help=f"task whose program is served: {', '.join(task_names())}, or 'package.module[:ATTR]'")
    p.add_argument("--artifact", default=None, help="optimized program JSON (path or URI), 'latest' or 'best'")
    p.add_argument("--artifact-dir", default="artifacts", help="artifact registry for 'latest'/'best'")
    p.add_argument("--no-default-artifact", action="store_true",
                   help="on the embedded model, serve the program as written instead of the task's artifact tuned "
                        "for it")
    if task is not None:
        task.add_resource_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    p.add_argument("--insecure-public", action="store_true", help=f"allow a non-local --host without {TOKEN_ENV}")
    add_endpoint_args(p, "LM")
    add_cache_arg(p, default=False)
    scaling = p.add_argument_group("replicas (Ray Serve autoscaling on queue depth)")
    for name, kind in _SCALING.items():
        info = _OPTION[name]
        scaling.add_argument(f"--{name.replace('_', '-')}", type=kind, default=info.default, help=info.description)
    if task is not None and task.needs_embedder:
        add_endpoint_args(p, "EMBED")
    drift = add_endpoint_args(p, "JUDGE", title="drift monitor (on when a judge endpoint is set: flags > "
                                                "environment > .env > cluster discovery)")
    drift.add_argument("--drift-sample-rate", type=float, default=_OPTION["drift_sample_rate"].default,
                       help="share of requests judged")
    drift.add_argument("--drift-window-days", type=positive_float, default=7.0, help="rolling window in days")
    drift.add_argument("--drift-drop-points", type=positive_float, default=5.0,
                       help="re-optimize when the rolling score is this many points below the dev score")
    drift.add_argument("--drift-min-samples", type=positive_int, default=50, help="samples needed before deciding")
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
    """Two passes: ``--task`` first, so the task's own flags (its resources) join the parser."""
    return parse_with_task(argv, build_parser, get_task, aliases=TASK_ALIASES)


def main(argv: list[str] | None = None) -> int:
    import os

    args, task = parse_args(argv)
    token = os.environ.get(TOKEN_ENV) or read_dotenv().get(TOKEN_ENV) or None
    if args.host not in _LOCAL_HOSTS and not token and not args.insecure_public:
        say(f"error: refusing to listen on {args.host} without {TOKEN_ENV}; set a token or pass --insecure-public")
        return EXIT_USAGE
    try:
        options = ServeOptions(
            program=args.task, artifact=args.artifact, artifact_dir=args.artifact_dir, cache=args.cache,
            resources=task.resource_settings(args),
            **{k: getattr(args, k) for k in (*_SCALING, "drift_sample_rate")},
            drift_policy={"window_s": args.drift_window_days * 86400, "drop_points": args.drift_drop_points,
                          "min_samples": args.drift_min_samples, "auto_deploy": args.auto_deploy})
        lm = resolve_settings("LM", flags=endpoint_flags(args, "LM"))
        judge = resolve_settings("JUDGE", flags=endpoint_flags(args, "JUDGE"))
        embed = resolve_settings("EMBED", flags=endpoint_flags(args, "EMBED")) if task.needs_embedder else None
    except Exception as exc:  # noqa: BLE001 - report_error re-raises what declares no exit code: a bug, in full
        return report_error(exc)
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
                say(f"serving {name} with the embedded model ({endpoints.lm.model}); set LM_BASE_URL for a real one")
                if embedded_default:
                    say(f"{name}: the embedded model serves the artifact tuned for it, {embedded_default}")
                    options = options.model_copy(update={"artifact": embedded_default})
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(options, endpoints.lm, endpoints.judge, token, endpoints.embed), name=name,
                      route_prefix="/")
            print(f"serving {name} at http://{host}:{port}/{name}/predict (docs: /docs); Ctrl-C or SIGTERM stops it",
                  flush=True)
            stop.wait()
            say("stopping")
            serve.shutdown()
    finally:
        ray.shutdown()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
