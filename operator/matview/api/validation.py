"""Every check a MaterializedView document must pass before any database work.

One module, used by the CLI, the operator and the demo alike: structure from
the CRD (``matview.api.schema``), then what a schema cannot say — identifiers
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cronsim
import yaml

from matview.api import boundedyaml, sqltext
from matview.api.durations import parse_duration
from matview.api.schema import apply_schema, describe, openapi_schema
from matview.api.spec import (
    MODES_BY_STORAGE,
    CaptureMethod,
    Grant,
    IncrementalSpec,
    IndexSpec,
    KeySource,
    MaterializedView,
    PartitionBy,
    PartitioningSpec,
    PartitionPeriod,
    PartitionSource,
    RefreshMode,
    RefreshSpec,
    Retention,
    SecretRef,
    Storage,
    SupportingIndexSpec,
    deterministic_index_name,
)
from matview.constants import API_VERSION, DEFAULT_NAMESPACE, KIND, MAX_IDENTIFIER_BYTES
from matview.errors import FieldError, SpecError

_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_K8S_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

#: PostgreSQL's largest statement_timeout and lock_timeout: 2,147,483,647 ms, just over 596 hours.
MAX_POSTGRES_TIMEOUT_SECONDS = 596 * 3600.0


@dataclass(frozen=True)
class DurationBounds:
    """The range of one duration field; the CRD's CEL rules state the same numbers (a test compares them)."""

    minimum: float
    """Below it a typo is far likelier than intent."""
    maximum: float
    """Above it PostgreSQL or the scheduler would refuse the value later, when it is too late to say why."""


DURATION_BOUNDS: dict[str, DurationBounds] = {
    "interval": DurationBounds(1.0, 8784 * 3600.0),  # 366 days: a rarer refresh is a cron schedule
    "timeout": DurationBounds(1.0, MAX_POSTGRES_TIMEOUT_SECONDS),
    "lockTimeout": DurationBounds(0.01, MAX_POSTGRES_TIMEOUT_SECONDS),
    "targetLag": DurationBounds(1.0, 8784 * 3600.0),
    "verifyInterval": DurationBounds(1.0, 8784 * 3600.0),
}


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


def _duration(raw: dict[str, Any], key: str, path: str, errors: list[FieldError]) -> float | None:
    text = raw.get(key)
    if text is None:
        return None
    bounds = DURATION_BOUNDS[key]
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        errors.append(FieldError(f"{path}.{key}", str(exc)))
        return None
    if seconds < bounds.minimum:
        errors.append(FieldError(f"{path}.{key}", f"{text} is too short; the minimum is {bounds.minimum:g}s"))
        return None
    if seconds > bounds.maximum:
        errors.append(
            FieldError(f"{path}.{key}", f"{describe(text)} is too long; the maximum is {bounds.maximum / 3600:g}h")
        )
        return None
    return seconds


def check_cron(expression: str, time_zone: str | None = None) -> None:
    """Raise ValueError unless expression is a valid 5-field cron expression."""
    if len(expression.split()) != 5:
        raise ValueError(f"{describe(expression)} must have 5 fields (minute hour day-of-month month day-of-week)")
    zone = zoneinfo.ZoneInfo(time_zone) if time_zone else dt.UTC
    try:
        next(iter(cronsim.CronSim(expression, dt.datetime.now(zone))))
    except (cronsim.CronSimError, StopIteration, ValueError, OverflowError) as exc:
        raise ValueError(f"{describe(expression)} is not a valid cron expression: {exc}") from None


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
                "metadata.name",
                f"{describe(name)} is not a valid Kubernetes name (lower-case letters, digits, '-' and '.')",
            )
        )
    namespace = metadata.get("namespace", DEFAULT_NAMESPACE)
    if not isinstance(namespace, str) or not _K8S_NAMESPACE.match(namespace) or len(namespace) > 63:
        errors.append(FieldError("metadata.namespace", f"{describe(namespace)} is not a valid namespace name"))
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
        errors.append(FieldError("apiVersion", f"must be {API_VERSION}, got {describe(document.get('apiVersion'))}"))
    if document.get("kind") != KIND:
        errors.append(FieldError("kind", f"must be {KIND}, got {describe(document.get('kind'))}"))
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

    search_path = _search_path(spec.get("searchPath", []), errors)
    run_as_role = spec.get("runAsRole")
    if run_as_role is not None:
        check_identifier(run_as_role, "spec.runAsRole", errors)

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
    storage = Storage(spec["storage"]) if spec.get("storage") in set(Storage) else Storage.MATERIALIZED_VIEW
    incremental = _incremental(spec.get("incremental"), storage, refresh, errors)
    partitioning = _partitioning(spec.get("partitioning"), storage, indexes, errors)

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
        search_path=search_path,
        run_as_role=run_as_role,
        storage=storage,
        incremental=incremental,
        partitioning=partitioning,
    )


