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
import re
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
    return (Path(__file__).resolve().parents[2] / "crds" / _CRD_FILE).read_text(encoding="utf-8")


@functools.cache
def crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    document = yaml.safe_load(_crd_text())
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


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def apply_schema(value: Any, schema: dict[str, Any], path: str, errors: list[FieldError]) -> Any:
    """Validate value against schema, returning it with defaults filled in; append problems to errors."""
    expected = schema.get("type")
    if expected and not _type_matches(value, expected):
        errors.append(FieldError(path, f"must be {_TYPE_NAMES.get(expected, expected)}, got {_describe(value)}"))
        return value
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(str(v) for v in schema["enum"])
        errors.append(FieldError(path, f"must be one of {allowed}; got {_describe(value)}"))
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
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(FieldError(path, f"must be at most {schema['maxLength']} characters, got {len(value)}"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(FieldError(path, f"{_describe(value)} does not match the pattern {schema['pattern']}"))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(FieldError(path, f"must have at least {schema['minItems']} item(s)"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(FieldError(path, f"must have at most {schema['maxItems']} items, got {len(value)}"))
        items = schema.get("items", {})
        return [apply_schema(item, items, f"{path}[{i}]", errors) for i, item in enumerate(value)]
    if isinstance(value, dict) and "properties" in schema:
        properties: dict[str, Any] = schema["properties"]
        result: dict[str, Any] = {}
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if key not in properties:
                hint = difflib.get_close_matches(str(key), list(properties), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                errors.append(FieldError(child, f"unknown field{suggestion}"))
                continue
            result[key] = apply_schema(item, properties[key], child, errors)
        for key, child_schema in properties.items():
            if key not in result and "default" in child_schema and key not in value:
                result[key] = apply_schema(
                    copy.deepcopy(child_schema["default"]), child_schema, f"{path}.{key}" if path else key, errors
                )
        for key in schema.get("required", []):
            if key not in value:
                errors.append(FieldError(f"{path}.{key}" if path else key, "is required"))
        return result
    return value
