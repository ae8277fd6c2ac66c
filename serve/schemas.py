"""HTTP request/response models derived from a DSPy program's signature.

Inputs are the program's ``forward`` parameters (typed from the predictor's
input fields when names match); outputs are the task's declared output fields,
typed from the predictors' signatures (:mod:`dspy_ray.execution.signatures`), so ``Literal``
outputs become enums in the OpenAPI schema and a ``list[str]`` is a JSON array.

    >>> from programs.triage import CallTriager
    >>> api = ProgramAPI.from_program("triage", CallTriager(), ("priority", "category", "summary"))
    >>> sorted(api.request_model.model_fields), sorted(api.response_model.model_fields)
    (['transcript'], ['category', 'priority', 'summary'])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import dspy
from pydantic import BaseModel, ConfigDict, Field, create_model

from dspy_ray.execution.signatures import program_fields

MAX_TEXT_CHARS = 200_000  # per text input; the limit shows in the OpenAPI schema and in a 422


@dataclass(frozen=True)
class ProgramAPI:
    name: str
    request_model: type[BaseModel]
    response_model: type[BaseModel]
    batch_request_model: type[BaseModel]
    batch_response_model: type[BaseModel]

    @classmethod
    def from_program(cls, name: str, program: dspy.Module, output_fields: tuple[str, ...],
                     output_types: Mapping[str, Any] | None = None, max_batch: int = 256) -> ProgramAPI:
        inputs, typed = program_fields(program, output_types)
        outputs = {f: typed.get(f, (str, "")) for f in output_fields}
        title = "".join(part.title() for part in name.split("_"))
        request = create_model(
            f"{title}Request",
            __config__=ConfigDict(extra="forbid"),
            **{n: (a, Field(..., description=d, min_length=1, max_length=MAX_TEXT_CHARS) if a is str
                   else Field(..., description=d))
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