def _incremental(
    raw: dict[str, Any] | None, storage: Storage, refresh: RefreshSpec, errors: list[FieldError]
) -> IncrementalSpec | None:
    """spec.incremental, and the CEL rules that tie storage, mode, targetLag and incremental together."""
    mode = refresh.mode
    if mode not in MODES_BY_STORAGE[storage]:
        allowed = ", ".join(sorted(MODES_BY_STORAGE[storage]))
        errors.append(FieldError("spec.refresh.mode", f"{mode} does not apply to storage {storage}; use {allowed}"))
    if raw is None:
        if mode == RefreshMode.INCREMENTAL:
            errors.append(FieldError("spec.refresh.mode", "Incremental needs spec.incremental"))
        if refresh.target_lag_seconds is not None:
            errors.append(FieldError("spec.refresh.targetLag", "needs spec.incremental"))
        return None
    path = "spec.incremental"
    if storage is not Storage.TABLE:
        errors.append(FieldError(path, "needs storage Table (a materialized view cannot take row changes)"))
    keys = tuple(raw.get("keyColumns", []))
    for i, column in enumerate(keys):
        check_identifier(column, f"{path}.keyColumns[{i}]", errors)
    if len(set(keys)) != len(keys):
        errors.append(FieldError(f"{path}.keyColumns", "lists a column twice"))
    sources: list[KeySource] = []
    for i, source in enumerate(raw.get("sources", [])):
        where = f"{path}.sources[{i}]"
        columns = tuple(source.get("columns", []))
        for j, column in enumerate(columns):
            check_identifier(column, f"{where}.columns[{j}]", errors)
        if len(columns) != len(keys):
            errors.append(FieldError(f"{where}.columns", f"names {len(columns)} column(s); keyColumns has {len(keys)}"))
        table = _source_table(source, where, [s.relation for s in sources], errors)
        append_only = source.get("appendOnly")
        append_only_column = None
        if append_only is not None:
            append_only_column = str(append_only.get("column", ""))
            check_identifier(append_only_column, f"{where}.appendOnly.column", errors)
        if table is not None:
            sources.append(KeySource(table[0], table[1], columns, append_only_column))
    method = CaptureMethod(raw.get("capture", CaptureMethod.TRIGGERS))
    appended = [i for i, source in enumerate(raw.get("sources", [])) if source.get("appendOnly") is not None]
    if appended and method == CaptureMethod.LOGICAL_DECODING:
        errors.append(
            FieldError(
                f"{path}.sources[{appended[0]}].appendOnly",
                "needs capture Triggers: logical decoding already costs a writer nothing",
            )
        )
    if appended and raw.get("liveView"):
        errors.append(
            FieldError(
                f"{path}.sources[{appended[0]}].appendOnly",
                "cannot be combined with liveView: the live view reads the change log, and rows appended since the "
                "last refresh are read from the table only by the next refresh",
            )
        )
    if method == CaptureMethod.LOGICAL_DECODING and raw.get("liveView"):
        errors.append(
            FieldError(
                f"{path}.liveView",
                "needs capture Triggers: the live view reads keys the moment their writes commit, and logical "
                "decoding delivers them at the next refresh",
            )
        )
    return IncrementalSpec(
        key_columns=keys,
        sources=tuple(sources),
        full_rebuild_ratio=None if raw.get("fullRebuildRatio") is None else float(raw["fullRebuildRatio"]),
        verify_interval_seconds=_duration(raw, "verifyInterval", path, errors),
        rebuild_on_mismatch=bool(raw.get("rebuildOnMismatch", False)),
        live_view=bool(raw.get("liveView", False)),
        capture=method,
    )


