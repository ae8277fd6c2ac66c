"""How Serve finds and loads program artifacts (thin layer over the shared program loader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy

from programs import load_program


def artifact_metadata(path: str | None) -> dict[str, Any]:
    """The metadata sidecar of an artifact (``<name>.meta.json``), or {} when there is none."""
    if not path:
        return {}
    sidecar = Path(path).with_suffix(".meta.json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else {}


def best_artifact(program: str, artifact_dir: str) -> str | None:
    candidates = [p for p in Path(artifact_dir).glob(f"{program}_*.json") if not p.name.endswith(".meta.json")]
    scored = [(artifact_metadata(str(p)).get("dev_score", float("-inf")), p.stat().st_mtime, str(p)) for p in candidates]
    return max(scored)[2] if scored else None


def latest_artifact(program: str, artifact_dir: str) -> str | None:
    candidates = [p for p in Path(artifact_dir).glob(f"{program}_*.json") if not p.name.endswith(".meta.json")]
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def resolve_and_load(program: str, artifact: str | None, artifact_dir: str) -> tuple[dspy.Module, dict[str, Any]]:
    """(program module, info for /info) for an artifact path, 'latest', 'best' or None (the unoptimized program)."""
    if artifact in ("latest", "best"):
        found = (latest_artifact if artifact == "latest" else best_artifact)(program, artifact_dir)
        if found is None:
            raise FileNotFoundError(f"no {program} artifact in {artifact_dir} for --artifact {artifact}")
        artifact = found
    module = load_program(program, artifact)
    return module, {"artifact": artifact, "metadata": artifact_metadata(artifact)}
