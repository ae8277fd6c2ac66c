"""The one way to load a program: a module class (or a task's program spec), its resources, an optional artifact.

Batch stages, optimization workers and Serve replicas all call
:func:`load_program`; nothing else instantiates a program or reads its JSON::

    >>> loaded = load_program(CallTriager)                                   # doctest: +SKIP
    >>> loaded = load_program(task.program, "best", artifact_dir="artifacts")  # doctest: +SKIP
    >>> loaded = load_program(rag.program, resources={"retriever": retriever}) # doctest: +SKIP
    >>> loaded.program, loaded.path, loaded.metadata                          # doctest: +SKIP

JSON only: pickled programs can run arbitrary code on load, so they are refused.
An artifact whose predictors or signatures do not fit the module is refused
with an error naming the file and the predictor, before DSPy sees it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy

from dspy_ray.execution.artifacts import (
    ArtifactMetadata,
    ArtifactMismatchError,
    ProgramLoadError,
    check_signatures,
    read_metadata,
    read_program_json,
    resolve_artifact,
)

# Keys DSPy writes next to the predictors in a saved program; "settings": a program's own settings
# (programs/rag.py's answer_style), passed on to its load_state.
_NON_PREDICTOR_KEYS = {"metadata", "settings"}


@dataclass(frozen=True)
class Resource:
    """Something a program needs that is not part of its saved state: a retrieval index, a tool.

    ``open(setting, embed)`` turns a setting (a path or URI, from a CLI flag
    or a config) into the object passed to the program's constructor as keyword
    ``name``; ``embed`` is the resolved embedding endpoint when the resource
    ``needs_embedder`` (a retriever embeds its queries), else None.  It runs
    once per process and setting (:meth:`ProgramSpec.open_resources`), so a
    long-lived actor or replica loads an index once.
    """

    name: str
    open: Callable[[str, Any], Any] = field(compare=False)
    help: str = ""
    needs_embedder: bool = False
    cli_flag: str = ""  # the command-line flag; default --<name>

    @property
    def flag(self) -> str:
        return self.cli_flag or "--" + self.name.replace("_", "-")


_opened: dict[tuple[str, str, str], Any] = {}
_opened_lock = threading.Lock()


@dataclass(frozen=True)
class ProgramSpec:
    """A program as the framework knows it: the name its artifacts are filed under, and how to build it.

    ``factory`` builds the module when ``cls(**resources)`` is not how (it gets
    the same keywords).  ``output_types`` gives the type of outputs the
    module's ``forward`` returns beyond its signatures' fields (batch columns
    and Serve responses are typed from both).  ``reward`` scores an output's
    validity for ``dspy.Refine`` (default: every output field present).
    """

    name: str
    cls: type[dspy.Module]
    resources: tuple[Resource, ...] = ()
    factory: Callable[..., dspy.Module] | None = field(default=None, compare=False)
    output_types: Mapping[str, Any] = field(default_factory=dict, compare=False)
    reward: Callable[[dict, Any], float] | None = field(default=None, compare=False)  # Refine's; None = fields present

    @property
    def needs_embedder(self) -> bool:
        return any(r.needs_embedder for r in self.resources)

    def open_resources(self, settings: Mapping[str, Any] | None, embed: Any = None) -> dict[str, Any]:
        """Resource objects from their settings, opened once per process and setting.

        ``embed``: the embedding endpoint (:class:`dspy_ray.endpoints.settings.EndpointSettings`) for
        resources that need one."""
        settings = dict(settings or {})
        missing = [r.flag for r in self.resources if not settings.get(r.name)]
        if missing:
            raise ProgramLoadError(f"program {self.name!r} needs {', '.join(missing)}")
        if self.needs_embedder and embed is None:
            raise ProgramLoadError(f"program {self.name!r}: its resources need an embedding endpoint (EMBED_*)")
        opened = {}
        for resource in self.resources:
            given = embed if resource.needs_embedder else None
            key = (resource.name, f"{resource.open.__module__}.{resource.open.__qualname__}",
                   str(settings[resource.name]), given.model_dump_json() if given is not None else "")
            with _opened_lock:
                if key not in _opened:
                    _opened[key] = resource.open(str(settings[resource.name]), given)
                opened[resource.name] = _opened[key]
        return opened

    def skeleton(self) -> dspy.Module:
        """The module with every resource None: its predictors and signatures, for planning. Never run it."""
        return (self.factory or self.cls)(**{r.name: None for r in self.resources})

    def build(self, resources: Mapping[str, Any] | None = None) -> dspy.Module:
        given = dict(resources or {})
        missing = [r.name for r in self.resources if r.name not in given]
        if missing:
            raise ProgramLoadError(f"program {self.name!r} needs resource(s) {missing}; got {sorted(given)}")
        kwargs = {r.name: given[r.name] for r in self.resources}
        return (self.factory or self.cls)(**kwargs)


@dataclass(frozen=True)
class LoadedProgram:
    """A ready module, the artifact it came from (None: unoptimized) and that artifact's sidecar."""

    program: dspy.Module
    path: str | None
    metadata: ArtifactMetadata | None


