"""A program's life outside its ``forward``: loading, artifacts, one call, scoring.

* :mod:`dspy_ray.execution.loading` - ``load_program``: the one loading path of batch, optimize and serve;
* :mod:`dspy_ray.execution.artifacts` - versioned JSON artifacts with metadata, and the registry;
* :mod:`dspy_ray.execution.runner` - ``ProgramRunner``: one call with Refine, errors as data;
* :mod:`dspy_ray.execution.refine` - Refine with attempt state kept per call;
* :mod:`dspy_ray.execution.evaluation` - a program over examples, each outcome scored (optimize and drift);
* :mod:`dspy_ray.execution.signatures` - what a signature declares (fields, types, Literals);
* :mod:`dspy_ray.execution.scoring` - task metrics and LM judges.

May import :mod:`dspy_ray.client`, :mod:`dspy_ray.endpoints` and :mod:`dspy_ray.util`.
"""