def _source_table(
    source: dict[str, Any], where: str, listed: list[tuple[str, str]], errors: list[FieldError]
) -> tuple[str, str] | None:
    """A declared source's ``table`` (schema.table, both valid names, not listed before), or None."""
    table = _checked(sqltext.parse_qualified_name, source.get("table", ""), f"{where}.table", errors)
    if table is None:
        return None
    check_identifier(table[0], f"{where}.table", errors)
    check_identifier(table[1], f"{where}.table", errors)
    if table in listed:
        errors.append(FieldError(f"{where}.table", f"{table[0]}.{table[1]} is listed twice"))
        return None
    return (table[0], table[1])


def _partitioning(
    raw: dict[str, Any] | None, storage: Storage, indexes: list[IndexSpec], errors: list[FieldError]
) -> PartitioningSpec | None:
    """spec.partitioning, its CEL rules, and what PostgreSQL requires of a partitioned table's unique indexes."""
    if raw is None:
        return None
    path = "spec.partitioning"
    if storage is not Storage.TABLE:
        errors.append(FieldError(path, "needs storage Table (a materialized view cannot be partitioned)"))
    column = raw.get("column", "")
    refused_before = len(errors)
    check_identifier(column, f"{path}.column", errors)
    column_valid = len(errors) == refused_before  # else refused already, by name: not echoed in other messages
    by = PartitionBy(raw["by"]) if raw.get("by") in set(PartitionBy) else PartitionBy.LIST
    period = PartitionPeriod(raw["period"]) if raw.get("period") in set(PartitionPeriod) else None
    if by is PartitionBy.RANGE and period is None:
        errors.append(FieldError(f"{path}.period", "is required with by Range (Day, Week or Month)"))
    if by is PartitionBy.LIST:
        for key in ("period", "ahead", "sources", "retain"):
            if key in raw:
                errors.append(FieldError(f"{path}.{key}", "applies only to by Range"))
    sources: list[PartitionSource] = []
    for i, source in enumerate(raw.get("sources", [])):
        where = f"{path}.sources[{i}]"
        source_column = source.get("column", "")
        check_identifier(source_column, f"{where}.column", errors)
        table = _source_table(source, where, [s.relation for s in sources], errors)
        if table is not None:
            sources.append(PartitionSource(table[0], table[1], source_column))
    for i, index in enumerate(indexes):
        if index.unique and column_valid and column not in index.columns:
            errors.append(
                FieldError(
                    f"spec.indexes[{i}].columns",
                    f"a unique index of a partitioned view must include the partition column {column!r} "
                    "(PostgreSQL enforces uniqueness within each partition only); add it to the columns",
                )
            )
    retain = None
    if isinstance(raw.get("retain"), str):
        matched = _RETAIN.fullmatch(raw["retain"])
        if matched is None:
            errors.append(
                FieldError(f"{path}.retain", f"{describe(raw['retain'])} is not a window such as 26w, 180d or 12mo")
            )
        else:
            retain = Retention(int(matched.group(1)), matched.group(2))  # type: ignore[arg-type]
    return PartitioningSpec(
        column=column,
        by=by,
        period=period,
        ahead=int(raw.get("ahead", 0)),
        sources=tuple(sources),
        retain=retain,
    )


_RETAIN = re.compile(r"([1-9][0-9]{0,3})(d|w|mo)")


#: Schemas that are always on the pinned search_path, in a fixed place (see matview.plan.executor).
_PINNED_SCHEMAS = {
    "pg_catalog": "is always searched first",
    "pg_temp": "is always searched last (listing it would let temporary objects shadow names)",
}


def _search_path(raw: list[str], errors: list[FieldError]) -> tuple[str, ...]:
    seen: set[str] = set()
    for i, schema in enumerate(raw):
        path = f"spec.searchPath[{i}]"
        check_identifier(schema, path, errors)
        pinned = _PINNED_SCHEMAS.get("pg_temp" if schema.startswith("pg_temp") else schema)
        if pinned:
            errors.append(FieldError(path, f"{describe(schema)} {pinned}; do not list it"))
        if schema in seen:
            errors.append(FieldError(path, f"schema {describe(schema)} is listed twice"))
        seen.add(schema)
    return tuple(raw)


