"""HTTP request/response models derived from a DSPy program's signature.

Inputs are the program's ``forward`` parameters (typed from the predictor's
input fields when names match); outputs are the output fields of its
predictors, so ``Literal`` outputs become enums in the OpenAPI schema.

    >>> from programs import CallTriager
    >>> api = ProgramAPI.from_program("triage", CallTriager())
    >>> sorted(api.request_model.model_fields), sorted(api.response_model.model_fields)
    (['transcript'], ['category', 'priority', 'summary'])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import dspy
from pydantic import BaseModel, ConfigDict, Field, create_model


@dataclass(frozen=True)
class ProgramAPI:
    name: str
    request_model: type[BaseModel]
    response_model: type[BaseModel]
    batch_request_model: type[BaseModel]
    batch_response_model: type[BaseModel]

    @classmethod
    def from_program(cls, name: str, program: dspy.Module, max_batch: int = 256) -> ProgramAPI:
        inputs, outputs = signature_fields(program)
        title = "".join(part.title() for part in name.split("_"))
        request = create_model(
            f"{title}Request",
            __config__=ConfigDict(extra="forbid", str_max_length=200_000),
            **{n: (a, Field(..., description=d, min_length=1) if a is str else Field(..., description=d))
               for n, (a, d) in inputs.items()},
        )
        response = create_model(
            f"{title}Response", **{n: (Optional[a], Field(None, description=d)) for n, (a, d) in outputs.items()}
        )
        batch_request = create_model(
            f"{title}BatchRequest",
            __config__=ConfigDict(extra="forbid"),
            items=(list[request], Field(..., min_length=1, max_length=max_batch)),
        )
        item = create_model(
            f"{title}BatchItem",
            output=(Optional[response], None),
            error=(Optional[str], Field(None, description="why this item has no output")),
        )
        batch_response = create_model(f"{title}BatchResponse", results=(list[item], ...))
        return cls(name, request, response, batch_request, batch_response)


def signature_fields(program: dspy.Module) -> tuple[dict[str, tuple[Any, str]], dict[str, tuple[Any, str]]]:
    """(inputs, outputs): name -> (annotation, description)."""
    predictor_inputs: dict[str, tuple[Any, str]] = {}
    outputs: dict[str, tuple[Any, str]] = {}
    for _, predictor in program.named_predictors():
        sig = predictor.signature
        for name, field in sig.input_fields.items():
            predictor_inputs.setdefault(name, (field.annotation or str, _desc(field)))
        for name, field in sig.output_fields.items():
            outputs[name] = (field.annotation or str, _desc(field))
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
