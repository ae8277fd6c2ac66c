"""Serve the target and judge LLMs with vLLM through Ray Serve LLM (OpenAI-compatible routes).

One YAML file (``serve/llm_models.yaml``) says which models run and how: model,
tensor parallelism, GPU memory share, context length, replicas and the queue
depth the autoscaler aims for.  This module turns it into
``ray.serve.llm.LLMConfig`` objects and one ``build_openai_app`` application::

    python -m serve.llm --config serve/llm_models.yaml --dry-run   # print the resolved LLMConfigs
    python -m serve.llm --config serve/llm_models.yaml             # deploy on the connected cluster
    # or declaratively, next to the triage app (a Serve config file replaces every app):
    python -m serve.llm --config serve/llm_models.yaml --serve-config serve_config.yaml \\
        --http-host 0.0.0.0 > serve_config.cluster.yaml && serve deploy serve_config.cluster.yaml

    >>> models = load_models("serve/llm_models.yaml")            # doctest: +SKIP
    >>> [c.model_id for c in llm_configs(models)]                   # doctest: +SKIP
    ['Qwen/Qwen2.5-7B-Instruct', 'Qwen/Qwen2.5-72B-Instruct']

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
import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "serve/llm_models.yaml"
IMPORT_PATH = "serve.llm:app_builder"

Role = Literal["target", "judge"]
# vLLM's StructuredOutputsConfig.backend values.
StructuredOutputsBackend = Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"]
# engine_kwargs this file sets from typed fields; extra_engine_kwargs may not repeat them.
TYPED_ENGINE_KWARGS = frozenset(
    {"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enable_prefix_caching",
     "structured_outputs_config"}
)


class LLMModelsError(ValueError):
    """The models file cannot be used; the message names the file and the field."""


class ModelSpec(BaseModel):
    """One served model: what to load, on what hardware, and how its replicas scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role = Field(..., description="target (LM_* settings) or judge (JUDGE_* settings)")
    model_id: str = Field(..., min_length=1, description="Model id clients send as `model`; /v1/models lists it")
    model_source: str | None = Field(None, description="Hugging Face id or s3:// mirror; default: model_id")
    accelerator_type: str = Field("H100", description="GPU type replicas need (Ray accelerator name)")
    tensor_parallel_size: int = Field(1, ge=1, le=8, description="GPUs per replica (one node holds 8)")
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0, description="Share of each GPU vLLM may use")
    max_model_len: int | None = Field(None, gt=0, description="Prompt + completion tokens; None = the model's")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes")
    structured_outputs_backend: StructuredOutputsBackend = Field(
        "xgrammar", description="vLLM backend that enforces response_format JSON schemas"
    )
    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 = scale to zero; cold starts)")
    max_replicas: int = Field(2, ge=1, description="Upper bound on replicas")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; default min_replicas")
    target_ongoing_requests: float = Field(32, gt=0, description="Requests per replica the autoscaler aims for")
    max_ongoing_requests: int = Field(128, ge=1, description="Requests one replica takes at once")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before scaling up")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load must stay low this long before scaling down")
    extra_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments, passed through unchecked"
    )

    @field_validator("extra_engine_kwargs")
    @classmethod
    def _no_shadowing(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(TYPED_ENGINE_KWARGS & set(value))
        if clash:
            raise ValueError(f"set {clash} with the model's own field(s), not in extra_engine_kwargs")
        return value

    @model_validator(mode="after")
    def _consistent_scaling(self) -> ModelSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"target_ongoing_requests ({self.target_ongoing_requests}) > max_ongoing_requests "
                f"({self.max_ongoing_requests}): replicas could never reach the target"
            )
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_prefix_caching": self.enable_prefix_caching,
            # Ray turns this dict into vLLM's StructuredOutputsConfig.
            "structured_outputs_config": {"backend": self.structured_outputs_backend},
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        return {**kwargs, **self.extra_engine_kwargs}

    def deployment_config(self) -> dict[str, Any]:
        autoscaling: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            autoscaling["initial_replicas"] = self.initial_replicas
        return {"autoscaling_config": autoscaling, "max_ongoing_requests": self.max_ongoing_requests}

    def llm_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ray.serve.llm.LLMConfig`` for this model."""
        loading = {"model_id": self.model_id}
        if self.model_source:
            loading["model_source"] = self.model_source
        return {
            "model_loading_config": loading,
            "accelerator_type": self.accelerator_type,
            "engine_kwargs": self.engine_kwargs(),
            "deployment_config": self.deployment_config(),
        }


class LLMModels(BaseModel):
    """The whole models file: one Serve application holding every model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_name: str = Field("llm", min_length=1, description="Serve application name")
    route_prefix: str = Field("/llm", description="HTTP prefix; the OpenAI base URL is <proxy><prefix>/v1")
    models: list[ModelSpec] = Field(..., min_length=1, description="The served models")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or (len(value) > 1 and value.endswith("/")):
            raise ValueError("must start with '/' and not end with one (e.g. /llm)")
        return value

    @model_validator(mode="after")
    def _one_per_role(self) -> LLMModels:
        for attr in ("role", "model_id"):
            values = [getattr(m, attr) for m in self.models]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"each {attr} may appear once; repeated: {dupes}")
        if self.by_role("target") is None:
            raise ValueError("a model with role: target is required")
        return self

    def by_role(self, role: str) -> ModelSpec | None:
        return next((m for m in self.models if m.role == role), None)

    def roles(self) -> dict[str, str]:
        """role -> model id, e.g. ``{"target": "Qwen/...-7B-...", "judge": "Qwen/...-72B-..."}``."""
        return {m.role: m.model_id for m in self.models}

    def base_path(self) -> str:
        """Path of the OpenAI routes under the proxy, e.g. ``/llm/v1``."""
        return self.route_prefix.rstrip("/") + "/v1"


# -- loading ----------------------------------------------------------------------


def resolve_path(path: str | Path) -> Path:
    """``path`` as given, else relative to the repository (Serve builds apps in another cwd)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def _describe(exc: ValidationError, data: Any) -> str:
    parts = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ".".join(str(x) for x in loc) or "(top level)"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            try:
                where += f" (model {data['models'][loc[1]].get('model_id', '?')!r})"
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (misspelled?)"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def parse_models(data: Any, source: str = "<models>") -> LLMModels:
    """Validate already-loaded YAML data; errors name ``source`` and every bad field."""
    if not isinstance(data, Mapping):
        raise LLMModelsError(f"{source}: expected a mapping with app_name, route_prefix and models")
    try:
        return LLMModels.model_validate(data)
    except ValidationError as exc:
        raise LLMModelsError(f"{source}: {_describe(exc, data)}") from None


def load_models(path: str | Path = DEFAULT_CONFIG) -> LLMModels:
    p = resolve_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise LLMModelsError(f"cannot read models file {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise LLMModelsError(f"{p}: not valid YAML: {exc}") from None
    return parse_models(data, str(p))


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
    """Serve config entry point: ``import_path: serve.llm:app_builder``, ``args: {config: PATH}``."""
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
    parser = argparse.ArgumentParser(prog="python -m serve.llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"models file (default: {DEFAULT_CONFIG})")
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
