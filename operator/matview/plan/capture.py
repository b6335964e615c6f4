"""Change capture for incremental refresh: the change log, the capture functions and the source triggers.

Writes to a declared source table record the view keys they touched, in the writer's own transaction,
into a change log the operator owns (``<view>_mv_changes``): one statement-level AFTER trigger per
operation with transition tables, so a batch of 100,000 rows costs one INSERT of one log row, not
100,000 trigger calls. TRUNCATE records that a full rebuild is needed. The capture functions are
SECURITY DEFINER (owned by the view's builder), so writers need no privilege on the change log. There is
one per source and operation, each a single static INSERT with no branch to test: every writer of a
source pays for the capture, so its body is the cheapest statement that records the keys (issue #23).

This module is the pure half: names, what observe reads about these objects, and the steps that create,
repair and drop them. The refresh statements that consume the log live here too, so the log's columns
are spelled in one place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from psycopg import sql

from matview import comparisons
from matview.api import sqltext
from matview.api.spec import CaptureMethod, KeySource, MaterializedView, truncate_utf8
from matview.constants import MAX_IDENTIFIER_BYTES
from matview.plan.marker import Marker

#: Columns of the change log besides the key columns (prefixed so they cannot clash with a key's name).
CHANGED_AT, FULL_REBUILD = "mv_changed_at", "mv_full_rebuild"
RESERVED_COLUMNS = frozenset({CHANGED_AT, FULL_REBUILD})

#: The reason a build-and-swap leaves in the log until its swap commits: if it never does, the next
#: refresh rebuilds in full instead of applying keys on top of data that never went live.
SWAP_PENDING = "a build-and-swap did not complete"

_OPERATIONS = {"i": "INSERT", "u": "UPDATE", "d": "DELETE", "t": "TRUNCATE"}
_LETTERS = {operation: letter for letter, operation in _OPERATIONS.items()}
_OPERATION_SQL = {
    "INSERT": sql.SQL("INSERT"),
    "UPDATE": sql.SQL("UPDATE"),
    "DELETE": sql.SQL("DELETE"),
    "TRUNCATE": sql.SQL("TRUNCATE"),
}
_NEW_ROWS, _OLD_ROWS = "matview_new_rows", "matview_old_rows"


def key_filtered_query(
    view: MaterializedView,
    key_catalog: sqltext.KeyCatalog,
    keys_table: tuple[str, ...] | None = sqltext.CHANGED_KEYS_TABLE,
) -> sqltext.KeyFilterResult:
    """The query an incremental refresh runs: every read of a declared source filtered on the changed keys
    (in keys_table; None: equal to the parameters $1..$n, as the live view's function filters on one key)."""
    assert view.incremental is not None
    sources = {source.relation: source.columns for source in view.incremental.sources}
    return sqltext.inject_key_filters(view.query, key_catalog, sources, view.incremental.key_columns, keys_table)


def changes_name(view: MaterializedView) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len("_mv_changes")) + "_mv_changes"


def legacy_function_name(view: MaterializedView) -> str:
    """The single capture function of capture format 5 and before (one body branching on the source and
    operation): observed so that an upgrade drops it with its triggers."""
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len("_mv_capture")) + "_mv_capture"


#: Every capture function's name is the view's name cut to one length, then this, then the source's index
#: (up to 31) and the operation's letter: the functions of one view share a prefix whatever its sources were,
#: so observe finds those of sources since removed or reordered too.
FUNCTION_INFIX = "_mv_cap"
_LONGEST_SUFFIX = len(f"{FUNCTION_INFIX}99x")


def function_prefix(view: MaterializedView) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - _LONGEST_SUFFIX) + FUNCTION_INFIX


def function_name(view: MaterializedView, source_index: int | None, operation: str) -> str:
    """The capture function that source_index's operation trigger calls (TRUNCATE's, source_index None,
    is shared by every source: it records a full rebuild whatever the table)."""
    return f"{function_prefix(view)}{'' if source_index is None else source_index}{_LETTERS[operation]}"


