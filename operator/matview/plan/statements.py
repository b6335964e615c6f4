"""The vocabulary of plans: steps and plans, the names the engine gives what it builds, the statements
every planner module shares (indexes, comments, grants), and whether an object is provably ours.

Pure, like every planning module: words that come from the spec or the catalog enter SQL only as the
constants below (the one door for text is sqltext.embed; tests/unit/test_one_door.py holds every other
sql.SQL to a literal).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from matview.api import sqltext
from matview.api.spec import IndexSpec, MaterializedView, SupportingIndexSpec, truncate_utf8
from matview.constants import MAX_IDENTIFIER_BYTES
from matview.plan import capture
from matview.plan.marker import Marker
from matview.plan.observed import Observed

Statement = sql.Composed | sql.SQL
"""A complete statement, as the executor runs it."""
Query = tuple[Statement, Sequence[Any] | Mapping[str, Any] | None]
"""A statement with its parameters (values always travel as parameters where PostgreSQL accepts them)."""


@dataclass(frozen=True)
class FromRows:
    """Statements that depend on rows the step itself has just made (the partitions a build's data needs):
    the executor runs ``query`` where this item stands in its step, then the statements ``then`` gives for
    the rows it read, in the same transaction. Both come from pure planning functions; only values come
    from the database, and they enter the statements as literals or through ``sql.Identifier``."""

    summary: str
    query: Query
    then: Callable[[list[tuple[Any, ...]]], Sequence[Statement]]

    def as_string(self, context: Any = None) -> str:
        """How ``matview plan`` shows it: what it makes, and the read that decides how many."""
        return f"-- {self.summary}, as read by: {self.query[0].as_string(context)}"


StepItem = Statement | FromRows
"""What a step runs: a statement, or statements decided by what the step has made so far."""

METHODS = {
    "btree": sql.SQL("btree"),
    "hash": sql.SQL("hash"),
    "gin": sql.SQL("gin"),
    "gist": sql.SQL("gist"),
    "brin": sql.SQL("brin"),
}
PRIVILEGES = {
    "SELECT": sql.SQL("SELECT"),
    "INSERT": sql.SQL("INSERT"),
    "UPDATE": sql.SQL("UPDATE"),
    "DELETE": sql.SQL("DELETE"),
    "TRUNCATE": sql.SQL("TRUNCATE"),
    "REFERENCES": sql.SQL("REFERENCES"),
    "TRIGGER": sql.SQL("TRIGGER"),
    "MAINTAIN": sql.SQL("MAINTAIN"),
}
#: The options of a dependent view that a swap carries over (read from the catalog), and their values.
STAGING_SUFFIX = "_mv_staging"
RETIRED_SUFFIX = "_mv_retired"


@dataclass(frozen=True)
class Step:
    """One unit of execution: its statements run in one transaction unless ``transactional`` is False."""

    description: str
    statements: tuple[StepItem, ...]
    transactional: bool = True
    takes_exclusive_lock: bool = False
    """Waits for ACCESS EXCLUSIVE on a relation readers use: run with lock_timeout and retries."""
    cleanup: tuple[Statement, ...] = ()
    """Run (best effort, autocommit) when the step fails, e.g. to drop an INVALID index."""
    makes_data_live: bool = False
    """Readers see freshly computed data once this step commits (create, swap): it counts as a refresh."""
    runs_query: bool = False
    """Builds the view from the user's query: runs as spec.runAsRole when set (the new relation is its)."""
    restricted_user_sql: bool = False
    """The user's SQL runs only inside REFRESH MATERIALIZED VIEW (a security-restricted operation): a closing
    of this step cleans the session in band and spares the reset before the connection goes back
    (session.IN_BAND_CLEANUP)."""
    repeatable_read: bool = False
    """Every statement of the step reads one snapshot (claiming changes and computing from them)."""
    drops_change_log: bool = False
    """Removes the change log (re-installed or no longer declared): what reads it must go first."""
    completes: str | None = None
    """A part of the view this step's commit puts in place (a rebuilt partition): reported as progress."""


@dataclass(frozen=True)
class Plan:
    view: MaterializedView
    steps: tuple[Step, ...] = ()
    reasons: tuple[str, ...] = ()
    """Why the plan does what it does (e.g. "source columns changed: ...")."""
    warnings: tuple[str, ...] = field(default=())
    incremental_query: sqltext.CheckedSQL | None = None
    """What an incremental refresh of this view runs: the query with the key filter injected at its sources."""
    log_steps: bool = True
    """Log each step at INFO as it starts (applies); a refresh logs one line of its own when it ends."""

    @property
    def empty(self) -> bool:
        return not self.steps


def relation_id(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def staging_name(view: MaterializedView) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len(STAGING_SUFFIX)) + STAGING_SUFFIX


def retired_name(view: MaterializedView) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len(RETIRED_SUFFIX)) + RETIRED_SUFFIX


