"""Pure DSPy programs and the one loader that batch, optimize and serve share.

    >>> program = load_program("triage")            # a fresh CallTriager
    >>> program = load_program(CallTriager, "artifacts/triage.json")  # doctest: +SKIP
"""

from programs.loading import PROGRAMS, ProgramLoadError, load_program, resolve_program_class
from programs.triage import CallTriager, DetailExtractor

__all__ = ["PROGRAMS", "CallTriager", "DetailExtractor", "ProgramLoadError", "load_program", "resolve_program_class"]