def functions(view: MaterializedView) -> dict[str, str]:
    """Every capture function the view needs: name → PL/pgSQL body (none without spec.incremental, or when
    logical decoding captures: observe still looks for those an earlier spec made)."""
    if view.incremental is None or view.incremental.capture == CaptureMethod.LOGICAL_DECODING:
        return {}
    wanted = {function_name(view, None, "TRUNCATE"): _truncate_body(view)}
    for index, source in enumerate(view.incremental.sources):
        for operation in captured_operations(source):
            if operation != "TRUNCATE":
                wanted[function_name(view, index, operation)] = _function_body(view, source.columns, operation)
    return wanted


def captured_operations(source: KeySource) -> tuple[str, ...]:
    """The operations whose triggers capture source's writes: all four, but an append-only source's INSERTs,
    which a refresh reads by range instead (refresh/ranges.py), cost its writers nothing."""
    if source.append_only_column is not None:
        return ("UPDATE", "DELETE", "TRUNCATE")
    return ("INSERT", "UPDATE", "DELETE", "TRUNCATE")


def function_candidates(view: MaterializedView) -> list[str]:
    """The function names observe judges whoever made them: today's and the legacy one (dropped on sight)."""
    return [*functions(view), legacy_function_name(view)]


def trigger_calls(view: MaterializedView, relation: tuple[str, str]) -> dict[str, str]:
    """Trigger name → the capture function it must call, on the declared source relation: exactly the triggers
    it must have."""
    assert view.incremental is not None
    index, source = next((i, s) for i, s in enumerate(view.incremental.sources) if s.relation == relation)
    names = trigger_names(view)
    return {
        names[operation]: function_name(view, None if operation == "TRUNCATE" else index, operation)
        for operation in captured_operations(source)
    }


def trigger_prefix(view: MaterializedView) -> str:
    """Every capture trigger of this resource starts with it (unique per resource, so two views can
    capture the same table)."""
    return "matview_" + hashlib.sha256(view.owner.encode()).hexdigest()[:12] + "_"


def trigger_names(view: MaterializedView) -> dict[str, str]:
    """Operation → trigger name (transition tables allow one event per trigger)."""
    return {operation: trigger_prefix(view) + suffix for suffix, operation in _OPERATIONS.items()}


#: Changes whenever the change log's columns or the capture function's body change shape, so that apply
#: re-installs capture made by an older operator (and requests a full rebuild: its log is not readable).
CAPTURE_FORMAT_VERSION = "6"


def capture_digest(view: MaterializedView) -> str:
    """Identifies the installed capture: the key declaration and the format."""
    assert view.incremental is not None
    method = ".ld" if view.incremental.capture == CaptureMethod.LOGICAL_DECODING else ""
    return f"{view.incremental.digest}.{CAPTURE_FORMAT_VERSION}{method}"


@dataclass(frozen=True)
class FoundFunction:
    """A capture function as it exists (by name; its owner proven by converge)."""

    marker: Marker | None
    owner: str
    body: str
    shape_ok: bool
    """SECURITY DEFINER, no SET clause, PL/pgSQL, returns trigger: as the engine creates it."""


@dataclass(frozen=True)
class FoundTrigger:
    enabled: bool
    """Enabled ALWAYS (fires under session_replication_role = replica too)."""
    function: str
    """The capture function (in the view's schema) it calls."""


