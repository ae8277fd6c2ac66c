"""A JSONAdapter that computes what depends only on the signature once, not on every call.

DSPy's JSONAdapter rebuilds a pydantic model and its JSON schema (Literal -> enum)
for ``response_format`` and re-renders the system message on every call.  Both
depend only on the signature (and on whether the LM accepts a schema), so a
long-lived actor can compute them once (the schema's JSON text, too: see
:func:`dspy_ray.client.chat_http.response_format_json`).  A plain string input is put in the
user message as itself, without DSPy's per-value pydantic round trip.  The schema is what lets vLLM and
llama.cpp constrain decoding; small models cannot produce parseable JSON
without it.  The LM's capabilities, which DSPy resolves on a worker thread for every async
call (``acall``), are resolved once per LM.

    >>> import dspy
    >>> adapter = CachingJSONAdapter()
    >>> sig = dspy.Signature("question -> answer")
    >>> adapter.format_system_message(sig) is adapter.format_system_message(sig)
    True
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import dspy
import json_repair
import pydantic
import regex
from dspy.adapters.json_adapter import _get_structured_outputs_response_format, _has_open_ended_mapping
from dspy.adapters.utils import apply_output_field_defaults, format_field_value, parse_value
from dspy.utils.exceptions import AdapterParseError
from dspy.adapters.types.tool import ToolCalls
from dspy.clients.capabilities import _planning, capabilities, planning_scope


def response_schema(signature: type[dspy.Signature]) -> dict[str, Any]:
    """The JSON schema the endpoint is asked to follow for ``signature``'s outputs."""
    return _get_structured_outputs_response_format(signature).model_json_schema()


