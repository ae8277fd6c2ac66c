"""Ray Data stages that run DSPy programs; see :mod:`stages.base` for the stage adapter."""

from stages.base import DSPyStage, DSPyStageUDF

__all__ = ["DSPyStage", "DSPyStageUDF"]