@dataclass(frozen=True)
class CaptureState:
    """What exists of one view's change capture (observed; owners proven by marker or by function)."""

    changes: Marker | None = None
    changes_exists: bool = False
    functions: dict[str, FoundFunction] = field(default_factory=dict)
    """Capture functions of this view (today's names and the legacy one) that exist, by name."""
    triggers: dict[tuple[str, str], dict[str, FoundTrigger]] = field(default_factory=dict)
    """(schema, table) → trigger name → the trigger, for triggers named with this resource's prefix that call
    one of its capture functions."""
    changes_owner: str = ""
    changes_has_triggers: bool = False
    """Someone made a trigger on the log (it would run on every refresh, as the operator)."""
    triggers_in_the_way: dict[tuple[str, str], str] = field(default_factory=dict)
    """(schema, table) → a trigger there with one of this view's trigger names that calls another function."""

    def functions_intact(self, view: MaterializedView, operator: str) -> bool:
        """Exactly the capture functions the engine writes exist, owned by the operator's role, with the
        current digest (a member of its owner's role could have replaced a body with CREATE OR REPLACE, which
        keeps the comment)."""
        wanted = functions(view)
        return set(self.functions) == set(wanted) and all(
            found.shape_ok
            and found.owner == operator
            and found.marker is not None
            and found.marker.digest == capture_digest(view)
            and found.body == wanted[name]
            for name, found in self.functions.items()
        )


def _function_body(view: MaterializedView, columns: tuple[str, ...], operation: str) -> str:
    """One source's capture of one operation: a single static INSERT of the statement's keys, one log row
    whose arrays hold them, so PostgreSQL plans it once per session and a 100,000-row batch writes one row.

    Measured on a single-row UPDATE (benchmarks/capture.py), each piece of the former shared body cost the
    writer: the branch tests on the table and the operation, the DISTINCT, and the UNION's hashing. They
    are gone: the claim and the live reads take DISTINCT keys anyway, so a key may appear twice (an UPDATE
    that kept its key records it from both the old and the new rows). A statement that touched no rows
    writes nothing (array_agg of no rows is NULL; the HAVING reuses that same aggregate).

    The function is SECURITY DEFINER and runs on every write with the writer's search_path. It has no
    ``SET search_path`` clause, which costs every write about 5 µs (measured: +6% on a single-row UPDATE);
    instead every function, operator and type in the body is written schema-qualified, relations are
    ``schema.name`` and the transition tables are resolved before any schema is searched.
    ``test_a_writer_cannot_make_the_capture_function_run_its_code`` shadows each of them from a writer's
    search_path and checks that none runs."""
    assert view.incremental is not None
    keys = view.incremental.key_columns
    aggregates = [sql.SQL("pg_catalog.array_agg({})").format(sql.Identifier("d", k)) for k in keys]
    selected = key_list(columns)
    if operation == "INSERT":
        rows = sql.SQL("SELECT {} FROM {}").format(selected, sql.Identifier(_NEW_ROWS))
    elif operation == "DELETE":
        rows = sql.SQL("SELECT {} FROM {}").format(selected, sql.Identifier(_OLD_ROWS))
    else:
        rows = sql.SQL("SELECT {} FROM {} UNION ALL SELECT {} FROM {}").format(
            selected, sql.Identifier(_NEW_ROWS), selected, sql.Identifier(_OLD_ROWS)
        )
    body = sql.SQL(
        "\nBEGIN\n"
        "    INSERT INTO {log} ({keys}) SELECT {aggregates} FROM ({rows}) AS d ({keys})\n"
        "    HAVING {first} IS NOT NULL;\n"
        "    RETURN NULL;\n"
        "END\n"
    ).format(
        log=changes_id(view),
        keys=key_list(keys),
        aggregates=sql.SQL(", ").join(aggregates),
        rows=rows,
        first=aggregates[0],
    )
    return body.as_string(None)


def _truncate_body(view: MaterializedView) -> str:
    """TRUNCATE of any source: the next refresh rebuilds in full (the log names the table)."""
    return (
        sql.SQL(
            "\nBEGIN\n"
            "    INSERT INTO {log} ({full})\n"
            "    VALUES (pg_catalog.format('TRUNCATE of %I.%I'::pg_catalog.text, TG_TABLE_SCHEMA, TG_TABLE_NAME));\n"
            "    RETURN NULL;\n"
            "END\n"
        )
        .format(log=changes_id(view), full=sql.Identifier(FULL_REBUILD))
        .as_string(None)
    )


