"""Generate the API reference (docs/api.md) from the CRD, so the docs cannot drift from the schema.

python -m matview.apidoc > docs/api.md
"""

from __future__ import annotations

from typing import Any

import yaml

from matview.api.schema import crd, openapi_schema


def _type(schema: dict[str, Any]) -> str:
    kind = str(schema.get("type", "object"))
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    return kind


def _rows(schema: dict[str, Any], path: str, required: set[str]) -> list[str]:
    rows = []
    for name, child in schema.get("properties", {}).items():
        field = f"{path}.{name}" if path else name
        facts = []
        if name in required:
            facts.append("required")
        if "default" in child:
            facts.append(f"default `{yaml_spelling(child['default'])}`")
        if "enum" in child:
            facts.append("one of " + ", ".join(f"`{v}`" for v in child["enum"]))
        if "maxLength" in child:
            facts.append(f"at most {child['maxLength']} characters")
        if "pattern" in child:
            facts.append(f"pattern `{child['pattern']}`")
        description = " ".join(str(child.get("description", "")).split())
        rows.append(f"| `{field}` | {_type(child)} | {'; '.join(facts)} | {description} |")
        nested = child.get("items", child) if child.get("type") == "array" else child
        if nested.get("properties"):
            rows += _rows(
                nested, field + ("[]" if child.get("type") == "array" else ""), set(nested.get("required", []))
            )
    return rows


def yaml_spelling(value: Any) -> str:
    """A value as a user writes it in YAML (false, [SELECT], {}), not as Python prints it (False, ['SELECT'])."""
    return str(yaml.safe_dump(value, default_flow_style=True, width=1000)).removesuffix("\n...\n").strip()


def render() -> str:
    definition = crd()
    version = definition["spec"]["versions"][0]
    names = definition["spec"]["names"]
    schema = openapi_schema()
    lines = [
        "# MaterializedView API reference",
        "",
        "Generated from `crds/matview.dev_materializedviews.yaml` by `python -m matview.apidoc`; "
        "a test fails when this file and the CRD disagree.",
        "",
        f"`apiVersion: {definition['spec']['group']}/{version['name']}`, `kind: {names['kind']}`, "
        f"short name `{names['shortNames'][0]}`, namespaced.",
        "",
        "## Rules checked by the apiserver (CEL) and by the CLI",
        "",
    ]
    spec_schema = schema["properties"]["spec"]
    for holder in (spec_schema, spec_schema["properties"]["refresh"]):
        for rule in holder.get("x-kubernetes-validations", []):
            lines.append(f"- {rule['message']}")
    for section in ("spec", "status"):
        lines += ["", f"## {section}", "", "| field | type | constraints | description |", "|---|---|---|---|"]
        lines += _rows(schema["properties"][section], section, set(schema["properties"][section].get("required", [])))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
