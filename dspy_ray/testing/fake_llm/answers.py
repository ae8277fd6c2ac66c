"""How the fake answers: deterministic field values, the reply's content, and the response bodies.

Values are chosen from what DSPy sent (:mod:`dspy_ray.testing.fake_llm.prompt` reads it): the JSON
schema in ``response_format`` when there is one, else the output fields of the system message.
Literal / enum values are picked with a stable hash of the field name and the user text::

    >>> schema_value({"enum": ["low", "high"]}, "priority", "the printer is on fire", {})
    'low'
    >>> annotation_value("Optional[int]", "stars", "the printer is on fire")
    1
    >>> len(hashed_embedding("printer fire", dim=8))
    8
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import struct
import time
from typing import Any

from dspy_ray.testing.fake_llm.prompt import (
    demo_values,
    json_schema,
    last_text,
    literal_options,
    message_text,
    output_fields,
    schema_notes,
    snippet,
    split_top_level,
)
from dspy_ray.testing.fake_llm.settings import FakeSettings

MALFORMED_CONTENT = "I'm sorry, I cannot help with that ###"
_PY_TO_SCHEMA = {"int": "integer", "float": "number", "bool": "boolean", "list": "array", "tuple": "array",
                 "set": "array", "dict": "object", "NoneType": "null"}
_PASSAGE_ID = re.compile(r"^\[([^\]\s]+)\]", re.MULTILINE)
_WORD = re.compile(r"[a-z0-9]+")


def input_key(text: str) -> str:
    """The key the fake uses for an input: sha1 hex of the last user message's text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# -- embeddings ----------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def _word_slot(word: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


def hashed_embedding(text: str, dim: int = 256) -> list[float]:
    """The fake's embedding: a signed hashed bag of lower-cased words, L2 normalised (all zeros for no words)."""
    vector = [0.0] * dim
    for word in _WORD.findall(text.lower()):
        slot, sign = _word_slot(word, dim)
        vector[slot] += sign
    norm = sum(v * v for v in vector) ** 0.5
    return [v / norm for v in vector] if norm else vector


def embedding_body(inputs: list[str], dim: int, model: str, as_base64: bool) -> dict[str, Any]:
    """The ``/v1/embeddings`` response: one vector per input, as floats or base64 little-endian float32."""
    data = []
    for i, text in enumerate(inputs):
        vector = hashed_embedding(text, dim)
        value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(t) for t in inputs) // 4
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# -- field values --------------------------------------------------------------------


def _stable_index(key: str, n: int) -> int:
    return int(input_key(key)[:8], 16) % n


def _string_value(name: str, user: str) -> str:
    return f"{name} for {snippet(user)}"


def schema_value(schema: dict[str, Any], name: str, user: str, defs: dict[str, Any], depth: int = 0) -> Any:
    """A value that satisfies a (pydantic-style) JSON schema, chosen deterministically."""
    if depth > 20:  # a recursive model: stop nesting
        return None
    if "$ref" in schema:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combinator)
        if options:
            schema = next((s for s in options if s.get("type") != "null"), options[0])
            return schema_value(schema, name, user, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][_stable_index(name + user, len(schema["enum"]))]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):  # e.g. ["string", "null"]
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {key: schema_value(sub, key, user, defs, depth + 1) for key, sub in props.items()}
    return _scalar_value(kind, name, user)


def _scalar_value(kind: str, name: str, user: str) -> Any:
    """Deterministic value for a JSON-schema type name (``string``, ``integer``, ...)."""
    bit = _stable_index(name + user, 2)
    if kind == "array":
        return []
    if kind == "boolean":
        return bool(bit)
    if kind == "integer":
        return bit
    if kind == "number":
        return float(bit)
    if kind == "null":
        return None
    return _string_value(name, user)


def annotation_value(annotation: str, name: str, user: str) -> Any:
    """Deterministic value for a field whose type DSPy rendered as ``annotation``."""
    annotation = annotation.strip()
    for wrapper in ("Optional[", "Union["):
        if annotation.startswith(wrapper):
            inner = annotation[len(wrapper):-1]
            first = next((a for a in split_top_level(inner) if a.strip() != "NoneType"), "str")
            return annotation_value(first, name, user)
    if annotation.startswith("Literal["):
        options = literal_options(annotation)
        if options:
            return options[_stable_index(name + user, len(options))]
    base = annotation.split("[", 1)[0].strip()
    return _scalar_value(_PY_TO_SCHEMA.get(base, "string"), name, user) if base != "dict" else {}


def taught_values(messages: list[dict[str, Any]], gold: dict[str, Any], keyword: str) -> dict[str, Any]:
    """The gold values this prompt teaches: all with ``keyword`` in the system message, else those a demo shows."""
    if keyword and keyword.lower() in last_text(messages, "system").lower():
        return dict(gold)
    shown = demo_values(messages)
    return {k: v for k, v in gold.items() if (v if isinstance(v, str) else json.dumps(v)) in shown.get(k, ())}


# -- the chat answer -----------------------------------------------------------------


def answer_fields(body: dict[str, Any], settings: FakeSettings) -> dict[str, Any]:
    """The field values of the answer to ``body``, overrides applied."""
    messages = body.get("messages") or []
    user = last_text(messages, "user")
    schema = json_schema(body)
    if schema is not None:
        values = schema_value(schema, "", user, schema.get("$defs") or schema.get("definitions") or {})
        values = values if isinstance(values, dict) else {}
    else:
        system = last_text(messages, "system")
        notes = schema_notes(system)
        values = {name: schema_value(notes[name], name, user, notes[name].get("$defs") or {}) if name in notes
                  else annotation_value(kind, name, user) for name, kind in output_fields(system).items()}
    gold = settings.gold.get(input_key(user))
    if gold:
        values.update(taught_values(messages, gold, settings.gold_keyword))
    values.update(settings.answers.get(input_key(user), {}))
    if isinstance(values.get("citations"), list):
        # A cited-answer prompt lists passages as "[id] text": cite the first one shown, as a model would.
        values["citations"] = _PASSAGE_ID.findall(user)[:1]
    # Overrides replace the fields an answer has; with no known fields they are the answer.
    values.update({k: v for k, v in settings.field_overrides.items() if k in values or not values})
    return values


def answer_content(body: dict[str, Any], settings: FakeSettings) -> str:
    """Message content answering ``body``: ChatAdapter sections or a JSON object.

    ChatAdapter's system prompt ends its output format with ``[[ ## completed ## ]]``;
    JSONAdapter's also shows ``[[ ## input ## ]]`` markers but asks for JSON, so the
    ``completed`` marker (and no ``response_format``) is what selects the section format.
    """
    values = answer_fields(body, settings)
    system = last_text(body.get("messages") or [], "system")
    if body.get("response_format") is None and "[[ ## completed ## ]]" in system:
        sections = [f"[[ ## {k} ## ]]\n{v if isinstance(v, str) else json.dumps(v)}\n\n" for k, v in values.items()]
        return "".join(sections) + "[[ ## completed ## ]]"
    return json.dumps(values)


def completion_body(body: dict[str, Any], content: str, model: str, number: int) -> dict[str, Any]:
    """The ``/v1/chat/completions`` response carrying ``content`` in each of the ``n`` choices asked for."""
    prompt_tokens = sum(len(message_text(m)) for m in body["messages"] if isinstance(m, dict)) // 4
    completion_tokens = len(content) // 4
    choice_count = max(1, int(body.get("n") or 1))
    return {
        "id": f"chatcmpl-fake-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    for i in range(choice_count)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