def _comment(keyword: sql.SQL, target: sql.Composable, marker: Marker) -> sql.Composed:
    return sql.SQL("COMMENT ON {} {} IS {}").format(keyword, target, sql.Literal(marker.to_comment()))


def changes_id(view: MaterializedView) -> sql.Identifier:
    return sql.Identifier(view.schema, changes_name(view))


def key_list(columns: tuple[str, ...], table: str | None = None) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(table, c) if table else sql.Identifier(c) for c in columns)


def create_log_statements(view: MaterializedView) -> list[sql.Composed | sql.SQL]:
    """The change log, typed like the view's key columns (taken from the query itself, WITH NO DATA, so it is
    compiled as the view's builder, with its rights), and the capture functions. All belong to the
    operator's role, never to spec.runAsRole: a function runs as its owner on every write to a source,
    which may be another team's table, and a member of a team's role could replace a function the role
    owns (CREATE OR REPLACE keeps its comment)."""
    assert view.incremental is not None
    keys = view.incremental.key_columns
    log = changes_id(view)
    marker = Marker(view.owner, "capture", capture_digest(view))
    made: list[sql.Composed | sql.SQL] = []
    for name, body in functions(view).items():
        function = sql.Identifier(view.schema, name)
        made += [
            sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS {}").format(
                function, sql.Literal(body)
            ),
            sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(function),
            _comment(sql.SQL("FUNCTION"), sql.SQL("{}()").format(function), marker),
        ]
    return [
        sql.SQL("CREATE TABLE {} AS SELECT {} FROM ({}) AS q WITH NO DATA").format(
            log,
            sql.SQL(", ").join(
                sql.SQL("ARRAY[{}] AS {}").format(sql.Identifier("q", k), sql.Identifier(k)) for k in keys
            ),
            sqltext.embed(view.query),
        ),
        sql.SQL("RESET ROLE"),  # back to the operator's role for the rest of the transaction
        sql.SQL("ALTER TABLE {} OWNER TO CURRENT_USER").format(log),
        # The refresh runs as the view's builder, and claims from the log what it applies: no more than that
        # (no TRIGGER, no TRUNCATE, nothing on the function). What it can do to its own log affects its own view.
        *(
            [sql.SQL("GRANT SELECT, INSERT, DELETE ON {} TO {}").format(log, sql.Identifier(view.run_as_role))]
            if view.run_as_role is not None
            else []
        ),
        # No identity and no index: each costs every writer; the log is emptied by every refresh.
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN {} timestamptz NOT NULL DEFAULT clock_timestamp(), ADD COLUMN {} text"
        ).format(log, sql.Identifier(CHANGED_AT), sql.Identifier(FULL_REBUILD)),
        _comment(sql.SQL("TABLE"), log, Marker(view.owner, "changes", capture_digest(view))),
        *made,
    ]


def drop_log_statements(view: MaterializedView, state: CaptureState) -> list[sql.Composed]:
    """Drop the log and the capture functions in state (those converge proved ours)."""
    statements = [
        sql.SQL("DROP FUNCTION {}()").format(sql.Identifier(view.schema, name)) for name in sorted(state.functions)
    ]
    if state.changes_exists:
        statements.append(sql.SQL("DROP TABLE {}").format(changes_id(view)))
    return statements


def create_trigger_statements(view: MaterializedView, schema: str, table: str) -> list[sql.Composed]:
    target = sql.Identifier(schema, table)
    calls = trigger_calls(view, (schema, table))
    statements = []
    for operation, name in trigger_names(view).items():
        if name not in calls:
            continue
        call = sql.SQL("EXECUTE FUNCTION {}()").format(sql.Identifier(view.schema, calls[name]))
        referencing = {
            "INSERT": sql.SQL(" REFERENCING NEW TABLE AS {}").format(sql.Identifier(_NEW_ROWS)),
            "DELETE": sql.SQL(" REFERENCING OLD TABLE AS {}").format(sql.Identifier(_OLD_ROWS)),
            "UPDATE": sql.SQL(" REFERENCING NEW TABLE AS {} OLD TABLE AS {}").format(
                sql.Identifier(_NEW_ROWS), sql.Identifier(_OLD_ROWS)
            ),
            "TRUNCATE": sql.SQL(""),
        }[operation]
        statements.append(
            sql.SQL("CREATE TRIGGER {} AFTER {} ON {}{} FOR EACH STATEMENT {}").format(
                sql.Identifier(name), _OPERATION_SQL[operation], target, referencing, call
            )
        )
        # ALWAYS: writes under session_replication_role = replica (every logical-replication apply, many
        # bulk loaders) fire it too; an ORIGIN trigger would silently miss them.
        statements.append(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(target, sql.Identifier(name)))
    return statements


