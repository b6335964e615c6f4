"""Refusals before anything runs: what the spec asks that the observed catalog makes impossible (a
supporting index on a missing column, an incremental declaration the query does not honour, a name held
by something else), each with the field to fix."""

from __future__ import annotations

from matview.api import sqltext
from matview.api.spec import MaterializedView, PartitionBy
from matview.errors import FieldError, UnmanagedObjectError
from matview.plan import capture, decoding
from matview.plan.observed import KeyType, Observed, TableState
from matview.plan.statements import is_ours, not_ours


def check_supporting(view: MaterializedView, observed: Observed) -> list[FieldError]:
    errors = []
    for i, index in enumerate(view.supporting_indexes):
        path = f"spec.supportingIndexes[{i}]"
        table = observed.tables.get((index.table_schema, index.table))
        label = f"{index.table_schema}.{index.table}"
        if table is None:
            errors.append(FieldError(f"{path}.table", f"table {label} does not exist"))
            continue
        if table.relkind in ("v", "m"):
            kind = "a view" if table.relkind == "v" else "a materialized view"
            errors.append(
                FieldError(
                    f"{path}.table",
                    f"{label} is {kind}, which cannot carry these indexes; "
                    "index the base tables the view reads instead",
                )
            )
            continue
        if table.relkind == "p":
            errors.append(
                FieldError(
                    f"{path}.table",
                    f"{label} is a partitioned table; CREATE INDEX "
                    "CONCURRENTLY cannot build on it, index its partitions instead",
                )
            )
            continue
        if table.relkind != "r":
            errors.append(FieldError(f"{path}.table", f"{label} is not a table"))
            continue
        for j, column in enumerate(index.columns):
            if column not in table.columns:
                errors.append(FieldError(f"{path}.columns[{j}]", f"column {column!r} does not exist in {label}"))
    return errors


def check_decoding(view: MaterializedView, observed: Observed) -> list[FieldError]:
    """LogicalDecoding: the server and the operator's role can decode, and no source can lose an old key.
    Refused before anything changes, each with its fix."""
    found = observed.decoding
    if not decoding.uses_decoding(view) or found is None:
        return []
    assert view.incremental is not None
    path = "spec.incremental.capture"
    errors = []
    if found.wal_level != "logical":
        errors.append(
            FieldError(
                path,
                f"LogicalDecoding needs wal_level = logical (the server has {found.wal_level!r}): "
                "ALTER SYSTEM SET wal_level = logical, then restart the server; or use capture Triggers",
            )
        )
    if not found.can_replicate:
        errors.append(
            FieldError(
                path,
                f"LogicalDecoding needs the operator's role {observed.current_user!r} to create and read "
                f"replication slots: ALTER ROLE {observed.current_user} REPLICATION",
            )
        )
    for i, source in enumerate(view.incremental.sources):
        problem = decoding.identity_problem(view, i, found.identities.get(source.relation))
        if problem:
            errors.append(FieldError(f"spec.incremental.sources[{i}].table", problem))
    return errors


def query_tables(key_catalog: sqltext.KeyCatalog) -> set[tuple[str, str]]:
    """Every relation holding data the query reads, through plain views (tables, MVs, foreign tables)."""
    return {r.name for r in key_catalog.values() if r.relkind != "v"}


