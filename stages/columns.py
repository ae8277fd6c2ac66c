"""Typed output columns: a program's output annotation becomes the matching Arrow type.

    >>> from typing import Literal
    >>> arrow_type(list[str]), arrow_type(int), arrow_type(Literal["a", "b"]), arrow_type(bool | None)
    (ListType(list<item: string>), DataType(int64), DataType(string), DataType(bool))

``str`` and ``Literal`` of strings are strings; ``int``, ``float``, ``bool``
keep their types; ``list[X]``/``tuple[X, ...]`` are Arrow lists; a pydantic
model is a struct of its fields; anything else (dicts, unions of several
types) is stored as JSON text.  A value that does not fit its column (rare:
the JSON adapter already parsed it to the annotation) becomes null, and
:func:`to_column` says which rows so the stage can note it in ``errors``.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal, get_args, get_origin

import pyarrow as pa
import pydantic


def _strip_optional(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def arrow_type(annotation: Any) -> pa.DataType:
    annotation = _strip_optional(annotation)
    origin = get_origin(annotation)
    if annotation is str or annotation is None or annotation is Any:
        return pa.string()
    if annotation is bool:
        return pa.bool_()
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    if origin is Literal:
        kinds = {type(v) for v in get_args(annotation)}
        return arrow_type(kinds.pop()) if len(kinds) == 1 else pa.string()
    if origin in (list, tuple, set, frozenset):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if origin is tuple and len(set(args)) > 1:
            return pa.string()
        return pa.list_(arrow_type(args[0] if args else str))
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return pa.struct([(name, arrow_type(f.annotation)) for name, f in annotation.model_fields.items()])
    return pa.string()


def _plain(value: Any, typ: pa.DataType) -> Any:
    """A Python value Arrow can take for ``typ``."""
    if value is None:
        return None
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump(mode="json")
    if pa.types.is_string(typ):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if pa.types.is_list(typ):
        return [_plain(v, typ.value_type) for v in value]
    if pa.types.is_struct(typ) and isinstance(value, dict):
        return {typ.field(i).name: _plain(value.get(typ.field(i).name), typ.field(i).type)
                for i in range(typ.num_fields)}
    return value


def to_column(values: list[Any], annotation: Any) -> tuple[pa.Array, list[int]]:
    """(Arrow array of ``annotation``'s type, indices of values that did not fit and became null)."""
    typ = arrow_type(annotation)
    plain = [_plain(v, typ) for v in values]
    try:
        return pa.array(plain, type=typ), []
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        pass
    kept, bad = [], []
    for i, value in enumerate(plain):
        try:
            pa.array([value], type=typ)
            kept.append(value)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            kept.append(None)
            bad.append(i)
    return pa.array(kept, type=typ), bad
