"""Everything ``python -m serve`` and ``serve_config.yaml`` can set for a program server."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ServeOptions(BaseModel):
    """Everything ``python -m serve`` and ``serve_config.yaml`` can set."""

    model_config = ConfigDict(extra="forbid")

    program: str = Field(..., description="Task whose program is served: a built-in name or 'package.module[:ATTR]'")
    artifact: str | None = Field(None, description="Optimized program JSON, or 'latest'/'best' from the registry")
    artifact_dir: str = Field("artifacts", description="Registry folder for 'latest'/'best'")
    resources: dict[str, str] = Field(default_factory=dict, description="Resource settings (e.g. the RAG index)")
    lm: dict[str, Any] = Field(default_factory=dict, description="Target LM settings that are not secret (flags)")
    judge: dict[str, Any] = Field(default_factory=dict, description="Judge LM settings that are not secret (flags)")
    cache: bool = Field(False, description="Answer repeated identical LM calls from the LM cache (LM_CACHE); "
                        "off unless asked: a response answered entirely from it carries X-Cache: hit")
    max_batch: int = Field(256, ge=1, description="Largest accepted /batch request (items)")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest accepted request body (bytes); 413 beyond")
    # Serve scaling knobs (applied by build_app as deployment options).
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound")
    max_replicas: int = Field(4, ge=1, description="Autoscaling upper bound")
    target_ongoing_requests: float = Field(32, gt=0, description="Queue depth per replica the autoscaler aims for")
    upscale_delay_s: float = Field(5.0, ge=0, description="How long load must stay high before adding replicas")
    downscale_delay_s: float = Field(30.0, ge=0, description="How long load must stay low before removing replicas")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica works on at once")
    max_queued_requests: int = Field(256, ge=1, description="Waiting requests before 503 + Retry-After")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with 503 on overload")
    # Drift monitoring (serve/drift.py).
    drift_sample_rate: float = Field(0.02, ge=0, le=1, description="Share of live requests sent to the judge")
    drift_db: str = Field("artifacts/drift.sqlite", description="Where sampled requests and scores are stored")
    drift_policy: dict[str, Any] = Field(default_factory=dict, description="serve.drift.DriftPolicy fields")
