"""Keyset pages: the millionth page as fast as the first, and no row repeated or skipped across a refresh.

OFFSET pages read and throw away every row before the page, and shift when rows come or go between two
requests. A keyset page asks for the rows after the last one seen, by a row-value comparison on an order
that a unique index makes total, so PostgreSQL starts its index scan at the cursor (sqlakeyset and
Django REST framework's CursorPagination do the same). A refresh between two pages neither repeats nor
skips a row that exists before and after it: rows are found by their order values, not their position.

The cursor is opaque to callers: base64 of the order, the page's boundary values (as PostgreSQL prints
them, so every type round-trips exactly) and a digest of the relation's definition. A cursor made under
another definition (the view's query changed, or the fallback chooser switched relations) or for another
order is refused with ``CursorError``. An order no unique index covers is refused with ``OrderError``,
naming the index to declare. Order columns must hold no NULLs (as for sqlakeyset): a page that meets one
raises instead of silently losing rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from matview import comparisons
from matview.client.fallback import RelationChooser

Connection = psycopg.Connection[Any]

#: The most a page returns, and the largest cursor accepted (a cursor comes from outside: a URL).
MAX_LIMIT = 10_000
MAX_CURSOR_BYTES = 65_536


class CursorError(ValueError):
    """The cursor is not one this relation and order made (another definition, another order, garbled)."""


class OrderError(ValueError):
    """The order cannot page this relation: no unique index covers it, or it names what is not there."""


@dataclass(frozen=True)
class Page:
    rows: list[tuple[Any, ...]]
    columns: tuple[str, ...]
    next: str | None
    """Pass as ``after=`` for the next page; None on the last page."""
    previous: str | None
    """Pass as ``before=`` for the page before; None on the first page."""


@dataclass(frozen=True)
class _Relation:
    schema: str
    name: str
    columns: tuple[str, ...]
    unique_keys: tuple[tuple[str, ...], ...]
    digest: str
    table: str | None = None
    """The stored table of a live view (same schema): pages are bounded by its rows first."""
    comparisons: tuple[str, ...] = ()
    """Per column, the schema of the operators its ORDER BY sorts with (its type's default btree operator
    class): pg_catalog for PostgreSQL's own types, an extension's schema for citext. Read for the columns a page
    compares only (see _describe); the others say pg_catalog."""

    def operators(self, columns: Sequence[str]) -> str:
        """The one schema whose operators compare these columns as ORDER BY sorts them. pg_catalog's ``>``
        compares citext as text: in a database with the C collation, the page after 'a@x' left out 'B@x'."""
        found = {self.comparisons[self.columns.index(c)] for c in columns}
        if len(found) > 1:
            named = ", ".join(f"{c} ({self.comparisons[self.columns.index(c)]})" for c in columns)
            raise OrderError(
                f"order columns of {self.schema}.{self.name} sort with the operators of different schemas ({named}), "
                "which one row comparison cannot use; order by columns whose types sort alike"
            )
        return found.pop()


# Runs under the application's search_path, where other roles may have planted look-alikes: every function
# and operator is pg_catalog's, named so.
_DESCRIBE = sql.SQL("""
SELECT c.relkind::pg_catalog.text,
       pg_catalog.obj_description(c.oid, 'pg_class'::pg_catalog.name),
       CASE WHEN c.relkind OPERATOR(pg_catalog.=) 'v'::pg_catalog."char"
            THEN pg_catalog.md5(pg_catalog.pg_get_viewdef(c.oid)) END,
       ARRAY(SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0::pg_catalog.int2
               AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
             WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0::pg_catalog.int2
               AND NOT a.attisdropped ORDER BY a.attnum),
       (SELECT pg_catalog.json_agg(k.columns) FROM (
            SELECT ARRAY(SELECT a.attname::pg_catalog.text
                         FROM pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS u (attnum, position)
                         JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
                                                       AND a.attnum OPERATOR(pg_catalog.=) u.attnum
                         ORDER BY u.position) AS columns
            FROM pg_catalog.pg_index i
            WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisunique AND i.indisvalid
              AND i.indpred IS NULL AND i.indexprs IS NULL) AS k),
       ARRAY(SELECT CASE WHEN a.attname OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.name[]) THEN {order_schema} END
             FROM pg_catalog.pg_attribute a
             WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0::pg_catalog.int2
               AND NOT a.attisdropped ORDER BY a.attnum)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE n.nspname OPERATOR(pg_catalog.=) %s::pg_catalog.name AND c.relname OPERATOR(pg_catalog.=) %s::pg_catalog.name