def drop_trigger_statements(schema: str, table: str, names: list[str]) -> list[sql.Composed]:
    return [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), sql.Identifier(schema, table))
        for name in sorted(names)
    ]


def uninstall_statements(view: MaterializedView) -> list[sql.Composed]:
    """Everything create_log_statements and create_trigger_statements make, dropped where it exists (undoing
    an installation whose first build failed; apply has proven the names ours before making them)."""
    assert view.incremental is not None
    statements: list[sql.Composed] = []
    for source in view.incremental.sources:
        statements += drop_trigger_statements(source.schema, source.table, list(trigger_names(view).values()))
    for name in functions(view):
        statements.append(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(view.schema, name)))
    statements.append(sql.SQL("DROP TABLE IF EXISTS {}").format(changes_id(view)))
    return statements


def request_full_rebuild(view: MaterializedView, reason: str) -> sql.Composed:
    """A row in the change log that makes the next refresh rebuild in full."""
    return sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        changes_id(view), sql.Identifier(FULL_REBUILD), sql.Literal(reason)
    )


def claim_for_swap(view: MaterializedView) -> list[sql.Composed]:
    """First statements of a build-and-swap's build transaction (REPEATABLE READ, so the build reads the
    same snapshot): forget every change it will include, and leave SWAP_PENDING until the swap commits."""
    return [
        sql.SQL("DELETE FROM {}").format(changes_id(view)),
        request_full_rebuild(view, SWAP_PENDING),
    ]


def claim_for_partitions(view: MaterializedView) -> list[sql.Composed]:
    """The first transaction of a rebuild a partition at a time: forget every change (each partition is
    built afterwards, so every one includes them) and leave SWAP_PENDING until the last partition is in.
    A rebuild that resumes one that stopped (SWAP_PENDING still there) forgets nothing: the partitions the
    first one finished were built before the changes since, which stay in the log for the next incremental
    refresh."""
    log = changes_id(view)
    return [
        sql.SQL("DELETE FROM {} WHERE NOT EXISTS (SELECT 1 FROM {} AS p WHERE p.{} = {})").format(
            log, log, sql.Identifier(FULL_REBUILD), sql.Literal(SWAP_PENDING)
        ),
        request_full_rebuild(view, SWAP_PENDING),
    ]


def swap_committed(view: MaterializedView) -> sql.Composed:
    return sql.SQL("DELETE FROM {} WHERE {} = {}").format(
        changes_id(view), sql.Identifier(FULL_REBUILD), sql.Literal(SWAP_PENDING)
    )


def claimable(view: MaterializedView) -> sql.Composed:
    """A log row (alias l) an incremental refresh may apply: keys only, none of them with a NULL part."""
    assert view.incremental is not None
    no_nulls = [
        sql.SQL("pg_catalog.array_position({}, NULL) IS NULL").format(sql.Identifier("l", k))
        for k in view.incremental.key_columns
    ]
    return sql.SQL(" AND ").join([sql.SQL("{} IS NULL").format(sql.Identifier("l", FULL_REBUILD)), *no_nulls])


