"""Structural validation driven by the CRD file itself.

The CRD in ``crds/`` is the single source of truth for the API's shape. The
apiserver enforces it in a cluster; this module applies the same
openAPIV3Schema (types, required fields, enums, bounds, patterns, defaults and
the rejection of unknown fields) to documents the CLI reads, so that a typo like
``refesh:`` fails the same way with or without Kubernetes.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
import reprlib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from matview.errors import FieldError

_CRD_FILE = "matview.dev_materializedviews.yaml"


def _crd_text() -> str:
    packaged = resources.files("matview") / "_crd.yaml"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # An editable install or a source checkout: the CRD sits in the repository.
    return (Path(__file__).resolve().parents[3] / "crds" / _CRD_FILE).read_text(encoding="utf-8")


@functools.cache
def crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict. Our own file: parsed by libyaml where PyYAML has it (every
    CLI command validates its files against it; the pure-Python parser took ~150 ms of a command's start)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    document = yaml.load(_crd_text(), Loader=loader)  # noqa: S506 - a safe loader, on our own packaged file
    assert isinstance(document, dict)
    return document


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the one served version."""
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


_TYPE_NAMES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
}


def _type_matches(value: Any, expected: str) -> bool:
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 50, 50, 4, 4


def describe(value: Any) -> str:
    """A short repr of a value from outside, bounded however large or deep the value is."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer beyond Python's int-to-text limit
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= 60 else text[:57] + "..."


_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")


def child_path(path: str, key: Any) -> str:
    """``spec.refresh``, or ``spec["odd key"]`` for a key that is not a plain name (empty, spaces, 5, ...)."""
    if isinstance(key, str) and _SIMPLE_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path or '(document)'}[{describe(key)}]"


#: Stands for a value of the wrong type: its parent leaves it out, so no later check ever sees it.
WRONG_TYPE: Any = object()


def apply_schema(value: Any, schema: dict[str, Any], path: str, errors: list[FieldError]) -> Any:
    """Validate value against schema, returning it with defaults filled in; append problems to errors.

    A value of the wrong type is reported once and left out of the result (``WRONG_TYPE`` at the top),
    so the checks that follow only ever see well-typed data.
    """
    expected = schema.get("type")
    if expected and not _type_matches(value, expected):
        errors.append(FieldError(path, f"must be {_TYPE_NAMES.get(expected, expected)}, got {describe(value)}"))
        return WRONG_TYPE
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(str(v) for v in schema["enum"])
        errors.append(FieldError(path, f"must be one of {allowed}; got {describe(value)}"))
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(
                FieldError(
                    path,
                    "must not be empty"
                    if schema["minLength"] == 1
                    else f"must be at least {schema['minLength']} characters",
                )
            )
        too_long = "maxLength" in schema and len(value) > schema["maxLength"]
        if too_long:
            errors.append(FieldError(path, f"must be at most {schema['maxLength']} characters, got {len(value)}"))
        elif "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(FieldError(path, f"{describe(value)} does not match the pattern {schema['pattern']}"))
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(FieldError(path, f"must be a finite number, got {describe(value)}"))
            return WRONG_TYPE
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(FieldError(path, f"must be at least {schema['minimum']}, got {describe(value)}"))
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(FieldError(path, f"must be at most {schema['maximum']}, got {describe(value)}"))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(FieldError(path, f"must have at least {schema['minItems']} item(s)"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            # Before looking at any item: 15,000 sources must not cost a deep check each to say "at most 32".
            errors.append(FieldError(path, f"must have at most {schema['maxItems']} items, got {len(value)}"))
            return WRONG_TYPE
        items = schema.get("items", {})
        checked = (apply_schema(item, items, f"{path}[{i}]", errors) for i, item in enumerate(value))
        return [item for item in checked if item is not WRONG_TYPE]
    if isinstance(value, dict) and "properties" in schema:
        properties: dict[str, Any] = schema["properties"]
        result: dict[str, Any] = {}
        for key, item in value.items():
            child = child_path(path, key)
            if key not in properties:
                hint = difflib.get_close_matches(str(key), list(properties), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                errors.append(FieldError(child, f"unknown field{suggestion}"))
                continue
            checked = apply_schema(item, properties[key], child, errors)
            if checked is not WRONG_TYPE:
                result[key] = checked
        for key, child_schema in properties.items():
            if key not in result and "default" in child_schema and key not in value:
                result[key] = apply_schema(
                    copy.deepcopy(child_schema["default"]), child_schema, child_path(path, key), errors
                )
        for key in schema.get("required", []):
            if key not in value:
                errors.append(FieldError(child_path(path, key), "is required"))
        return result
    return value
