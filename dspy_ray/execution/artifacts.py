"""Optimized program artifacts: save, list, pick; the files :func:`dspy_ray.execution.loading.load_program` reads.

An artifact is two JSON files side by side::

    artifacts/triage_qwen2.5-7b_20261124T2205_0.812.json        # the program, DSPy's own JSON
    artifacts/triage_qwen2.5-7b_20261124T2205_0.812.meta.json   # ArtifactMetadata

The program file is what ``dspy.Module.save`` writes, so DSPy itself loads it
(``CallTriager().load(path)``).  The sidecar records where it came from and a
hash of every predictor's signature (field names, roles and types; not the
instructions, which optimization rewrites), so a program whose signature
changed since the artifact was made is refused with an error naming the file
and the predictor instead of failing on the first call.  Nothing is pickled and
no API key is written: endpoint settings are stored redacted.

    >>> saved = save_artifact(program, "artifacts", ArtifactMetadata(...))   # doctest: +SKIP
    >>> best_artifact("artifacts", "triage").metadata.dev_score               # doctest: +SKIP

Batch, Serve and the optimizer all load artifacts through
:func:`dspy_ray.execution.loading.load_program`, which resolves ``best``/``latest`` here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from dspy_ray.util.fs import filesystem_for, is_uri, json_object, read_bytes, write_bytes
from dspy_ray.endpoints.settings import redact_url
from dspy_ray.util.paths import repo_path
from dspy_ray.util.cli import EXIT_USAGE

SIDECAR_SUFFIX = ".meta.json"
ALIASES = ("latest", "best")
FORMAT_VERSION = 1


class ProgramLoadError(ValueError):
    """A program file that cannot be loaded into the requested module (names the file and the reason)."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


class ArtifactMismatchError(ProgramLoadError):
    """An artifact was made for a different signature than the module has now."""


class ArtifactMetadata(BaseModel):
    """What the sidecar ``<artifact>.meta.json`` records about one optimized program."""

    model_config = ConfigDict(extra="allow")

    format_version: int = Field(FORMAT_VERSION, description="Sidecar layout version")
    program: str = Field(..., description="Program name the artifact is filed under (the task's stage name)")
    module_class: str = Field("", description="Qualified class name of the DSPy module")
    signature_hash: str = Field("", description="Hash over all predictors' signature structure")
    predictor_signatures: dict[str, str] = Field(
        default_factory=dict, description="Predictor name -> hash of its signature fields (names, roles, types)"
    )
    predictor_fields: dict[str, list[str]] = Field(
        default_factory=dict, description="Predictor name -> 'name:role:type' per field, for readable mismatch errors"
    )
    model: str = Field("", description="Target model id the program was optimized for")
    lm: dict[str, Any] = Field(default_factory=dict, description="Target endpoint settings, redacted (no API key)")
    judge: dict[str, Any] | None = Field(None, description="Judge endpoint settings, redacted; None without a judge")
    optimizer: str = Field("", description="Optimizer name (miprov2, bootstrap, bootstrap_rs, copro, gepa)")
    optimizer_settings: dict[str, Any] = Field(default_factory=dict, description="Optimizer settings used")
    command: str = Field("", description="The command that made this artifact (python -m optimize ...)")
    dataset_hash: str = Field("", description="Hash of the train and dev examples used")
    dev_score: float | None = Field(None, description="Score on the dev set, 0..1")
    baseline_dev_score: float | None = Field(None, description="Unoptimized program's dev score, 0..1")
    dev_field_accuracy: dict[str, float] = Field(default_factory=dict, description="Per-field dev accuracy")
    dev_program_errors: int | None = Field(None, description="Dev examples the program failed on (scored 0)")
    dev_judge_errors: int | None = Field(None, description="Dev examples the judge failed on (not scored)")
    run_dir: str | None = Field(None, description="Optimization run state (resume, trials, candidates)")
    dspy_version: str = Field(dspy.__version__, description="DSPy version that wrote the program")
    created_at: str = Field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        description="UTC creation time (ISO 8601)",
    )


# -- signatures -----------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    # Plain classes by name; typing constructs (Literal[...], list[str]) by repr, which lists their arguments.
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__qualname__
    return repr(annotation)


