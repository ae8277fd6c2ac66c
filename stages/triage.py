"""The 911-call stages: declarations only; the machinery is in :mod:`stages.base`."""

from stages.base import DSPyStage


class TriageStage(DSPyStage):
    """Adds ``priority``, ``category`` and ``summary``."""

    program: str = "triage"
    input_fields: dict[str, str] = {"transcript": "transcript"}
    output_fields: tuple[str, ...] = ("priority", "category", "summary")


class ExtractDetailsStage(DSPyStage):
    """Adds ``location`` and ``subject_description``."""

    program: str = "extract_details"
    input_fields: dict[str, str] = {"transcript": "transcript"}
    output_fields: tuple[str, ...] = ("location", "subject_description")
