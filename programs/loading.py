"""Load a DSPy program: a module class plus, optionally, an optimized JSON state.

JSON only: pickled programs can run arbitrary code on load, so they are refused.
A JSON whose predictors or signature fields do not fit the module is refused
with an error naming the file and the predictor, instead of DSPy's KeyError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dspy

from programs.triage import CallTriager, DetailExtractor

# Program name -> module class, for CLIs and Serve (`--program triage`).
PROGRAMS: dict[str, type[dspy.Module]] = {
    "triage": CallTriager,
    "extract_details": DetailExtractor,
}

# Keys DSPy writes next to the predictors in a saved program.
_NON_PREDICTOR_KEYS = {"metadata"}


class ProgramLoadError(ValueError):
    """A program file that cannot be loaded into the requested module."""


def resolve_program_class(program: str | type[dspy.Module]) -> type[dspy.Module]:
    if isinstance(program, type):
        return program
    if program in PROGRAMS:
        return PROGRAMS[program]
    if ":" in program:  # "package.module:ClassName" for user programs
        import importlib

        module_name, _, attr = program.partition(":")
        return getattr(importlib.import_module(module_name), attr)
    raise ProgramLoadError(f"unknown program {program!r}; known: {', '.join(sorted(PROGRAMS))} or 'pkg.module:Class'")


def read_program_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.suffix.lower() in {".pkl", ".pickle"}:
        raise ProgramLoadError(f"{path}: pickled programs are not loaded (they can run code); save programs as JSON")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProgramLoadError(f"{path}: program file not found") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProgramLoadError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(state, dict):
        raise ProgramLoadError(f"{path}: expected a JSON object of predictors, got {type(state).__name__}")
    return state


def check_state_fits(module: dspy.Module, state: dict[str, Any], source: str) -> None:
    """Raise ProgramLoadError naming the first predictor whose saved state does not fit."""
    predictors = dict(module.named_predictors())
    saved = {k: v for k, v in state.items() if k not in _NON_PREDICTOR_KEYS}
    missing = sorted(set(predictors) - set(saved))
    unknown = sorted(set(saved) - set(predictors))
    if missing or unknown:
        raise ProgramLoadError(
            f"{source} does not fit {type(module).__name__}: "
            + "; ".join(
                part
                for part in (
                    f"predictor(s) {missing} missing from the file" if missing else "",
                    f"file has predictor(s) {unknown} the module lacks" if unknown else "",
                )
                if part
            )
        )
    for name, predictor in predictors.items():
        fields = (saved[name].get("signature") or {}).get("fields")
        expected = list(predictor.signature.fields)
        if fields is not None and len(fields) != len(expected):
            raise ProgramLoadError(
                f"{source}: predictor {name!r} has {len(fields)} signature fields in the file, "
                f"but {type(module).__name__}.{name} has {len(expected)} ({', '.join(expected)})"
            )


def load_program(program: str | type[dspy.Module], path: str | os.PathLike | None = None) -> dspy.Module:
    """Instantiate ``program`` and, when ``path`` is given, load its optimized JSON state."""
    module = resolve_program_class(program)()
    if path:
        state = read_program_json(path)
        check_state_fits(module, state, str(path))
        module.load_state({k: v for k, v in state.items() if k not in _NON_PREDICTOR_KEYS})
    return module
