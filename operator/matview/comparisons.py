"""Where a type's comparison operators live, asked in SQL the engine and the client both send.

A statement that compares values of a column must name the schema of the operator it means: unqualified,
``=`` or ``<`` is whatever the session's search_path finds first, and a role allowed to create in a listed
schema can plant a better-matching look-alike that runs as the caller. The right schema is that of the
operators the type's default btree operator class uses, which ORDER BY, GROUP BY and unique indexes use too:
pg_catalog's for built-in types, domains, enums, arrays and ranges, an extension's for its own types (citext's
``=`` ignores case; pg_catalog's, applied to citext through its text cast, does not).

One fragment, so that keys (plan/describe) and page orders (client/pages) cannot disagree on a type. Every
name in it is qualified: it runs under whatever search_path the caller has. psycopg only: the client imports it.
"""

from __future__ import annotations

from enum import Enum

from psycopg import sql

#: How the engine compares keys: pg_catalog's equality, whatever the statement's search path lists. Statements
#: that hold the user's query run under spec.searchPath, and pg_catalog has no ``=(varchar, varchar)`` (nor one
#: for a domain or an enum): an unqualified ``=`` between two varchar keys resolved to a look-alike planted in a
#: listed schema and ran it as the operator. ``x OPERATOR(pg_catalog.=) ANY (subquery)`` is what ``x IN
#: (subquery)`` parses to, with the operator looked up in pg_catalog alone: the same plans. A key type whose own
#: equality lives elsewhere (EQUAL below: citext's) is refused at apply (plan/checks).
KEY_EQUALS = sql.SQL("OPERATOR(pg_catalog.=)")


class Comparison(Enum):
    """An operator of a default operator class: its access method and strategy number (PostgreSQL's
    ``BTLessStrategyNumber``, ``BTEqualStrategyNumber``, ``HTEqualStrategyNumber``)."""

    LESS = ("btree", 1)
    EQUAL = ("btree", 3)
    HASH_EQUAL = ("hash", 1)


_CHAIN = sql.SQL("""chain (oid, typmod, depth) AS (
     SELECT ({type_oid})::pg_catalog.oid, ({typmod})::pg_catalog.int4, 0
     UNION ALL
     SELECT dt.typbasetype, dt.typtypmod, chain.depth OPERATOR(pg_catalog.+) 1
     FROM chain JOIN pg_catalog.pg_type dt ON dt.oid OPERATOR(pg_catalog.=) chain.oid
     WHERE dt.typtype OPERATOR(pg_catalog.=) 'd'::pg_catalog."char" AND chain.depth OPERATOR(pg_catalog.<) 32
 )""")


def domain_chain(type_oid: sql.Composable, typmod: sql.Composable) -> sql.Composed:
    """``chain (oid, typmod, depth) AS (…)``, for a ``WITH RECURSIVE``: the type (depth 0) and, for a domain, its
    base types, each with its typmod (a domain's is its base type's typtypmod), through domains over domains.
    The deepest is what PostgreSQL describes a query's result column of that type as."""
    return _CHAIN.format(type_oid=type_oid, typmod=typmod)


# The candidates, best first: the type itself, then (for a domain) its base types, each with its generic class
# (arrays, enums, ranges) and then the targets it is binary-coercible to (varchar compares as text). Every operator
# is named with its schema: an application may list pg_catalog after a schema others can create in.
_TEMPLATE = sql.SQL("""(WITH RECURSIVE {chain}, candidates (oid, rank) AS (
     SELECT chain.oid, chain.depth OPERATOR(pg_catalog.*) 3 FROM chain
     UNION ALL
     SELECT CASE WHEN ct.typcategory OPERATOR(pg_catalog.=) 'A'::pg_catalog."char"
                 THEN 'pg_catalog.anyarray'::pg_catalog.regtype::pg_catalog.oid
                 WHEN ct.typtype OPERATOR(pg_catalog.=) 'e'::pg_catalog."char"
                 THEN 'pg_catalog.anyenum'::pg_catalog.regtype::pg_catalog.oid
                 WHEN ct.typtype OPERATOR(pg_catalog.=) 'r'::pg_catalog."char"
                 THEN 'pg_catalog.anyrange'::pg_catalog.regtype::pg_catalog.oid END,
            chain.depth OPERATOR(pg_catalog.*) 3 OPERATOR(pg_catalog.+) 1
     FROM chain JOIN pg_catalog.pg_type ct ON ct.oid OPERATOR(pg_catalog.=) chain.oid
     UNION ALL
     SELECT cc.casttarget, chain.depth OPERATOR(pg_catalog.*) 3 OPERATOR(pg_catalog.+) 2
     FROM chain JOIN pg_catalog.pg_cast cc ON cc.castsource OPERATOR(pg_catalog.=) chain.oid
                                          AND cc.castmethod OPERATOR(pg_catalog.=) 'b'::pg_catalog."char"
 )
 SELECT cn.nspname::pg_catalog.text
 FROM candidates
 JOIN pg_catalog.pg_opclass co ON co.opcintype OPERATOR(pg_catalog.=) candidates.oid AND co.opcdefault
 JOIN pg_catalog.pg_am cm ON cm.oid OPERATOR(pg_catalog.=) co.opcmethod
                        AND cm.amname OPERATOR(pg_catalog.=) {method}::pg_catalog.name
 JOIN pg_catalog.pg_amop cp ON cp.amopfamily OPERATOR(pg_catalog.=) co.opcfamily
                          AND cp.amoplefttype OPERATOR(pg_catalog.=) co.opcintype
                          AND cp.amoprighttype OPERATOR(pg_catalog.=) co.opcintype
                          AND cp.amopstrategy OPERATOR(pg_catalog.=) {strategy}::pg_catalog.int2
 JOIN pg_catalog.pg_operator ce ON ce.oid OPERATOR(pg_catalog.=) cp.amopopr
 JOIN pg_catalog.pg_namespace cn ON cn.oid OPERATOR(pg_catalog.=) ce.oprnamespace
 ORDER BY candidates.rank, co.opcintype
 LIMIT 1)""")


def operator_schema(type_oid: sql.Composable, comparison: Comparison) -> sql.Composed:
    """A scalar subquery: the schema of the operator that type_oid's values are compared with (NULL when the
    type has no default class of the comparison's method, directly or through its base, generic or
    binary-coercible types).
    type_oid: an expression of type oid (a column reference, or a placeholder cast to oid)."""
    method, strategy = comparison.value
    chain = domain_chain(type_oid, sql.SQL("-1"))
    return _TEMPLATE.format(chain=chain, method=sql.Literal(method), strategy=sql.Literal(strategy))