def retired_index_name(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return truncate_utf8(name, MAX_IDENTIFIER_BYTES - 11) + "_old_" + digest


def staging_index_name(final_name: str) -> str:
    digest = hashlib.sha256(final_name.encode()).hexdigest()[:6]
    return truncate_utf8(final_name, MAX_IDENTIFIER_BYTES - 11) + "_stg_" + digest


def rebuild_index_name(final_name: str) -> str:
    digest = hashlib.sha256(final_name.encode()).hexdigest()[:6]
    return truncate_utf8(final_name, MAX_IDENTIFIER_BYTES - 11) + "_new_" + digest


def wanted_names(view: MaterializedView) -> list[tuple[str, str]]:
    """(schema, name) of every relation name the plan may create; observe() looks them up."""
    names = [(view.schema, staging_name(view)), (view.schema, retired_name(view))]
    if view.incremental is not None:
        names.append((view.schema, capture.changes_name(view)))
    for index in view.indexes:
        final = view.index_name(index)
        names += [
            (view.schema, final),
            (view.schema, staging_index_name(final)),
            (view.schema, rebuild_index_name(final)),
        ]
    for sup in view.supporting_indexes:
        final = view.index_name(sup)
        names += [(sup.table_schema, final), (sup.table_schema, rebuild_index_name(final))]
    return names


def create_index_sql(
    view: MaterializedView, index: IndexSpec, name: str, table: sql.Identifier, concurrently: bool
) -> sql.Composed:
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in index.columns)
    return sql.SQL("CREATE {unique}INDEX {concurrently}{name} ON {table} USING {method} ({columns}){where}").format(
        unique=sql.SQL("UNIQUE ") if index.unique else sql.SQL(""),
        concurrently=sql.SQL("CONCURRENTLY ") if concurrently else sql.SQL(""),
        name=sql.Identifier(name),
        table=table,
        method=METHODS[index.method],
        columns=columns,
        where=sql.SQL(" WHERE {}").format(sqltext.embed(index.where)) if index.where else sql.SQL(""),
    )


#: The SQL keyword of each relkind the engine creates for a view's rows.
RELATION_KEYWORDS = {"m": sql.SQL("MATERIALIZED VIEW"), "r": sql.SQL("TABLE"), "p": sql.SQL("TABLE")}


def comment_sql(kind: str, target: sql.Identifier, marker: Marker, relkind: str = "m") -> sql.Composed:
    keyword = RELATION_KEYWORDS[relkind] if kind == "view" else sql.SQL("INDEX")
    return sql.SQL("COMMENT ON {} {} IS {}").format(keyword, target, sql.Literal(marker.to_comment()))


def grantee(role: str) -> sql.Composable:
    return sql.SQL("PUBLIC") if role == "PUBLIC" else sql.Identifier(role)


def grant_sql(target: sql.Identifier, role: str, privileges: Iterable[str], revoke: bool = False) -> sql.Composed:
    words = sql.SQL(", ").join(PRIVILEGES[p] for p in sorted(privileges))
    template = sql.SQL("REVOKE {} ON {} FROM {}") if revoke else sql.SQL("GRANT {} ON {} TO {}")
    return template.format(words, target, grantee(role))


def view_markers(view: MaterializedView) -> Marker:
    return Marker(view.owner, "view", view.definition_digest)


def index_marker(view: MaterializedView, index: IndexSpec) -> Marker:
    kind = "supporting" if isinstance(index, SupportingIndexSpec) else "index"
    return Marker(view.owner, kind, index.definition_digest)  # type: ignore[arg-type]


def not_ours(what: str, marker: Marker | None, owner: str = "") -> str:
    whose = f"managed by {marker.owner}" if marker else "not managed by matview-operator"
    if marker is not None and owner:
        whose = f"owned by role {owner!r}, which is neither the operator's role nor spec.runAsRole"
    return f"{what} exists and is not managed by this resource ({whose})"


def trusted_owners(view: MaterializedView, observed: Observed) -> frozenset[str]:
    """The roles whose objects may carry this resource's markers: the operator's role, and spec.runAsRole,
    which owns the view it builds. A marker is a comment, which whoever owns an object can write: on an
    object of any other role it proves nothing, and the engine never adopts, alters or drops it."""
    return frozenset({observed.current_user, *([view.run_as_role] if view.run_as_role else [])})


def is_ours(view: MaterializedView, observed: Observed, marker: Marker | None, owner: str) -> bool:
    return marker is not None and marker.owner == view.owner and owner in trusted_owners(view, observed)
