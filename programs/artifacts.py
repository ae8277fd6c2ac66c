"""Optimized program artifacts: save, list, pick, load — the one artifact loader.

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
    >>> loaded = load_artifact("best", program="triage", artifact_dir="artifacts")  # doctest: +SKIP
    >>> loaded.program, loaded.metadata.dev_score                             # doctest: +SKIP

Batch, Serve and the optimizer all load artifacts through :func:`load_artifact`,
which ends in :func:`programs.loading.load_program`.
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
from urllib.parse import urlsplit, urlunsplit

import dspy
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from programs.loading import ProgramLoadError, load_program, read_program_json, resolve_program_class
from stages.fs import filesystem_for, is_uri, read_bytes, write_bytes

SIDECAR_SUFFIX = ".meta.json"
ALIASES = ("latest", "best")
FORMAT_VERSION = 1


class ArtifactMismatchError(ProgramLoadError):
    """An artifact was made for a different signature than the module has now."""


class ArtifactMetadata(BaseModel):
    """What the sidecar ``<artifact>.meta.json`` records about one optimized program."""

    model_config = ConfigDict(extra="allow")

    format_version: int = Field(FORMAT_VERSION, description="Sidecar layout version")
    program: str = Field(..., description="Program name in programs.PROGRAMS (or 'pkg.module:Class')")
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


@dataclass(frozen=True)
class LoadedArtifact:
    """A loaded program with the file it came from (None: unoptimized) and its sidecar."""

    program: dspy.Module
    path: str | None
    metadata: ArtifactMetadata | None


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


def describe_module(program: str | type[dspy.Module]) -> dict[str, Any]:
    """The signature part of the metadata for a fresh instance of ``program``."""
    module = resolve_program_class(program)()
    overall, per_predictor = signature_hashes(module)
    cls = type(module)
    return {
        "module_class": f"{cls.__module__}.{cls.__qualname__}",
        "signature_hash": overall,
        "predictor_signatures": per_predictor,
        "predictor_fields": predictor_fields(module),
    }


def redact_url(url: str) -> str:
    """A URL with user info and query string removed (some providers put keys there)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redacted_settings(settings: Any) -> dict[str, Any]:
    """Endpoint settings safe to store: ``EndpointSettings.redacted()`` plus URL credentials removed."""
    data = dict(settings.redacted())
    data.pop("api_key", None)  # not even a "***" marker: nothing key-shaped belongs in an artifact
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


def resolve_artifact(path_or_alias: str | os.PathLike, program: str | None,
                     artifact_dir: str | os.PathLike) -> Path | str:
    if str(path_or_alias) in ALIASES:
        if not program:
            raise ProgramLoadError(f"artifact {path_or_alias!r} needs a program name to look up")
        pick = latest_artifact if str(path_or_alias) == "latest" else best_artifact
        record = pick(artifact_dir, program)
        if record is None:
            raise ProgramLoadError(f"no {program} artifact in {artifact_dir} for {path_or_alias!r}")
        return record.path
    return str(path_or_alias) if is_uri(path_or_alias) else Path(path_or_alias)


def load_artifact(
    path_or_alias: str | os.PathLike | None,
    program: str | type[dspy.Module] | None = None,
    artifact_dir: str | os.PathLike = "artifacts",
) -> LoadedArtifact:
    """Load an artifact by path, ``'latest'`` or ``'best'`` (None: the unoptimized program).

    The program defaults to the one the sidecar names.  The signature hash is
    checked before DSPy sees the file; the state is then loaded by
    :func:`programs.loading.load_program`.

        >>> load_artifact(None, program="triage").path is None
        True
    """
    program_name = program if isinstance(program, str) else None
    if path_or_alias is None:
        if program is None:
            raise ProgramLoadError("load_artifact(None) needs a program")
        return LoadedArtifact(load_program(program), None, None)
    path = resolve_artifact(path_or_alias, program_name, artifact_dir)
    if is_uri(path):
        return _load_remote(str(path), program)
    if not path.is_file():
        raise ProgramLoadError(f"{path}: artifact not found")
    metadata = read_metadata(path)
    if program is None:
        if metadata is None:
            raise ProgramLoadError(f"{path}: no metadata sidecar; pass the program to load it")
        program = metadata.program
    if metadata is not None and program_name is not None and metadata.program != program_name:
        raise ArtifactMismatchError(f"{path}: artifact is for program {metadata.program!r}, not {program_name!r}")
    if metadata is not None:
        read_program_json(path)  # pickles and broken JSON are refused with the loader's own message first
        check_signatures(resolve_program_class(program)(), metadata, str(path))
    return LoadedArtifact(load_program(program, path), str(path), metadata)


def _load_remote(uri: str, program: str | type[dspy.Module] | None) -> LoadedArtifact:
    """Download the program and its sidecar next to each other, load locally, report the URI."""
    import tempfile

    text = _read_text(uri)
    if text is None:
        raise ProgramLoadError(f"{uri}: artifact not found")
    metadata = read_metadata(uri)
    with tempfile.TemporaryDirectory(prefix="artifact-") as tmp:
        local = Path(tmp) / uri.rsplit("/", 1)[-1]
        local.write_text(text, encoding="utf-8")
        if metadata is not None:
            sidecar_path(local).write_text(metadata.model_dump_json(), encoding="utf-8")
        loaded = load_artifact(local, program)
    return LoadedArtifact(loaded.program, uri, loaded.metadata)