""").format(order_schema=comparisons.operator_schema(sql.SQL("a.atttypid"), comparisons.Comparison.LESS))


def _describe(conn: Connection, schema: str, name: str, compared: Sequence[str]) -> _Relation:
    """The relation's columns, unique keys and digest, and the operators' schema of the compared columns only:
    that is a catalog walk per column, and every page reads this (41 columns, all walked: 5.4 ms a page)."""
    row = conn.execute(_DESCRIBE, (list(compared), schema, name)).fetchone()
    if row is None:
        raise OrderError(f"relation {schema}.{name} does not exist")
    relkind, comment, viewdef_digest, columns, types, unique, comparisons = row
    marker = _marker(comment)
    table = _live_table(marker) if relkind == "v" else None
    if table is not None:  # a live view: its rows are unique as its table's are (same keys, never twice)
        stored = conn.execute(_DESCRIBE, ([], schema, table)).fetchone()
        unique = stored[5] if stored is not None else unique
    digest = marker.get("digest") if isinstance(marker.get("digest"), str) else viewdef_digest
    if digest is None:  # a table or materialized view nobody marked: its shape stands for its definition
        digest = hashlib.sha256(json.dumps([relkind, list(columns), list(types)]).encode()).hexdigest()[:16]
    return _Relation(
        schema,
        name,
        tuple(columns),
        tuple(tuple(key) for key in unique or ()),
        str(digest),
        table,
        tuple(str(found or "pg_catalog") for found in comparisons),
    )


def _marker(comment: str | None) -> dict[str, Any]:
    """The engine's ownership marker in a relation's comment ({} when the comment is not one)."""
    try:
        data = json.loads(comment or "")
    except ValueError:
        return {}
    return data if isinstance(data, dict) and data.get("managedBy") == "matview.dev" else {}


def _live_table(marker: dict[str, Any]) -> str | None:
    """The stored table a live view's marker names (plan/live.py)."""
    state = marker.get("state")
    table = state.get("table") if marker.get("kind") == "live" and isinstance(state, dict) else None
    return table if isinstance(table, str) else None


