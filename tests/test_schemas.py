"""Every stored record is declared twice, as a pydantic model and as an Arrow schema: keep them equal.

(REVIEW 3.4 "Records".) A field added to one declaration only would be dropped on write or fail
on read, so the two must list the same fields in the same order, down through nested structs.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import pyarrow as pa
import pytest
from pydantic import BaseModel

from avr_core.schemas import RECORD_TYPES, ArrowRecord


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds: `M`, `M | None`, `list[M]`; else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found = {_model_in(arg) for arg in typing.get_args(annotation)} - {None}
        return found.pop() if len(found) == 1 else None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return _model_in(item)
    return None


def _struct_in(arrow_type: pa.DataType) -> pa.StructType | None:
    """The struct an Arrow type holds: `struct<...>` or `list<struct<...>>`; else None."""
    if pa.types.is_struct(arrow_type):
        return arrow_type
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _struct_in(arrow_type.value_type)
    return None


def _mismatches(model: type[BaseModel], names: list[str], types_: list[pa.DataType], where: str):
    """Every place where the model's fields and the Arrow fields differ, recursively."""
    fields = list(model.model_fields)
    if fields != names:
        yield f"{where}: pydantic {fields} != arrow {names}"
        return
    for name, arrow_type in zip(names, types_, strict=True):
        nested_model = _model_in(model.model_fields[name].annotation)
        struct = _struct_in(arrow_type)
        if (nested_model is None) != (struct is None):
            yield f"{where}.{name}: pydantic {nested_model} vs arrow {arrow_type}"
        elif nested_model is not None and struct is not None:
            nested = [struct.field(i) for i in range(struct.num_fields)]
            yield from _mismatches(
                nested_model, [f.name for f in nested], [f.type for f in nested], f"{where}.{name}"
            )


@pytest.mark.parametrize("record_type", list(RECORD_TYPES.values()), ids=list(RECORD_TYPES))
def test_pydantic_fields_equal_arrow_fields_in_order(record_type: type[ArrowRecord]) -> None:
    schema = record_type.arrow_schema
    assert list(record_type.model_fields) == schema.names
    assert list(_mismatches(record_type, schema.names, schema.types, record_type.__name__)) == []


def test_record_types_are_keyed_by_class_name() -> None:
    assert RECORD_TYPES and all(cls.__name__ == name for name, cls in RECORD_TYPES.items())
    assert all(issubclass(cls, ArrowRecord) for cls in RECORD_TYPES.values())
