"""Ray Data stages that run DSPy programs; see :mod:`stages.base` for the adapter."""

from stages.base import DSPyStage, DSPyStageUDF
from stages.config import EndpointSettings
from stages.triage import ExtractDetailsStage, TriageStage

__all__ = ["DSPyStage", "DSPyStageUDF", "EndpointSettings", "ExtractDetailsStage", "TriageStage"]
