"""Every check a MaterializedView document must pass before any database work.

One module, used by the CLI, the operator and the demo alike: structure from
the CRD (``matview.schema``), then what a schema cannot say — identifiers
within PostgreSQL's limits, the query and predicates parsed by the real
PostgreSQL parser, durations and cron expressions, and the CRD's CEL rules
(mirrored here so the CLI enforces them too). All problems of a document are
reported together, each naming its field.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cronsim
import yaml

from matview import sqltext
from matview.constants import API_VERSION, DEFAULT_NAMESPACE, KIND, MAX_IDENTIFIER_BYTES
from matview.durations import parse_duration
from matview.errors import FieldError, SpecError
from matview.schema import apply_schema, openapi_schema
from matview.spec import (
    Grant,
    IndexSpec,
    MaterializedView,
    RefreshSpec,
    SecretRef,
    SupportingIndexSpec,
    deterministic_index_name,
)

_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_K8S_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

#: The smallest durations that make sense; below them a typo is far likelier than intent.
MIN_INTERVAL_SECONDS = 1.0
MIN_TIMEOUT_SECONDS = 1.0
MIN_LOCK_TIMEOUT_SECONDS = 0.01


def check_identifier(value: str, path: str, errors: list[FieldError]) -> None:
    """PostgreSQL identifiers: non-empty, at most 63 bytes, no NUL; every other character is fine."""
    if not isinstance(value, str):
        return  # the schema check has already reported the wrong type
    if not value:
        errors.append(FieldError(path, "must not be empty"))
    elif "\x00" in value:
        errors.append(FieldError(path, "must not contain a NUL character"))
    elif len(value.encode()) > MAX_IDENTIFIER_BYTES:
        errors.append(
            FieldError(
                path, f"is {len(value.encode())} bytes; PostgreSQL identifiers are at most {MAX_IDENTIFIER_BYTES}"
            )
        )


def _checked(check: Any, text: str, path: str, errors: list[FieldError]) -> Any:
    try:
        return check(text)
    except ValueError as exc:
        errors.append(FieldError(path, str(exc)))
        return None


def _duration(text: str | None, minimum: float, path: str, errors: list[FieldError]) -> float | None:
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        errors.append(FieldError(path, str(exc)))
        return None
    if seconds < minimum:
        errors.append(FieldError(path, f"{text} is too short; the minimum is {minimum:g}s"))
        return None
    return seconds


def check_cron(expression: str, time_zone: str | None = None) -> None:
    """Raise ValueError unless expression is a valid 5-field cron expression."""
    if len(expression.split()) != 5:
        raise ValueError(f"{expression!r} must have 5 fields (minute hour day-of-month month day-of-week)")
    zone = zoneinfo.ZoneInfo(time_zone) if time_zone else dt.UTC
    try:
        next(iter(cronsim.CronSim(expression, dt.datetime.now(zone))))
    except (cronsim.CronSimError, StopIteration) as exc:
        raise ValueError(f"{expression!r} is not a valid cron expression: {exc}") from None


def _index(raw: dict[str, Any], path: str, errors: list[FieldError]) -> dict[str, Any]:
    if not isinstance(raw.get("columns", []), list):
        raw = {**raw, "columns": []}
    for j, column in enumerate(raw.get("columns", [])):
        check_identifier(column, f"{path}.columns[{j}]", errors)
    if len(set(raw.get("columns", []))) != len(raw.get("columns", [])):
        errors.append(FieldError(f"{path}.columns", "lists a column twice"))
    if raw.get("name") is not None:
        check_identifier(raw["name"], f"{path}.name", errors)
    where = None
    if isinstance(raw.get("where"), str):
        where = _checked(sqltext.check_predicate, raw["where"], f"{path}.where", errors)
    return {
        "columns": tuple(raw.get("columns", ())),
        "unique": bool(raw.get("unique", False)),
        "where": where,
        "method": raw.get("method", "btree"),
        "name": raw.get("name"),
    }


def _metadata(document: dict[str, Any], errors: list[FieldError]) -> tuple[str, str, int | None]:
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        errors.append(FieldError("metadata", "is required and must be an object with a name"))
        return DEFAULT_NAMESPACE, "", None
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        errors.append(FieldError("metadata.name", "is required"))
        name = ""
    elif len(name) > 253 or not _K8S_NAME.match(name):
        errors.append(
            FieldError(
                "metadata.name", f"{name!r} is not a valid Kubernetes name (lower-case letters, digits, '-' and '.')"
            )
        )
    namespace = metadata.get("namespace", DEFAULT_NAMESPACE)
    if not isinstance(namespace, str) or not _K8S_NAMESPACE.match(namespace) or len(namespace) > 63:
        errors.append(FieldError("metadata.namespace", f"{namespace!r} is not a valid namespace name"))
        namespace = DEFAULT_NAMESPACE
    generation = metadata.get("generation")
    return namespace, name, generation if isinstance(generation, int) else None


def validate_document(document: Any, source: str = "") -> MaterializedView:
    """Validate one parsed document; return the typed spec or raise SpecError listing every problem."""
    errors: list[FieldError] = []
    if not isinstance(document, dict):
        raise SpecError(
            [FieldError("(document)", "must be a mapping with apiVersion, kind, metadata and spec")], source
        )
    if document.get("apiVersion") != API_VERSION:
        errors.append(FieldError("apiVersion", f"must be {API_VERSION}, got {_short(document.get('apiVersion'))}"))
    if document.get("kind") != KIND:
        errors.append(FieldError("kind", f"must be {KIND}, got {_short(document.get('kind'))}"))
    namespace, resource_name, generation = _metadata(document, errors)
    full = apply_schema(document, openapi_schema(), "", errors)
    spec: dict[str, Any] = full.get("spec") if isinstance(full.get("spec"), dict) else {}
    if errors and not spec:
        raise SpecError(errors, source)

    schema_name = spec.get("schema", "public") if isinstance(spec.get("schema", "public"), str) else "public"
    check_identifier(schema_name, "spec.schema", errors)
    view_name: str = spec["name"] if isinstance(spec.get("name"), str) else resource_name.replace("-", "_")
    if view_name or "name" in spec:
        check_identifier(view_name, "spec.name" if "name" in spec else "metadata.name", errors)

    query = None
    if isinstance(spec.get("query"), str):
        query = _checked(sqltext.check_query, spec["query"], "spec.query", errors)

    indexes = []
    for i, raw in enumerate(spec.get("indexes", [])):
        indexes.append(IndexSpec(**_index(raw, f"spec.indexes[{i}]", errors)))

    supporting = []
    for i, raw in enumerate(spec.get("supportingIndexes", [])):
        path = f"spec.supportingIndexes[{i}]"
        fields = _index(raw, path, errors)
        table = _checked(sqltext.parse_qualified_name, raw.get("table", ""), f"{path}.table", errors)
        if table is not None:
            check_identifier(table[0], f"{path}.table", errors)
            check_identifier(table[1], f"{path}.table", errors)
            supporting.append(SupportingIndexSpec(**fields, table_schema=table[0], table=table[1]))

    refresh = _refresh(spec.get("refresh", {}), indexes, errors)

    grants = []
    for i, raw in enumerate(spec.get("grants", [])):
        check_identifier(raw.get("role", ""), f"spec.grants[{i}].role", errors)
        grants.append(Grant(role=raw.get("role", ""), privileges=tuple(raw.get("privileges", ["SELECT"]))))
    seen_roles: set[str] = set()
    for i, grant in enumerate(grants):
        if grant.role in seen_roles:
            errors.append(FieldError(f"spec.grants[{i}].role", f"role {grant.role!r} is listed twice"))
        seen_roles.add(grant.role)

    secret = spec.get("database", {}).get("secretRef")
    secret_ref = SecretRef(name=secret["name"], key=secret.get("key", "uri")) if secret and "name" in secret else None

    _check_index_names(schema_name, view_name, indexes, supporting, errors)
    if errors or query is None:
        raise SpecError(errors, source)
    return MaterializedView(
        namespace=namespace,
        resource_name=resource_name,
        schema=schema_name,
        name=view_name,
        query=query,
        indexes=tuple(indexes),
        supporting_indexes=tuple(supporting),
        refresh=refresh,
        grants=tuple(grants),
        deletion_policy=spec.get("deletionPolicy", "Retain"),
        secret_ref=secret_ref,
        generation=generation,
    )


def _refresh(raw: dict[str, Any], indexes: list[IndexSpec], errors: list[FieldError]) -> RefreshSpec:
    path = "spec.refresh"
    interval = _duration(raw.get("interval"), MIN_INTERVAL_SECONDS, f"{path}.interval", errors)
    if raw.get("interval") is not None and raw.get("schedule") is not None:
        errors.append(FieldError(path, "set interval or schedule, not both"))
    zone = raw.get("timeZone")
    if zone is not None:
        if raw.get("schedule") is None:
            errors.append(FieldError(f"{path}.timeZone", "applies to schedule only"))
        try:
            zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            errors.append(FieldError(f"{path}.timeZone", f"{zone!r} is not an IANA time zone"))
            zone = None
    schedule = raw.get("schedule")
    if schedule is not None:
        try:
            check_cron(schedule, zone)
        except ValueError as exc:
            errors.append(FieldError(f"{path}.schedule", str(exc)))
    mode = raw.get("mode", "Auto")
    if mode == "Concurrent" and not any(index.usable_for_concurrent_refresh for index in indexes):
        errors.append(
            FieldError(f"{path}.mode", "Concurrent needs a unique index without a where clause in spec.indexes")
        )
    return RefreshSpec(
        interval_seconds=interval,
        schedule=schedule,
        time_zone=zone,
        mode=mode,
        timeout_seconds=_duration(raw.get("timeout", "5m"), MIN_TIMEOUT_SECONDS, f"{path}.timeout", errors) or 300.0,
        lock_timeout_seconds=_duration(
            raw.get("lockTimeout", "5s"), MIN_LOCK_TIMEOUT_SECONDS, f"{path}.lockTimeout", errors
        )
        or 5.0,
        only_if_changed=bool(raw.get("onlyIfChanged", False)),
        suspend=bool(raw.get("suspend", False)),
    )


def _check_index_names(
    schema_name: str,
    view_name: str,
    indexes: list[IndexSpec],
    supporting: list[SupportingIndexSpec],
    errors: list[FieldError],
) -> None:
    seen: dict[tuple[str, str], str] = {}
    entries: Iterable[tuple[str, str, str, IndexSpec]] = [
        *((f"spec.indexes[{i}]", schema_name, view_name, index) for i, index in enumerate(indexes)),
        *(
            (f"spec.supportingIndexes[{i}]", index.table_schema, index.table, index)
            for i, index in enumerate(supporting)
        ),
    ]
    for path, index_schema, table, index in entries:
        key = (index_schema, index.name or deterministic_index_name(table, index))
        if key in seen:
            errors.append(
                FieldError(path, f"index name {key[1]!r} is already used by {seen[key]} (same name or same definition)")
            )
        seen[key] = path


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_documents(text: str, source: str = "") -> list[MaterializedView]:
    """Parse YAML (one or more documents) and validate each; raise SpecError on the first bad one."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([FieldError("(yaml)", f"{where}{problem}")], source) from None
    if not documents:
        raise SpecError([FieldError("(yaml)", "no document found")], source)
    views = []
    for i, document in enumerate(documents):
        label = f"{source} document {i + 1}" if len(documents) > 1 else source
        views.append(validate_document(document, label))
    return views


def load_file(path: str | Path) -> list[MaterializedView]:
    """Read and validate a YAML file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([FieldError("(file)", exc.strerror or str(exc))], str(file)) from None
    return load_documents(text, str(file))


__all__ = ["check_cron", "check_identifier", "load_documents", "load_file", "validate_document"]