def _parse_order(order: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """(columns, descending) from ["a", "b"], ["-a", "-b"] or ["a DESC", "b DESC"]: one direction for all, which
    a row-value comparison (and so an index range) needs."""
    if isinstance(order, str) or not order:
        raise OrderError("order must be a non-empty list of column names")
    columns, directions = [], set()
    for item in order:
        if not isinstance(item, str) or not item.strip():
            raise OrderError(f"order item {item!r} is not a column name")
        text = item.strip()
        descending = text.startswith("-") or text.upper().endswith(" DESC")
        text = text[1:] if text.startswith("-") else text
        for suffix in (" DESC", " ASC", " desc", " asc"):
            text = text.removesuffix(suffix)
        columns.append(text.strip())
        directions.add(descending)
    if len(directions) > 1:
        raise OrderError("every order column must go the same way (all ascending or all descending)")
    if len(set(columns)) != len(columns):
        raise OrderError("an order column is named twice")
    return tuple(columns), directions.pop()


def _check_cover(
    relation: _Relation, columns: tuple[str, ...], equal: Mapping[str, Any], unique_by: Sequence[str] | None
) -> None:
    missing = [c for c in (*columns, *equal) if c not in relation.columns]
    if missing:
        raise OrderError(f"{relation.schema}.{relation.name} has no column {missing[0]!r}")
    covered = set(columns) | set(equal)
    keys = [*relation.unique_keys, *([tuple(unique_by)] if unique_by else [])]
    if any(set(key) <= covered for key in keys):
        return
    order = ", ".join(columns)
    advice = (
        f"end the order with the columns of a unique index ({'; '.join(', '.join(k) for k in keys)}) or declare "
        if keys
        else "declare "
    )
    raise OrderError(
        f"order ({order}) of {relation.schema}.{relation.name} is not covered by a unique index, so rows with "
        f"equal values could be repeated or skipped between pages: {advice}"
        f"`indexes: [{{columns: [{order}], unique: true}}]` in its MaterializedView"
    )


def _encode(order: tuple[str, ...], descending: bool, digest: str, values: Sequence[str]) -> str:
    payload = json.dumps({"o": list(order), "s": descending, "d": digest, "v": list(values)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode(cursor: str, order: tuple[str, ...], descending: bool, digest: str) -> list[str]:
    if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_BYTES:
        raise CursorError("the cursor is not one this pager made")
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise CursorError("the cursor is not one this pager made") from None
    if not isinstance(data, dict) or data.get("o") != list(order) or data.get("s") != descending:
        raise CursorError("the cursor was made for another order")
    if data.get("d") != digest:
        raise CursorError("the cursor was made for another definition of the view (its query changed): start again")
    values = data.get("v")
    if not isinstance(values, list) or len(values) != len(order) or not all(isinstance(v, str) for v in values):
        raise CursorError("the cursor is not one this pager made")
    return values


def page(
    conn: Connection,
    relation: tuple[str, str] | RelationChooser,
    order: Sequence[str],
    limit: int = 100,
    after: str | None = None,
    before: str | None = None,
    equal: Mapping[str, Any] | None = None,
    unique_by: Sequence[str] | None = None,
) -> Page:
    """One page of relation's rows in order, after or before a cursor (neither: the first page).

    ``equal`` filters on columns (``{"origin_tag": "web"}``); a unique index on those columns and the order
    together covers the order. ``unique_by`` states columns the rows are unique by, for a plain view, which
    has no index to prove it."""
    if after is not None and before is not None:
        raise CursorError("give after= or before=, not both")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise OrderError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    equal = dict(equal or {})
    schema, name = relation.name(conn) if isinstance(relation, RelationChooser) else relation
    columns, descending = _parse_order(order)
    described = _describe(conn, schema, name, [*columns, *equal])
    _check_cover(described, columns, equal, unique_by)
    cursor = after if after is not None else before
    values = _decode(cursor, columns, descending, described.digest) if cursor is not None else None
    backwards = before is not None
    # Forward in the requested direction after a cursor; backward before one, read reversed, then turned.
    going_down = descending != backwards
    # Each type's own operators (found in the catalog, named with their schema): never resolved in the
    # application's search_path, and the same order as ORDER BY's.
    operators = sql.Identifier(described.operators(columns))
    comparison = sql.SQL("OPERATOR({}.<)" if going_down else "OPERATOR({}.>)").format(operators)
    direction = sql.SQL(" DESC" if going_down else "")
    conditions = [
        sql.SQL("{} OPERATOR({}.=) {}").format(
            sql.Identifier("r", column), sql.Identifier(described.operators([column])), sql.Placeholder()
        )
        for column in equal
    ]
    parameters: list[Any] = list(equal.values())
    if values is not None:
        conditions.append(
            sql.SQL("ROW({}) {} ROW({})").format(
                sql.SQL(", ").join(sql.Identifier("r", c) for c in columns),
                comparison,
                sql.SQL(", ").join(sql.Placeholder() for _ in columns),
            )
        )
        parameters += values

    def select(source: str, conditions: Sequence[sql.Composable], count: int, offset: int = 0) -> sql.Composed:
        return sql.SQL("SELECT {}{} FROM {} AS r {} ORDER BY {} LIMIT {} OFFSET {}").format(
            sql.SQL("r.*, ") if source == name else sql.SQL(""),
            sql.SQL(", ").join(sql.SQL("CAST({} AS pg_catalog.text)").format(sql.Identifier("r", c)) for c in columns),
            sql.Identifier(schema, source),
            sql.SQL("WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL(""),
            sql.SQL(", ").join(sql.Identifier("r", c) + direction for c in columns),
            sql.Literal(count),
            sql.Literal(offset),
        )

    fetched: list[Any] | None = None
    if described.table is not None:
        # A live view computes its pending keys, and a page bounded on one side only makes it compute every
        # pending key past the cursor (and read every stored row there): bound the page first by the stored
        # table, whose index stops after the page. The bound is a guess: if the live view has fewer rows up
        # to it (keys deleted since the last refresh), the page is read again without it. Either answer is
        # exact in the snapshot of the statement that gives it.
        slack = max(10, limit // 10)
        bound = conn.execute(select(described.table, conditions, 1, limit + slack), parameters).fetchone()
        if bound is not None:
            until = sql.SQL("ROW({}) {} ROW({})").format(
                sql.SQL(", ").join(sql.Identifier("r", c) for c in columns),
                sql.SQL("OPERATOR({}.>=)" if going_down else "OPERATOR({}.<=)").format(operators),
                sql.SQL(", ").join(sql.Placeholder() for _ in columns),
            )
            bounded = conn.execute(select(name, [*conditions, until], limit + 1), [*parameters, *bound]).fetchall()
            fetched = bounded if len(bounded) > limit else None
    if fetched is None:
        fetched = conn.execute(select(name, conditions, limit + 1), parameters).fetchall()
    width = len(described.columns)
    more = len(fetched) > limit
    fetched = fetched[:limit]
    if backwards:
        fetched.reverse()
    boundaries = [row[width:] for row in fetched]
    # A row with a NULL order value sorts past every cursor and no comparison reaches it: say so, at the latest
    # when a walk reaches its end, rather than leave it out of every page.
    nulls = any(value is None for boundary in boundaries for value in boundary)
    if not nulls and not more:
        any_null = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} AS r WHERE {}({}))").format(
            sql.Identifier(schema, name),
            sql.SQL("").join(condition + sql.SQL(" AND ") for condition in conditions[: len(equal)]),
            sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier("r", c)) for c in columns),
        )
        found = conn.execute(any_null, list(equal.values())).fetchone()
        nulls = bool(found and found[0])
    if nulls:
        raise OrderError(
            f"an order column of {schema}.{name} holds NULL; keyset pages need order columns without NULLs "
            "(coalesce them in the view's query, or order by others)"
        )
    rows = [tuple(row[:width]) for row in fetched]

    def cursor_at(index: int) -> str:
        return _encode(columns, descending, described.digest, [str(v) for v in boundaries[index]])

    has_after = more if not backwards else True
    has_before = (values is not None) if not backwards else more
    return Page(
        rows=rows,
        columns=described.columns,
        next=cursor_at(-1) if rows and has_after else None,
        previous=cursor_at(0) if rows and has_before else None,
    )
