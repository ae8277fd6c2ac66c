"""Run a program server locally: ``python -m serve --program triage [--artifact PATH|latest]``.

Without ``SERVE_API_TOKEN`` the server listens on 127.0.0.1 only; binding
another address needs a token, or ``--insecure-public`` to say you mean it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from serve.app import TOKEN_ENV, ServeOptions, build_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", default="triage", help="program name (default: triage)")
    parser.add_argument("--artifact", default=None, help="optimized program JSON, 'latest' or 'best'")
    parser.add_argument("--artifact-dir", default="artifacts", help="artifact registry folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--insecure-public", action="store_true", help="allow a non-local host without a token")
    parser.add_argument("--lm-base-url", default=None, help="target LM endpoint (env LM_BASE_URL)")
    parser.add_argument("--lm-model", default=None, help="target model id (env LM_MODEL)")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--target-ongoing-requests", type=float, default=32)
    drift = parser.add_argument_group("drift monitor (on when a judge endpoint is set)")
    drift.add_argument("--judge-base-url", default=None, help="judge LM endpoint (env JUDGE_BASE_URL)")
    drift.add_argument("--judge-model", default=None, help="judge model id (env JUDGE_MODEL)")
    drift.add_argument("--drift-sample-rate", type=float, default=0.02, help="share of requests judged (0.02)")
    drift.add_argument("--drift-window-days", type=float, default=7.0, help="rolling window (7 days)")
    drift.add_argument("--drift-drop-points", type=float, default=5.0,
                       help="re-optimize when the rolling score is this many points below the dev score (5)")
    drift.add_argument("--drift-min-samples", type=int, default=50, help="samples needed before deciding (50)")
    drift.add_argument("--auto-deploy", action=argparse.BooleanOptionalAction, default=True,
                       help="deploy a better re-optimized artifact (--no-auto-deploy: only register it)")
    args = parser.parse_args(argv)

    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(TOKEN_ENV) and not args.insecure_public:
        print(f"error: refusing to listen on {args.host} without {TOKEN_ENV}; set a token or pass --insecure-public",
              file=sys.stderr)
        return 2
    lm = {k: v for k, v in {"base_url": args.lm_base_url, "model": args.lm_model}.items() if v}
    options = ServeOptions(program=args.program, artifact=args.artifact, artifact_dir=args.artifact_dir, lm=lm,
                           min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                           target_ongoing_requests=args.target_ongoing_requests,
                           drift_sample_rate=args.drift_sample_rate,
                           judge={k: v for k, v in {"base_url": args.judge_base_url,
                                                    "model": args.judge_model}.items() if v},
                           drift_policy={"window_s": args.drift_window_days * 86400,
                                         "drop_points": args.drift_drop_points,
                                         "min_samples": args.drift_min_samples, "auto_deploy": args.auto_deploy})

    import ray
    from ray import serve

    from stages.config import dotenv_runtime_env

    ray.init(runtime_env=dotenv_runtime_env() or None)
    embedded = None
    if not (lm.get("base_url") or os.environ.get("LM_BASE_URL")):
        from stages.embedded import EmbeddedLM

        print("no LM endpoint configured (LM_BASE_URL): starting the embedded llama.cpp model", file=sys.stderr)
        embedded = EmbeddedLM.start()
        options.lm.update(embedded.settings().model_dump(
            include={"base_url", "model", "max_in_flight", "timeout_s", "max_tokens"}))
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(options), name=args.program, route_prefix="/")
    print(f"serving {args.program} at http://{args.host}:{args.port}/{args.program}/predict (docs: /docs)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        if embedded:
            embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