def claimable_keys(view: MaterializedView) -> sql.Composed:
    """``<key columns> FROM <log> l, ROWS FROM (unnest(...), ...) u WHERE <claimable>``: the keys the log's rows
    hold. Each array has its own qualified unnest: the multi-argument ``unnest(a, b)`` is syntax, not a function
    pg_catalog has, and unqualified it resolves in the step's search path, where spec.searchPath's schemas come
    first (an attacker's ``unnest(integer[])`` there ran as the operator)."""
    assert view.incremental is not None
    keys = view.incremental.key_columns
    arrays = sql.SQL(", ").join(sql.SQL("pg_catalog.unnest({})").format(sql.Identifier("l", k)) for k in keys)
    return sql.SQL("{} FROM {} AS l, ROWS FROM ({}) AS u ({}) WHERE {}").format(
        key_list(keys, "u"), changes_id(view), arrays, key_list(keys), claimable(view)
    )


def has_null_keys(view: MaterializedView) -> sql.Composed:
    """A condition on a log row (alias l): it recorded a key with a NULL part."""
    assert view.incremental is not None
    return sql.SQL("l.{} IS NULL AND ({})").format(
        sql.Identifier(FULL_REBUILD),
        sql.SQL(" OR ").join(
            sql.SQL("pg_catalog.array_position({}, NULL) IS NOT NULL").format(sql.Identifier("l", k))
            for k in view.incremental.key_columns
        ),
    )


def claim_keys_statements(view: MaterializedView) -> list[sql.Composed]:
    """Claim the changed keys the transaction's snapshot shows (REPEATABLE READ): into the temporary
    CHANGED_KEYS_TABLE (dropped at commit), out of the log. Only rows with a complete key and no full-rebuild
    request are claimed: a TRUNCATE or a NULL key stays in the log and makes the next refresh a full one."""
    assert view.incremental is not None
    temporary = sql.Identifier(*sqltext.CHANGED_KEYS_TABLE)
    return [
        sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT DISTINCT {}").format(
            sql.Identifier(sqltext.CHANGED_KEYS_TABLE[1]), claimable_keys(view)
        ),
        sql.SQL("DELETE FROM {} AS l WHERE {}").format(changes_id(view), claimable(view)),
        # A unique index turns each of the many key checks in the filtered query into one probe.
        sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(temporary, key_list(view.incremental.key_columns)),
        sql.SQL("ANALYZE {}").format(temporary),
    ]


def in_claimed_keys(view: MaterializedView) -> sql.Composed:
    """``IN (SELECT <keys> FROM <claimed keys>)`` with pg_catalog's equality (comparisons.KEY_EQUALS): after a row's
    key columns, the key is one claimed."""
    assert view.incremental is not None
    temporary = sql.Identifier(*sqltext.CHANGED_KEYS_TABLE)
    return sql.SQL("{} ANY (SELECT {} FROM {})").format(
        comparisons.KEY_EQUALS, key_list(view.incremental.key_columns), temporary
    )


#: A filter that keeps every row (what ``keep`` is when nothing is left out).
EVERY_ROW = sql.SQL("true")


def incremental_statements(
    view: MaterializedView, filtered_query: sqltext.CheckedSQL, keep: sql.Composable = EVERY_ROW
) -> list[sql.Composed]:
    """One transaction (REPEATABLE READ: every statement sees the same snapshot): claim the changed keys
    the snapshot shows, delete their rows, insert them recomputed by the key-filtered query (those ``keep``
    holds for, on the alias ``q``: a partitioned view's retention window).

    Only rows with a complete key and no full-rebuild request are claimed: a TRUNCATE or a NULL key that
    commits after the decision stays in the log and makes the next refresh a full one."""
    assert view.incremental is not None
    keys = view.incremental.key_columns
    target = sql.Identifier(view.schema, view.name)
    in_keys = in_claimed_keys(view)
    return [
        *claim_keys_statements(view),
        sql.SQL("DELETE FROM {} AS t WHERE ({}) {}").format(target, key_list(keys, "t"), in_keys),
        sql.SQL("INSERT INTO {} SELECT * FROM ({}) AS q WHERE ({}) {} AND {}").format(
            target, sqltext.embed(filtered_query), key_list(keys, "q"), in_keys, keep
        ),
    ]
