"""Verification: do the stored rows of an incremental view equal a full recompute of its query?

Incremental refresh trusts the key declaration (a source row with key K only changes the view's rows
with key K). A wrong declaration gives wrong rows silently; this check is what catches it. In one
REPEATABLE READ snapshot it compares the table with the query, both directions with duplicates counted
(EXCEPT ALL), leaving out the keys still waiting in the change log: those rows are allowed to differ
until the next refresh applies them. It only reads, as the view's builder (spec.runAsRole), under the
refresh's timeout.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from matview import comparisons
from matview.api import sqltext
from matview.api.spec import MaterializedView
from matview.plan import capture, partitions, session
from matview.plan.describe import filtered_query_error
from matview.plan.executor import ExecutionSettings
from matview.plan.observed import Connection
from matview.plan.session import become_query_role
from matview.plan.upstream import relation_oid


@dataclass(frozen=True)
class Verification:
    """The outcome of one comparison."""

    relation: str
    extra_rows: int = 0
    """Rows stored that the query does not produce (duplicates counted)."""
    missing_rows: int = 0
    """Rows the query produces that are not stored (duplicates counted)."""
    pending_keys: int = 0
    """Keys left out because they are waiting in the change log."""
    inconclusive: str = ""
    """Why no comparison was possible ("" when it was made)."""
    duration_seconds: float = 0.0

    @property
    def mismatched_rows(self) -> int:
        return self.extra_rows + self.missing_rows

    @property
    def matches(self) -> bool:
        return not self.inconclusive and self.mismatched_rows == 0

    def as_dict(self) -> dict[str, object]:
        return {
            "relation": self.relation,
            "matches": self.matches,
            "extraRows": self.extra_rows,
            "missingRows": self.missing_rows,
            "pendingKeys": self.pending_keys,
            "inconclusive": self.inconclusive or None,
            "durationSeconds": round(self.duration_seconds, 3),
        }


_COMPARE = sql.SQL("""
WITH pending AS MATERIALIZED (SELECT DISTINCT {claimable_keys}),
stored AS MATERIALIZED (
    SELECT * FROM {target} AS s WHERE NOT EXISTS (SELECT 1 FROM pending AS p WHERE {stored_match}) AND {stored_kept}
),
computed AS MATERIALIZED (
    SELECT * FROM ({query}) AS c WHERE NOT EXISTS (SELECT 1 FROM pending AS p WHERE {computed_match})
                                 AND {computed_kept}
)
SELECT (SELECT count(*) FROM (SELECT * FROM stored EXCEPT ALL SELECT * FROM computed) AS d),
       (SELECT count(*) FROM (SELECT * FROM computed EXCEPT ALL SELECT * FROM stored) AS d),
       (SELECT count(*) FROM pending),
       EXISTS (SELECT 1 FROM {log} AS l WHERE l.{full} IS NOT NULL OR {null_keys})
""")


def _match(keys: tuple[str, ...], alias: str) -> sql.Composed:
    """A pending key (never NULL: capture.claimable) equal to the row's. Not IS NOT DISTINCT FROM, which has no
    qualified form: its ``=`` resolves in the view's search path (comparisons.KEY_EQUALS)."""
    return sql.SQL(" AND ").join(
        sql.SQL("{} {} {}").format(sql.Identifier("p", k), comparisons.KEY_EQUALS, sql.Identifier(alias, k))
        for k in keys
    )


def compare(conn: Connection, view: MaterializedView, settings: ExecutionSettings) -> Verification:
    """Compare the stored rows with a full recompute. Raises psycopg.Error (a timeout, a type without
    equality) for the caller to report."""
    assert view.incremental is not None
    started = time.monotonic()
    if relation_oid(conn, view.schema, capture.changes_name(view)) is None:
        return Verification(view.relation, inconclusive="change capture is not installed (apply the view)")
    # Pending keys are left out of the comparison: if no incremental refresh can apply them, "matches" would
    # say nothing about a view that only ever falls behind.
    unusable = filtered_query_error(conn, view)
    if unusable is not None:
        return Verification(view.relation, inconclusive=f"cannot verify: incremental refreshes cannot run ({unusable})")
    keys = view.incremental.key_columns
    cutoff = partitions.retention_cutoff(view, dt.datetime.now(dt.UTC))
    statement = _COMPARE.format(
        claimable_keys=capture.claimable_keys(view),
        target=sql.Identifier(view.schema, view.name),
        stored_match=_match(keys, "s"),
        query=sqltext.embed(view.query),
        computed_match=_match(keys, "c"),
        # A partitioned view keeps only its retention window: rows before it are neither stored nor expected.
        stored_kept=partitions.kept(view, cutoff, "s"),
        computed_kept=partitions.kept(view, cutoff, "c"),
        log=capture.changes_id(view),
        full=sql.Identifier(capture.FULL_REBUILD),
        null_keys=capture.has_null_keys(view),
    )
    with conn.transaction():
        conn.execute(sql.SQL("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        session.step_settings(conn, view, settings.statement_timeout_seconds, settings.lock_timeout_seconds, local=True)
        become_query_role(conn, view)
        row = conn.execute(statement).fetchone()
        session.configure(conn)  # the query may have set search_path for the session
    assert row is not None
    extra, missing, pending, full_pending = row
    elapsed = time.monotonic() - started
    if full_pending:
        return Verification(
            view.relation,
            pending_keys=int(pending),
            inconclusive="a full rebuild is pending: the stored rows are known to be behind",
            duration_seconds=elapsed,
        )
    return Verification(view.relation, int(extra), int(missing), int(pending), duration_seconds=elapsed)


def safe_compare(conn: Connection, view: MaterializedView, settings: ExecutionSettings) -> Verification:
    """compare, with a database error reported as inconclusive instead of raised."""
    try:
        return compare(conn, view, settings)
    except psycopg.Error as error:
        message = (error.diag.message_primary or str(error)).strip()
        return Verification(view.relation, inconclusive=f"the comparison failed: {message}")
