"""Serve the target, judge and embedder models with vLLM through Ray Serve LLM (OpenAI-compatible routes).

One YAML file (``serve/llm_models.yaml``, schema in :mod:`dspy_ray.endpoints.model_catalog`)
says which models run and how: model, tensor parallelism, GPU memory share,
context length, replicas and the queue depth the autoscaler aims for.  This
module turns it into ``ray.serve.llm.LLMConfig`` objects and one
``build_openai_app`` application::

    python -m serve.vllm_models --config serve/llm_models.yaml --dry-run   # print the resolved LLMConfigs
    python -m serve.vllm_models --config serve/llm_models.yaml             # deploy on the connected cluster
    # or declaratively, next to the program apps (a Serve config file replaces every app):
    python -m serve.vllm_models --config serve/llm_models.yaml --serve-config serve_config.yaml \\
        --http-host 0.0.0.0 > serve_config.cluster.yaml && serve deploy serve_config.cluster.yaml

    >>> models = load_models("serve/llm_models.yaml")            # doctest: +SKIP
    >>> [c.model_id for c in llm_configs(models)]                   # doctest: +SKIP
    ['Qwen/Qwen2.5-7B-Instruct', 'Qwen/Qwen2.5-72B-Instruct', 'intfloat/multilingual-e5-small']

What every model gets, whatever the YAML says about the rest:

* autoscaling set explicitly (``min_replicas``, ``max_replicas``,
  ``target_ongoing_requests``): Ray's LLM default target is 1e9 requests per
  replica, so a deployment left at the defaults never scales up;
* prefix caching on by default (DSPy sends the same instructions and demos on
  every call) and a named structured-outputs backend, so ``response_format``
  JSON schemas (DSPy's JSONAdapter) are enforced while decoding;
* ``accelerator_type`` (H100 by default), which schedules replicas onto the
  cluster's ``accelerator_type:H100`` nodes (``cluster.yaml``).

vLLM is needed only to build the app (GPU nodes, the ``[cluster]`` extra).
``ray.serve.llm`` cannot be imported without it, so loading, validating and
printing configs use the same pydantic ``LLMConfig`` from the module that
``ray.serve.llm`` re-exports it from; that works on CPU-only machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import copy
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from dspy_ray.endpoints.model_catalog import DEFAULT_CONFIG, LLMModels, LLMModelsError, load_models, resolve_path
from dspy_ray.util.cli import HelpFormatter, report_error

IMPORT_PATH = "serve.vllm_models:app_builder"


# -- LLMConfig and the app --------------------------------------------------------


def llm_config_class() -> type:
    """``ray.serve.llm.LLMConfig``; without vLLM, the pydantic model it subclasses unchanged."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:  # ray.serve.llm imports vLLM's protocol models; the config itself does not
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    return LLMConfig


def llm_configs(models: LLMModels) -> list[Any]:
    """One validated ``LLMConfig`` per model, in file order."""
    cls = llm_config_class()
    configs = []
    for spec in models.models:
        try:
            configs.append(cls(**spec.llm_config_kwargs()))
        except (ValidationError, ValueError) as exc:
            raise LLMModelsError(f"model {spec.model_id!r} ({spec.role}): LLMConfig rejected it: {exc}") from None
    return configs


def build_app(models: LLMModels):
    """The OpenAI-compatible Serve application for every model (needs vLLM installed)."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as exc:
        raise RuntimeError(
            "ray.serve.llm needs vLLM: build the app on a cluster node installed with the [cluster] "
            f"extra ({exc})"
        ) from None
    return build_openai_app({"llm_configs": llm_configs(models)})


def app_builder(args: dict[str, Any]):
    """Serve config entry point: ``import_path: serve.vllm_models:app_builder``, ``args: {config: PATH}``."""
    unknown = set(args) - {"config"}
    if unknown:
        raise LLMModelsError(f"unknown app args {sorted(unknown)}; expected only 'config'")
    return build_app(load_models(args.get("config", DEFAULT_CONFIG)))


def serve_config_with_llm(
    base: Mapping[str, Any], models: LLMModels, config_path: str = DEFAULT_CONFIG, http_host: str | None = None
) -> dict[str, Any]:
    """``base`` (a Serve config) plus this file's LLM application, replacing one of the same name."""
    out = copy.deepcopy(dict(base))
    apps = [a for a in out.get("applications") or [] if a.get("name") != models.app_name]
    clash = [a.get("name") for a in apps if a.get("route_prefix", "/") == models.route_prefix]
    if clash:
        raise LLMModelsError(f"route_prefix {models.route_prefix} is already used by application(s) {clash}")
    apps.append({"name": models.app_name, "route_prefix": models.route_prefix, "import_path": IMPORT_PATH,
                 "args": {"config": config_path}})
    out["applications"] = apps
    if http_host:
        out["http_options"] = {**(out.get("http_options") or {}), "host": http_host}
    return out


def describe(models: LLMModels) -> dict[str, Any]:
    """What ``--dry-run`` prints: the app and each resolved LLMConfig."""
    return {
        "app_name": models.app_name,
        "route_prefix": models.route_prefix,
        "openai_base_path": models.base_path(),
        "roles": models.roles(),
        "llm_configs": [c.model_dump(mode="json", exclude_defaults=True) for c in llm_configs(models)],
    }


# -- CLI --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.vllm_models", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="models file")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved LLMConfigs; start nothing")
    parser.add_argument("--serve-config", metavar="BASE", default=None,
                        help="print BASE (a Serve config file) with the LLM app added, for `serve deploy`")
    parser.add_argument("--http-host", default=None,
                        help="Serve proxy bind address; 0.0.0.0 so other nodes reach it (cluster only)")
    args = parser.parse_args(argv)
    try:
        models = load_models(args.config)
        if args.serve_config:
            base = yaml.safe_load(resolve_path(args.serve_config).read_text()) or {}
            llm_configs(models)  # validate before printing a config someone will deploy
            print(yaml.safe_dump(serve_config_with_llm(base, models, args.config, args.http_host), sort_keys=False))
            return 0
        if args.dry_run:
            print(json.dumps(describe(models), indent=2))
            return 0
    except (LLMModelsError, OSError) as exc:
        return report_error(exc, usage=(OSError,))  # a models or base file it cannot read: a usage error
    return _deploy(models, args.http_host)


def _deploy(models: LLMModels, http_host: str | None) -> int:
    import ray
    from ray import serve

    ray.init(address="auto")  # the running cluster (RAY_ADDRESS or the local head); never a new one
    if http_host:
        serve.start(http_options={"host": http_host})
    serve.run(build_app(models), name=models.app_name, route_prefix=models.route_prefix, blocking=False)
    print(f"deployed {models.app_name}: {', '.join(f'{r}={m}' for r, m in models.roles().items())} "
          f"at <proxy>:8000{models.base_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
