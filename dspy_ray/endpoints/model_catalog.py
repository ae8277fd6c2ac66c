"""The models file (``serve/llm_models.yaml``): which models the cluster serves, in which role.

It is read in two places: :mod:`serve.vllm_models` turns it into Ray Serve LLM
(vLLM) deployments, and :mod:`dspy_ray.endpoints.discovery` uses its ``role`` keys to find
the target, judge and embedder endpoints on a running cluster.  The schema
lives here, in the runtime core, so discovery needs nothing from ``serve``.

    >>> models = parse_models({"models": [{"role": "target", "model_id": "m"}]})
    >>> models.roles(), models.base_path()
    ({'target': 'm'}, '/llm/v1')
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dspy_ray.util.paths import repo_path
from dspy_ray.util.cli import EXIT_USAGE

DEFAULT_CONFIG = "serve/llm_models.yaml"
MODELS_CONFIG_ENV = "LLM_MODELS_CONFIG"

# target: LM_* settings; judge: JUDGE_*; embedder: EMBED_* (a /v1/embeddings model).
Role = Literal["target", "judge", "embedder"]
# vLLM's StructuredOutputsConfig.backend values.
StructuredOutputsBackend = Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"]
# engine_kwargs this file sets from typed fields; extra_engine_kwargs may not repeat them.
TYPED_ENGINE_KWARGS = frozenset(
    {"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enable_prefix_caching",
     "structured_outputs_config", "runner"}
)


class LLMModelsError(ValueError):
    """The models file cannot be used; the message names the file and the field."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


class ModelSpec(BaseModel):
    """One served model: what to load, on what hardware, and how its replicas scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role = Field(..., description="target (LM_*), judge (JUDGE_*) or embedder (EMBED_*, /v1/embeddings)")
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
    # Embedders only: what discovery puts in EMBED_QUERY_PREFIX / EMBED_PASSAGE_PREFIX when those are unset.
    query_prefix: str = Field("", description="Text put before each query (e5: 'query: '); embedders only")
    passage_prefix: str = Field("", description="Text put before each passage (e5: 'passage: '); embedders only")

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
        }
        if self.role == "embedder":
            # A pooling model: vLLM serves /v1/embeddings; no decoding, so no structured outputs or prefix cache.
            kwargs["runner"] = "pooling"
        else:
            kwargs["enable_prefix_caching"] = self.enable_prefix_caching
            # Ray turns this dict into vLLM's StructuredOutputsConfig.
            kwargs["structured_outputs_config"] = {"backend": self.structured_outputs_backend}
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

    def prefixes(self, role: str) -> tuple[str, str]:
        """(query prefix, passage prefix) of the model in ``role`` (empty strings when none)."""
        spec = self.by_role(role)
        return (spec.query_prefix, spec.passage_prefix) if spec else ("", "")

    def roles(self) -> dict[str, str]:
        """role -> model id, e.g. ``{"target": "Qwen/...-7B-...", "judge": "Qwen/...-72B-..."}``."""
        return {m.role: m.model_id for m in self.models}

    def base_path(self) -> str:
        """Path of the OpenAI routes under the proxy, e.g. ``/llm/v1``."""
        return self.route_prefix.rstrip("/") + "/v1"


# -- loading ----------------------------------------------------------------------


def resolve_path(path: str | Path) -> Path:
    """``path`` as given, else relative to the repository (Serve builds apps in another cwd)."""
    return repo_path(path)


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
