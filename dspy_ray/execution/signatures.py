"""A program's inputs and outputs, typed, read from its predictors' signatures.

Batch stages type their output columns from this (``list[str]`` becomes an
Arrow list) and Serve derives its request and response models from it
(``Literal`` becomes an enum in the OpenAPI schema).

    >>> from programs.triage import CallTriager
    >>> inputs, outputs = program_fields(CallTriager())
    >>> list(inputs), list(outputs)
    (['transcript'], ['priority', 'category', 'summary'])

Inputs are the parameters of the module's ``forward`` (typed from the
predictor input field of the same name, else ``str``); outputs are every
predictor's output fields plus ``extra_outputs`` (what ``forward`` adds to its
prediction beyond them), minus anything that is also an input.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import dspy

FieldInfo = tuple[Any, str]  # (annotation, description)


def program_fields(
    program: dspy.Module, extra_outputs: Mapping[str, Any] | None = None
) -> tuple[dict[str, FieldInfo], dict[str, FieldInfo]]:
    """(inputs, outputs): name -> (annotation, description)."""
    predictor_inputs: dict[str, FieldInfo] = {}
    outputs: dict[str, FieldInfo] = {}
    for _, predictor in program.named_predictors():
        sig = predictor.signature
        for name, field in sig.input_fields.items():
            predictor_inputs.setdefault(name, (field.annotation or str, _desc(field)))
        for name, field in sig.output_fields.items():
            outputs[name] = (field.annotation or str, _desc(field))
    for name, annotation in (extra_outputs or {}).items():
        outputs[name] = (annotation, outputs.get(name, (None, ""))[1])
    # The class attribute: DSPy warns when an instance's forward is touched directly.
    params = [p for p in list(inspect.signature(type(program).forward).parameters.values())[1:]
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    inputs = {p.name: predictor_inputs.get(p.name, (str, "")) for p in params}
    for name in inputs:  # a forward() input is never also an output
        outputs.pop(name, None)
    return inputs, outputs


def _desc(field) -> str:
    extra = field.json_schema_extra or {}
    desc = extra.get("desc") or ""
    return "" if desc.startswith("${") else desc