def _refresh(raw: dict[str, Any], indexes: list[IndexSpec], errors: list[FieldError]) -> RefreshSpec:
    path = "spec.refresh"
    interval = _duration(raw, "interval", path, errors)
    if raw.get("interval") is not None and raw.get("schedule") is not None:
        errors.append(FieldError(path, "set interval or schedule, not both"))
    target_lag = _duration(raw, "targetLag", path, errors)
    if raw.get("targetLag") is not None and (raw.get("interval") is not None or raw.get("schedule") is not None):
        errors.append(FieldError(f"{path}.targetLag", "replaces interval and schedule; set only one of them"))
    zone = raw.get("timeZone")
    if zone is not None:
        if raw.get("schedule") is None:
            errors.append(FieldError(f"{path}.timeZone", "applies to schedule only"))
        try:
            zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            errors.append(FieldError(f"{path}.timeZone", f"{describe(zone)} is not an IANA time zone"))
            zone = None
    schedule = raw.get("schedule")
    if schedule is not None:
        try:
            check_cron(schedule, zone)
        except ValueError as exc:
            errors.append(FieldError(f"{path}.schedule", str(exc)))
    mode = RefreshMode(raw["mode"]) if raw.get("mode") in set(RefreshMode) else RefreshMode.AUTO  # else reported
    if mode == RefreshMode.CONCURRENT and not any(index.usable_for_concurrent_refresh for index in indexes):
        errors.append(
            FieldError(f"{path}.mode", "Concurrent needs a unique index without a where clause in spec.indexes")
        )
    return RefreshSpec(
        interval_seconds=interval,
        schedule=schedule,
        time_zone=zone,
        mode=mode,
        timeout_seconds=_duration(raw, "timeout", path, errors) or RefreshSpec.timeout_seconds,
        lock_timeout_seconds=_duration(raw, "lockTimeout", path, errors) or RefreshSpec.lock_timeout_seconds,
        only_if_changed=bool(raw.get("onlyIfChanged", False)),
        suspend=bool(raw.get("suspend", False)),
        target_lag_seconds=target_lag,
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


def load_documents(text: str, source: str = "") -> list[MaterializedView]:
    """Parse YAML (one or more documents, within boundedyaml's limits) and validate each;
    raise SpecError on the first bad one."""
    try:
        documents = boundedyaml.load_all(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise SpecError([FieldError("(yaml)", f"{where}{problem}")], source) from None
    if not documents:
        raise SpecError([FieldError("(yaml)", "no document found")], source)
    views = []
    for i, document in enumerate(documents):
        label = f"{source} document {i + 1}" if len(documents) > 1 else source
        views.append(validate_document(document, label))
    return views


def read_spec_file(path: str | Path) -> bytes:
    """A spec file's bytes, bounded as boundedyaml bounds its text: what load_bytes validates."""
    file = Path(path)
    try:
        with file.open("rb") as stream:
            data = stream.read(boundedyaml.MAX_BYTES + 1)
    except OSError as exc:
        raise SpecError([FieldError("(file)", exc.strerror or str(exc))], str(file)) from None
    if len(data) > boundedyaml.MAX_BYTES:
        raise SpecError([FieldError("(file)", f"is larger than {boundedyaml.MAX_BYTES} bytes")], str(file))
    return data


def load_bytes(data: bytes, source: str) -> list[MaterializedView]:
    """Validate a file's bytes as read by read_spec_file (a caller that keeps them knows what it loaded)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([FieldError("(file)", f"is not UTF-8 text (byte {exc.start + 1})")], source) from None
    return load_documents(text, source)


def load_file(path: str | Path) -> list[MaterializedView]:
    """Read and validate a YAML file."""
    return load_bytes(read_spec_file(path), str(Path(path)))


__all__ = [
    "check_cron",
    "check_identifier",
    "load_bytes",
    "load_documents",
    "load_file",
    "read_spec_file",
    "validate_document",
]