def predictor_fields(module: dspy.Module) -> dict[str, list[str]]:
    """Predictor name -> ``'name:role:type'`` for each signature field, in order."""
    out: dict[str, list[str]] = {}
    for name, predictor in module.named_predictors():
        out[name] = [
            f"{field_name}:{(field.json_schema_extra or {}).get('__dspy_field_type', '?')}:{_type_name(field.annotation)}"
            for field_name, field in predictor.signature.fields.items()
        ]
    return out


def signature_hashes(module: dspy.Module) -> tuple[str, dict[str, str]]:
    """(overall hash, predictor -> hash) of the module's signature structure."""
    per_predictor = {
        name: hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
        for name, fields in predictor_fields(module).items()
    }
    overall = hashlib.sha256(json.dumps(sorted(per_predictor.items())).encode()).hexdigest()[:16]
    return overall, per_predictor


def redacted_settings(settings: Any) -> dict[str, Any]:
    """Endpoint settings safe to store: no key (not even a marker) and no credentials in the URL."""
    data = dict(settings.redacted())
    data.pop("api_key", None)
    data["base_url"] = redact_url(data.get("base_url", ""))
    return data


# -- saving -----------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-") or "unknown"


def artifact_filename(program: str, model: str, score: float | None, when: dt.datetime) -> str:
    """``<program>_<model>_<date>_<score>.json`` (model with path separators and odd characters replaced)."""
    score_text = "na" if score is None else f"{score:.3f}"
    return f"{_slug(program)}_{_slug(model.rsplit('/', 1)[-1])}_{when.strftime('%Y%m%dT%H%M%S')}_{score_text}.json"


def _sidecar_name(name: str) -> str:
    return name[: -len(".json")] + SIDECAR_SUFFIX if name.endswith(".json") else name + SIDECAR_SUFFIX


def _read_text(path: str | os.PathLike) -> str | None:
    """A local or object-store file's text; None when it does not exist."""
    data = read_bytes(*filesystem_for(path))
    return None if data is None else data.decode("utf-8")


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(_sidecar_name(path.name))