def check_incremental(view: MaterializedView, observed: Observed) -> list[FieldError]:
    """Refuse a declaration that is provably wrong: unknown columns, a source the query does not read."""
    if view.incremental is None:
        return []
    path = "spec.incremental"
    errors = []
    names = {c for c, _ in observed.query_columns or ()}
    for i, column in enumerate(view.incremental.key_columns):
        if observed.query_columns is not None and column not in names:
            errors.append(FieldError(f"{path}.keyColumns[{i}]", f"column {column!r} is not in the query's result"))
        if column in capture.RESERVED_COLUMNS:
            errors.append(FieldError(f"{path}.keyColumns[{i}]", f"{column!r} is a name the change log reserves"))
    if observed.key_catalog_error is not None:
        errors.append(FieldError("spec.query", f"cannot follow the query to its sources: {observed.key_catalog_error}"))
    if observed.filtered_query_error is not None:
        errors.append(
            FieldError(
                "spec.query",
                "the key filter cannot be injected here (an incremental refresh reads each source through a "
                f"subquery with the source's name as its alias): {observed.filtered_query_error}; "
                "refer to columns as table.column or alias.column, never schema.table.column",
            )
        )
    read = query_tables(observed.key_catalog) if observed.key_catalog is not None else None
    own = {(view.schema, view.name), (view.schema, capture.changes_name(view))}
    builder = view.run_as_role or observed.current_user
    for i, source in enumerate(view.incremental.sources):
        where = f"{path}.sources[{i}]"
        label = f"{source.schema}.{source.table}"
        table = observed.tables.get(source.relation)
        if source.relation in own:
            errors.append(FieldError(f"{where}.table", f"{label} is this view's own storage or change log"))
            continue
        if table is None:
            errors.append(FieldError(f"{where}.table", f"table {label} does not exist"))
            continue
        if table.system:
            errors.append(
                FieldError(f"{where}.table", f"{label} is a system catalog: it cannot carry capture triggers")
            )
            continue
        if table.has_children:
            errors.append(
                FieldError(
                    f"{where}.table",
                    f"{label} is partitioned or has inheritance children: writes made directly to them fire "
                    "none of its triggers, so they would be missed; read the tables that hold the rows instead",
                )
            )
            continue
        if not table.readable:
            errors.append(
                FieldError(
                    f"{where}.table",
                    f"role {builder!r}, which builds this view, may not read {label}: "
                    "capture is installed only on tables the view's role can read",
                )
            )
            continue
        if table.relkind not in ("r", "p"):
            errors.append(
                FieldError(
                    f"{where}.table", f"{label} is not a table (relkind {table.relkind}); declare the tables behind it"
                )
            )
            continue
        in_the_way = observed.capture.triggers_in_the_way.get(source.relation) if observed.capture else None
        if in_the_way:
            errors.append(
                FieldError(
                    f"{where}.table",
                    f"{label} already has a {in_the_way}, not this view's capture function: the engine never "
                    "drops a trigger it did not make; drop or rename it",
                )
            )
        for j, column in enumerate(source.columns):
            if column not in table.columns:
                errors.append(FieldError(f"{where}.columns[{j}]", f"column {column!r} does not exist in {label}"))
                continue
            problem = _key_type_problem(view, observed, table, j, column)
            if problem:
                errors.append(FieldError(f"{where}.columns[{j}]", problem))
        if source.append_only_column is not None:
            problem = _append_only_problem(table, source.append_only_column, label)
            if problem:
                errors.append(FieldError(f"{where}.appendOnly.column", problem))
        if read is not None and source.relation not in read:
            errors.append(
                FieldError(f"{where}.table", f"{label} is not read by the query (directly or through plain views)")
            )
    if errors or observed.key_catalog is None:
        return errors
    try:
        result = capture.key_filtered_query(view, observed.key_catalog)
    except ValueError as exc:
        return [FieldError(path, f"cannot inject the key filter: {exc}")]
    for i, source in enumerate(view.incremental.sources):
        if source.relation not in result.filtered:
            errors.append(
                FieldError(
                    f"{path}.sources[{i}].table",
                    f"{source.schema}.{source.table} is read only where a filter cannot be injected "
                    "(through a materialized view or inside a function)",
                )
            )
    return errors


#: smallint, integer, bigint: what an identity or serial column is, and what the watermark is kept as (an int).
_APPEND_ONLY_TYPES = frozenset({21, 23, 20})


def _append_only_problem(table: TableState, column: str, label: str) -> str:
    """Why column cannot be an append-only source's increasing column. Its values must come from a sequence it
    owns, one at a time and increasing: the range drain bounds what it reads by that sequence's last value, and
    a value a session took earlier than one another session committed (a cache of values per session) could
    land below the recorded watermark and never be read (refresh/ranges.py)."""
    if column not in table.columns:
        return f"column {column!r} does not exist in {label}"
    position = table.columns.index(column)
    type_oid, _, found = table.column_types[position] if table.column_types else (0, 0, "")
    if table.column_types and type_oid not in _APPEND_ONLY_TYPES:
        return (
            f"column {column!r} is {found}; an append-only source is read by ranges of an integer column that each "
            "INSERT assigns increasing values (an identity or serial column): smallint, integer or bigint"
        )
    if not table.column_sequences:
        return ""
    sequence = table.column_sequences[position]
    if sequence is None:
        return (
            f"column {column!r} of {label} owns no sequence: an append-only source's values must come from its own "
            "identity or serial column (for a DEFAULT nextval of another sequence: ALTER SEQUENCE … OWNED BY "
            f"{label}.{column})"
        )
    if sequence.increment <= 0:
        return f"sequence {sequence.name} of column {column!r} counts down (INCREMENT {sequence.increment})"
    if sequence.cache > 1:
        return (
            f"sequence {sequence.name} of column {column!r} caches {sequence.cache} values per session: a session "
            "can insert a value lower than one another session committed since, which a range already read would "
            f"never see; ALTER SEQUENCE {sequence.name} CACHE 1"
        )
    if not sequence.readable:
        return (
            f"the operator's role may not read sequence {sequence.name} of column {column!r}, whose last value "
            f"bounds each range: GRANT SELECT ON SEQUENCE {sequence.name} TO the operator's role"
        )
    return ""


