"""Reading what DSPy sent: message text, the output fields and their types, the JSON schema, the demos.

Pure text parsing, no answers chosen here (that is :mod:`dspy_ray.testing.fake_llm.answers`)::

    >>> output_fields("Your output fields are:\\n1. `priority` (Literal['low', 'high']): how urgent\\n")
    {'priority': "Literal['low', 'high']"}
    >>> demo_values([{"role": "assistant", "content": '{"priority": "high"}'}])
    {'priority': {'high'}}
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from typing import Any


def message_text(message: dict[str, Any]) -> str:
    """Text of one chat message; content may be a string or a list of content parts."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def last_text(messages: list[dict[str, Any]], role: str) -> str:
    """Text of the last message with ``role`` ("" when there is none)."""
    return next((message_text(m) for m in reversed(messages) if m.get("role") == role), "")


def snippet(user: str) -> str:
    """First 40 characters of the user text, without DSPy's markers and closing instruction."""
    text = re.sub(r"\[\[ ## \w+ ## \]\]", " ", user.split("\n\nRespond with", 1)[0])
    return " ".join(text.split())[:40]


def json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of a ``response_format`` of type ``json_schema``, else ``None``."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    schema = (fmt.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


_FIELD_LINE = re.compile(r"\s*(\d+)\.\s+`(\w+)`\s*\(")
_NEXT_SECTIONS = ("All interactions will be structured", "In adhering to this structure", "[[ ## ")


def balanced_end(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at ``text[start]`` (or len(text))."""
    depth, quote = 0, ""
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def output_fields(system: str) -> dict[str, str]:
    """Output field name -> annotation text, from DSPy's "Your output fields are:" block.

    DSPy writes numbered lines like ``1. `priority` (Literal['a', 'b']): desc``; a
    description may continue over several lines (blank ones included), so a field
    is a line carrying the next number in sequence, and the block ends where the
    next section ("All interactions ...", a ``[[ ## x ## ]]`` marker) begins.
    """
    _, found, rest = system.partition("Your output fields are:")
    fields: dict[str, str] = {}
    for line in rest.splitlines()[1:] if found else []:
        if line.startswith(_NEXT_SECTIONS):
            break
        match = _FIELD_LINE.match(line)
        if match and int(match.group(1)) == len(fields) + 1:
            paren = match.end() - 1
            fields[match.group(2)] = line[paren + 1:balanced_end(line, paren, "(", ")") - 1]
    return fields


_SCHEMA_NOTE = re.compile(r"\{(\w+)\}\s+# note: the value you produce must adhere to the JSON schema: (\{.*)")


def schema_notes(system: str) -> dict[str, dict[str, Any]]:
    """Field name -> JSON schema, from the notes DSPy adds for structured output types.

    ChatAdapter writes ``{field}  # note: ... adhere to the JSON schema: {...}``;
    JSONAdapter writes the same text as a JSON string value, so decode that first.
    """
    notes: dict[str, dict[str, Any]] = {}
    for line in system.splitlines():
        if "adhere to the JSON schema" not in line:
            continue
        with contextlib.suppress(ValueError):  # JSONAdapter: '"name": "{name}  # note: ... {\"type\"...}",'
            line = next(iter(json.loads("{" + line.strip().rstrip(",") + "}").values()))
        match = _SCHEMA_NOTE.search(line) if isinstance(line, str) else None
        if match:
            with contextlib.suppress(ValueError):
                notes[match.group(1)] = json.JSONDecoder().raw_decode(match.group(2))[0]
    return notes


def split_top_level(text: str) -> list[str]:
    """Split ``a, b[c, d], e`` on the commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*parts, current] if p.strip()]


def literal_options(annotation: str) -> list[Any]:
    """The values of a ``Literal[...]`` annotation, as Python values when they parse."""
    inner = annotation[len("Literal["):balanced_end(annotation, len("Literal"), "[", "]") - 1]
    try:
        return list(ast.literal_eval(f"[{inner}]"))
    except (ValueError, SyntaxError):
        return [m.group(2) for m in re.finditer(r"(['\"])(.*?)\1", inner)]


def demo_values(messages: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Field -> values the demos show (assistant turns: JSON objects or ChatAdapter sections)."""
    shown: dict[str, set[str]] = {}
    for message in messages:
        if message.get("role") != "assistant":
            continue
        text = message_text(message)
        try:
            values = json.loads(text)
        except ValueError:
            values = dict(re.findall(r"\[\[ ## (\w+) ## \]\]\n(.*?)\n", text))
        for name, value in (values.items() if isinstance(values, dict) else ()):
            shown.setdefault(name, set()).add(value if isinstance(value, str) else json.dumps(value))
    return shown