def save_artifact(module: dspy.Module, out_dir: str | os.PathLike, metadata: ArtifactMetadata) -> str:
    """Write the program JSON and its sidecar; return the program file's path (or URI).

    The signature fields of ``metadata`` are filled in from ``module`` itself.
    ``out_dir`` may be an object-store URI (``s3://bucket/artifacts``): both files
    are written locally first and then uploaded, the sidecar last, so a listing
    never sees a program without its metadata.
    """
    if is_uri(out_dir):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="artifact-") as tmp:
            local = Path(save_artifact(module, tmp, metadata))
            fs, root = filesystem_for(out_dir)
            existing = {str(p).rsplit("/", 1)[-1] for p in _program_files(out_dir)}
            name = local.name
            n = 2
            while name in existing:
                name = local.name.replace(".json", f"-{n}.json")
                n += 1
            for src, dst in ((local, name), (sidecar_path(local), _sidecar_name(name))):
                write_bytes(fs, f"{root.rstrip('/')}/{dst}", src.read_bytes())
            return f"{str(out_dir).rstrip('/')}/{name}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overall, per_predictor = signature_hashes(module)
    cls = type(module)
    metadata = metadata.model_copy(
        update={
            "module_class": f"{cls.__module__}.{cls.__qualname__}",
            "signature_hash": overall,
            "predictor_signatures": per_predictor,
            "predictor_fields": predictor_fields(module),
        }
    )
    created = dt.datetime.fromisoformat(metadata.created_at)
    name = artifact_filename(metadata.program, metadata.model, metadata.dev_score, created)
    path = out / name
    n = 2
    while path.exists() or sidecar_path(path).exists():  # two runs finishing in the same second
        path = out / name.replace(".json", f"-{n}.json")
        n += 1
    # Write to temporary names and rename, so a reader never sees half a file.
    # (DSPy picks JSON over pickle by the ".json" suffix, hence ".part.json"; it has no sidecar, so
    # list_artifacts ignores it.)
    part = path.with_name(path.name[: -len(".json")] + ".part.json")
    module.save(str(part))
    os.replace(part, path)
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + ".part")
    side_tmp.write_text(metadata.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(side_tmp, side)
    return str(path)


# -- registry ---------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> ArtifactMetadata | None:
    """The sidecar of the artifact at ``path`` (a local path or URI), or None when it has none."""
    side = f"{str(path).rsplit('/', 1)[0]}/{_sidecar_name(str(path).rsplit('/', 1)[-1])}" if is_uri(path) \
        else sidecar_path(path)
    text = _read_text(side)
    if text is None:
        return None
    try:
        return ArtifactMetadata.model_validate_json(text)
    except ValueError as exc:
        raise ProgramLoadError(f"{side}: unreadable artifact metadata ({exc})") from None


@dataclass(frozen=True)
class ArtifactRecord:
    path: Path | str  # a str for object-store URIs
    metadata: ArtifactMetadata


def _program_files(artifact_dir: str | os.PathLike) -> list[Path | str]:
    if not is_uri(artifact_dir):
        root = Path(artifact_dir)
        return sorted(root.glob("*.json")) if root.is_dir() else []
    fs, inner = filesystem_for(artifact_dir)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    base = str(artifact_dir).rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted(f"{base}/{i.base_name}" for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json"))


def list_artifacts(artifact_dir: str | os.PathLike, program: str | None = None) -> list[ArtifactRecord]:
    """Artifacts (with a sidecar) in ``artifact_dir`` (a folder or URI), oldest first; only ``program``'s when given."""
    records = []
    for path in _program_files(artifact_dir):
        if str(path).endswith(SIDECAR_SUFFIX):
            continue
        meta = read_metadata(path)
        if meta is None or (program is not None and meta.program != program):
            continue
        records.append(ArtifactRecord(path, meta))
    return sorted(records, key=lambda r: (r.metadata.created_at, str(r.path)))


def latest_artifact(artifact_dir: str | os.PathLike, program: str) -> ArtifactRecord | None:
    records = list_artifacts(artifact_dir, program)
    return records[-1] if records else None


def best_artifact(artifact_dir: str | os.PathLike, program: str) -> ArtifactRecord | None:
    """Highest dev score; the newer artifact wins a tie."""
    scored = [r for r in list_artifacts(artifact_dir, program) if r.metadata.dev_score is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (r.metadata.dev_score, r.metadata.created_at, str(r.path)))


# -- loading ----------------------------------------------------------------------


def check_signatures(module: dspy.Module, metadata: ArtifactMetadata, source: str) -> None:
    """Raise ArtifactMismatchError naming ``source`` and the predictor whose signature changed."""
    if not metadata.predictor_signatures:
        return  # a sidecar without hashes (hand-written): the structural check in load_program still runs
    _, current = signature_hashes(module)
    current_fields = predictor_fields(module)
    for name in sorted(set(current) | set(metadata.predictor_signatures)):
        saved_hash = metadata.predictor_signatures.get(name)
        if saved_hash == current.get(name):
            continue
        if saved_hash is None:
            detail = "the artifact has no such predictor"
        elif name not in current:
            detail = f"{type(module).__name__} has no such predictor"
        else:
            was, now = metadata.predictor_fields.get(name, []), current_fields[name]
            detail = f"fields were [{', '.join(was)}], now [{', '.join(now)}]" if was else "signature hash differs"
        raise ArtifactMismatchError(
            f"{source}: predictor {name!r} does not match {type(module).__name__}'s current signature ({detail}); "
            f"re-run the optimizer for this program"
        )


def resolve_artifact(path_or_alias: str | os.PathLike, program: str,
                     artifact_dir: str | os.PathLike) -> Path | str:
    """A path or URI as given, or the file ``'best'``/``'latest'`` picks for ``program`` in ``artifact_dir``."""
    if str(path_or_alias) in ALIASES:
        pick = latest_artifact if str(path_or_alias) == "latest" else best_artifact
        record = pick(artifact_dir, program)
        if record is None:
            raise ProgramLoadError(f"no {program} artifact in {artifact_dir} for {path_or_alias!r}")
        return record.path
    if is_uri(path_or_alias):
        return str(path_or_alias)
    path = repo_path(path_or_alias)  # an artifact shipped in the repository, from any working directory
    return path if path.exists() else Path(path_or_alias)


def read_program_json(path: str | os.PathLike) -> dict[str, Any]:
    """A saved program's JSON state (local path or URI); pickles and broken JSON are refused, naming the file."""
    name = str(path)
    if name.lower().endswith((".pkl", ".pickle")):
        raise ProgramLoadError(f"{name}: pickled programs are not loaded (they can run code); save programs as JSON")
    try:
        text = _read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ProgramLoadError(f"{name}: cannot read ({' '.join(str(exc).split())[:200]})") from None
    if text is None:
        raise ProgramLoadError(f"{name}: program file not found")
    return json_object(text, name, ProgramLoadError)