def as_spec(program: ProgramSpec | type[dspy.Module] | str) -> ProgramSpec:
    """A ProgramSpec for a spec, a module class, or a ``'package.module:Class'`` import path."""
    if isinstance(program, ProgramSpec):
        return program
    if isinstance(program, str):
        module_name, sep, attr = program.partition(":")
        if not sep:
            raise ProgramLoadError(f"program {program!r}: expected 'package.module:Class' (or a task name, "
                                   f"which the task registry resolves)")
        import importlib

        try:
            program = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ProgramLoadError(f"program {program!r} cannot be imported: {exc}") from None
    if isinstance(program, type) and issubclass(program, dspy.Module):
        return ProgramSpec(name=program.__name__, cls=program)
    raise ProgramLoadError(f"not a DSPy program: {program!r}")


def load_program(
    program: ProgramSpec | type[dspy.Module] | str,
    artifact: str | os.PathLike | None = None,
    *,
    resources: Mapping[str, Any] | None = None,
    artifact_dir: str | os.PathLike = "artifacts",
    state: dict[str, Any] | None = None,
) -> LoadedProgram:
    """Build the program and load its optimized state.

    ``artifact``: None (unoptimized), a path or URI to a program JSON, or
    ``'best'``/``'latest'`` from the registry in ``artifact_dir`` (by the
    spec's name).  ``state``: a ``dump_state()`` dict instead of a file (the
    optimizer's candidates).  The sidecar's signature hashes are checked before
    the state is loaded.
    """
    spec = as_spec(program)
    module = spec.build(resources)
    if artifact is None:
        if state is not None:
            apply_state(module, state, f"{spec.name} state")
        return LoadedProgram(module, None, None)
    path = resolve_artifact(artifact, spec.name, artifact_dir)
    saved = read_program_json(path)
    metadata = read_metadata(path)
    if metadata is not None:
        # A bare class has no registered name; its signature check below is what protects it.
        if isinstance(program, ProgramSpec) and metadata.program != spec.name:
            raise ArtifactMismatchError(f"{path}: artifact is for program {metadata.program!r}, not {spec.name!r}")
        check_signatures(module, metadata, str(path))
    apply_state(module, saved, str(path))
    return LoadedProgram(module, str(path), metadata)


def apply_state(module: dspy.Module, state: dict[str, Any], source: str) -> None:
    """Load ``state`` into ``module`` after checking that it fits (names ``source`` and the predictor if not)."""
    predictors = {k: v for k, v in state.items() if k not in _NON_PREDICTOR_KEYS}
    check_state_fits(module, predictors, source)
    settings = state.get("settings")
    module.load_state({**predictors, "settings": settings} if settings is not None else predictors)


def check_state_fits(module: dspy.Module, state: dict[str, Any], source: str) -> None:
    """Raise ProgramLoadError naming the first predictor whose saved state does not fit."""
    predictors = dict(module.named_predictors())
    missing = sorted(set(predictors) - set(state))
    unknown = sorted(set(state) - set(predictors))
    if missing or unknown:
        parts = [f"predictor(s) {missing} missing from the file" if missing else "",
                 f"file has predictor(s) {unknown} the module lacks" if unknown else ""]
        raise ProgramLoadError(f"{source} does not fit {type(module).__name__}: "
                               + "; ".join(p for p in parts if p))
    for name, predictor in predictors.items():
        fields = (state[name].get("signature") or {}).get("fields")
        expected = list(predictor.signature.fields)
        if fields is not None and len(fields) != len(expected):
            raise ProgramLoadError(
                f"{source}: predictor {name!r} has {len(fields)} signature fields in the file, "
                f"but {type(module).__name__}.{name} has {len(expected)} ({', '.join(expected)})"
            )