class CachingJSONAdapter(dspy.JSONAdapter):
    """``dspy.JSONAdapter`` with per-signature caches; behaviour is unchanged."""

    # Every Adapter subclass wraps its ``format`` and ``parse`` in DSPy's callback wrapper (``__init_subclass__``),
    # also when inherited: the plain functions here get one wrapper, not one per class above this one.
    format = inspect.unwrap(dspy.JSONAdapter.format)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Signatures are classes; Refine creates throwaway ones (hint fields),
        # so weak keys let those be collected.
        self._formats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._system: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._requirements: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._inputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # signature -> (input fields, history)
        self._outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # signature -> output fields
        self._tool_inputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # signature -> field name or None
        self._tool_outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lm_caps: dict[int, tuple[bool, bool]] = {}
        self._lm_full_caps: dict[int, Any] = {}  # DSPy's Capabilities of each LM, for async calls

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        # DSPy resolves the LM's capabilities on a worker thread for every async call (``prepare_async``:
        # ~50 us of CPU and a thread hop); they depend on the LM only, so they are resolved once, here.
        with planning_scope(lm, lm_kwargs):
            scope = _planning.get()
            if scope is not None and scope.lm is lm and scope.value is None:
                scope.value = self._capabilities_of(lm)
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)

    def _capabilities_of(self, lm):
        key = hash((type(lm), lm.model))
        caps = self._lm_full_caps.get(key)
        if caps is None:
            caps = self._lm_full_caps[key] = capabilities(lm)
        return caps

    def _lm_capabilities(self, lm) -> tuple[bool, bool]:
        # Copies of one LM share the engine spec and providers; the model string identifies it.
        key = hash((type(lm), lm.model))
        caps = self._lm_caps.get(key)
        if caps is None:
            caps = ("response_format" in lm.supported_params, bool(lm.supports_response_schema))
            self._lm_caps[key] = caps
        return caps

    def _prepare_response_format(self, lm, lm_kwargs, signature):
        accepts_format, accepts_schema = self._lm_capabilities(lm)
        if not accepts_format:
            return
        per_signature = self._formats.setdefault(signature, {})
        key = (accepts_schema, self.use_native_function_calling)
        if key not in per_signature:
            per_signature[key] = self._build_format(signature, accepts_schema)
        lm_kwargs["response_format"] = per_signature[key]

    def _build_format(self, signature, accepts_schema: bool):
        has_tool_calls = any(f.annotation == ToolCalls for f in signature.output_fields.values())
        if _has_open_ended_mapping(signature) or (not self.use_native_function_calling and has_tool_calls):
            return {"type": "json_object"}
        if not accepts_schema:
            return {"type": "json_object"}
        try:
            return _get_structured_outputs_response_format(signature, self.use_native_function_calling)
        except (ValueError, pydantic.PydanticInvalidForJsonSchema, pydantic.PydanticSchemaGenerationError):
            return {"type": "json_object"}

    def format_system_message(self, signature) -> str:
        cached = self._system.get(signature)
        if cached is None:
            cached = self._system[signature] = super().format_system_message(signature)
        return cached

    def format_user_message_content(self, signature, inputs, prefix: str = "", suffix: str = "",
                                    main_request: bool = False) -> str:
        # ChatAdapter's, with a short cut: a plain ``str`` input is formatted as itself (DSPy builds a
        # pydantic TypeAdapter per value to find that out); anything else goes through DSPy's formatting.
        messages = [prefix]
        for name, info in self._input_fields(signature)[0]:
            if name in inputs:
                value = inputs.get(name)
                text = value if type(value) is str else format_field_value(field_info=info, value=value)
                messages.append(f"[[ ## {name} ## ]]\n{text}")
        if main_request:
            requirements = self.user_message_output_requirements(signature)
            if requirements is not None:
                messages.append(requirements)
        messages.append(suffix)
        return "\n\n".join(messages).strip()

    def parse(self, signature, completion: str) -> dict[str, Any]:
        # JSONAdapter.parse (DSPy 3.4.1), reading the signature's output fields once: DSPy rebuilds that dict
        # from the pydantic fields on every read, and its parse reads it twice per field.
        fields = json_repair.loads(completion)
        if not isinstance(fields, dict):
            match = regex.search(r"\{(?:[^{}]|(?R))*\}", completion, regex.DOTALL)
            if match:
                completion = match.group(0)
                fields = json_repair.loads(completion)
        if not isinstance(fields, dict):
            raise AdapterParseError(adapter_name="JSONAdapter", signature=signature, lm_response=completion,
                                    message="LM response cannot be serialized to a JSON object.")
        outputs = self._output_fields(signature)
        fields = {k: v for k, v in fields.items() if k in outputs}
        for k, v in fields.items():
            try:
                fields[k] = parse_value(v, outputs[k].annotation)
            except ValueError as exc:
                raise AdapterParseError(adapter_name=type(self).__name__, signature=signature, lm_response=completion,
                                        message=f"Failed to parse field {k}: {exc}", parsed_result=fields) from exc
        fields = apply_output_field_defaults(signature, fields)
        if fields.keys() != outputs.keys():
            raise AdapterParseError(adapter_name="JSONAdapter", signature=signature, lm_response=completion,
                                    parsed_result=fields)
        return fields

    # Which input / output field carries tools: asked on every call, a scan of the signature's fields each time.
    def _get_tool_call_input_field_name(self, signature) -> str | None:
        return _memo(self._tool_inputs, signature, super()._get_tool_call_input_field_name)

    def _get_tool_call_output_field_name(self, signature) -> str | None:
        return _memo(self._tool_outputs, signature, super()._get_tool_call_output_field_name)

    def _output_fields(self, signature) -> dict[str, Any]:
        cached = self._outputs.get(signature)
        if cached is None:
            cached = self._outputs[signature] = signature.output_fields
        return cached

    def _input_fields(self, signature) -> tuple[list, str | None]:
        # DSPy rebuilds signature.input_fields (a scan of the pydantic fields) each time it is read.
        cached = self._inputs.get(signature)
        if cached is None:
            items = list(signature.input_fields.items())
            cached = self._inputs[signature] = (items, super()._get_history_field_name(signature))
        return cached

    def _get_history_field_name(self, signature) -> str | None:
        return self._input_fields(signature)[1]

    def user_message_output_requirements(self, signature) -> str:
        cached = self._requirements.get(signature)
        if cached is None:
            cached = self._requirements[signature] = super().user_message_output_requirements(signature)
        return cached


_MISSING = object()


def _memo(cache: weakref.WeakKeyDictionary, signature, compute):
    """``compute(signature)``, once per signature (None is an answer too)."""
    value = cache.get(signature, _MISSING)
    if value is _MISSING:
        value = cache[signature] = compute(signature)
    return value