def _key_type_problem(view: MaterializedView, observed: Observed, table: TableState, position: int, column: str) -> str:
    """Why the source column cannot feed the key column at position (its value is stored in the key's type
    by every writer's trigger: a conversion that can fail would make the writer's statement fail)."""
    assert view.incremental is not None
    if position >= len(view.incremental.key_columns) or not table.column_types:
        return ""
    key = view.incremental.key_columns[position]
    key_type = observed.key_types.get(key)
    if key_type is None:
        return ""
    source_oid, source_typmod, source_type = table.column_types[table.columns.index(column)]
    if not key_type.hashable:
        return (
            f"key column {key!r} is {key_type.name}, which has no default equality and hash operator classes; "
            "declare a key of a type that has (e.g. cast json to text, or use jsonb)"
        )
    if key_type.equality_schema not in ("", "pg_catalog"):
        return (
            f"key column {key!r} is {key_type.name}, whose equality is {key_type.equality_schema}'s, not PostgreSQL's "
            "own: the engine compares keys with pg_catalog's operators only (an operator planted in a schema on the "
            "search path must never run in its statements), which would compare this type's keys differently from "
            "its own equality; declare a key of a built-in type"
        )
    if source_oid != key_type.oid or (key_type.typmod != -1 and key_type.typmod != source_typmod):
        return (
            f"column {column!r} is {source_type} but key column {key!r} is {key_type.name}: a written value that does "
            f"not convert would make the writer's statement fail; produce the key as {source_type} in the query"
        )
    return ""


def check_names_free(view: MaterializedView, observed: Observed) -> None:
    """A name the plan needs that belongs to something else stops the plan before any change."""
    for (schema, name), holder in observed.names_in_schema.items():
        marker = holder.marker
        if is_ours(view, observed, marker, holder.owner):
            continue
        if observed.relation is not None and name in observed.indexes and marker is None:
            continue  # an unmanaged index on our own view: converge leaves it alone
        raise UnmanagedObjectError(not_ours(f"relation {schema}.{name}", marker, holder.owner))


def source_drift(current: tuple[tuple[str, str], ...], wanted: tuple[tuple[str, str], ...]) -> str:
    if current == wanted:
        return ""
    before = {n: t for n, t in current}
    after = {n: t for n, t in wanted}
    parts = [f"+{n} {t}" for n, t in wanted if n not in before]
    parts += [f"-{n}" for n, _ in current if n not in after]
    parts += [f"{n} {before[n]} -> {after[n]}" for n, _ in wanted if n in before and before[n] != after[n]]
    return ", ".join(parts) or "column order changed"


#: What a range partition's column may be: its bounds are dates, which these compare with.
RANGE_COLUMN_TYPES = frozenset({"date", "timestamp without time zone", "timestamp with time zone"})


def check_partition_sources(view: MaterializedView, observed: Observed) -> list[FieldError]:
    """spec.partitioning.sources: tables the query reads, with a date or timestamp column of that name."""
    if view.partitioning is None or not view.partitioning.sources:
        return []
    errors = []
    if observed.key_catalog_error is not None and view.incremental is None:
        errors.append(FieldError("spec.query", f"cannot follow the query to its sources: {observed.key_catalog_error}"))
    read = query_tables(observed.key_catalog) if observed.key_catalog is not None else None
    for i, source in enumerate(view.partitioning.sources):
        where = f"spec.partitioning.sources[{i}]"
        label = f"{source.schema}.{source.table}"
        table = observed.tables.get(source.relation)
        if table is None:
            errors.append(FieldError(f"{where}.table", f"table {label} does not exist"))
            continue
        if read is not None and source.relation not in read:
            errors.append(FieldError(f"{where}.table", f"the query does not read {label}"))
        if view.incremental is not None and source.relation not in {s.relation for s in view.incremental.sources}:
            errors.append(
                FieldError(
                    f"{where}.table",
                    f"{label} must also be one of spec.incremental.sources: a partition of an incremental view is "
                    "rebuilt from the keys of its period's rows, which that declaration maps",
                )
            )
        types = dict(zip(table.columns, (t for _, _, t in table.column_types), strict=False))
        if source.column not in types:
            errors.append(FieldError(f"{where}.column", f"{label} has no column {source.column!r}"))
        elif types[source.column] not in RANGE_COLUMN_TYPES:
            errors.append(
                FieldError(
                    f"{where}.column",
                    f"{label}.{source.column} is of type {types[source.column]}; it must be a date or timestamp",
                )
            )
    return errors


def partition_column_errors(
    view: MaterializedView, column_types: dict[str, str], key: KeyType | None = None
) -> list[FieldError]:
    """spec.partitioning.column against the query's result: it must be there, a date for a range, and of a
    type PostgreSQL can partition by (default btree and hash operator classes)."""
    spec = view.partitioning
    if spec is None:
        return []
    path = "spec.partitioning.column"
    found = column_types.get(spec.column)
    if found is None:
        return [FieldError(path, f"column {spec.column!r} is not in the query's result")]
    if key is not None and not key.hashable:
        return [
            FieldError(
                path, f"column {spec.column!r} is of type {found}, which has no default btree and hash operator class"
            )
        ]
    if spec.by is PartitionBy.RANGE and found not in RANGE_COLUMN_TYPES:
        return [
            FieldError(
                path,
                f"column {spec.column!r} is of type {found}; by Range needs date, timestamp or timestamptz "
                "(use by List for other types)",
            )
        ]
    return []
