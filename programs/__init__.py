"""Pure DSPy programs: signatures and modules, no Ray, no retries, no I/O.

The framework runs them (batch, optimize, serve) through the task registry
(``tasks/``); loading and artifacts live in :mod:`dspy_ray.execution.loading`.
"""
