"""Reading one output field from whatever a program returned: a ``dspy.Prediction``, an Example or a dict.

Rewards, metrics and checks all take "a prediction", which may also arrive as a
plain dict (a Serve response, a stored row).  Here, the lowest layer, so that
programs and the runtime above them read fields the same way.

    >>> import dspy
    >>> field_of(dspy.Prediction(answer="42"), "answer"), field_of({"answer": "42"}, "answer")
    ('42', '42')
    >>> field_of(dspy.Prediction(answer="42"), "citations") is None
    True
"""

from __future__ import annotations

from typing import Any


def field_of(output: Any, name: str) -> Any:
    """``output``'s field ``name``, None when it has none (or ``output`` is None).

    ``get`` first: on a Prediction it reads the field even when its name is also a method's (``items``).
    """
    get = getattr(output, "get", None)
    return get(name) if callable(get) else getattr(output, name, None)
