"""What observe learns about the database, as plain frozen data: the facts the pure planner compares
with the spec. The reads that fill them are in catalog.py (apply) and upstream.py (what a view reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from matview.api import sqltext
from matview.plan import capture, decoding
from matview.plan.marker import Marker

Connection = psycopg.Connection[tuple[Any, ...]]
"""Every connection the engine uses returns plain tuples."""

Column = tuple[str, str]
"""(name, type as format_type prints it)."""


@dataclass(frozen=True)
class IndexState:
    schema: str
    name: str
    table_oid: int
    marker: Marker | None
    valid: bool


@dataclass(frozen=True)
class RelationState:
    oid: int
    schema: str
    name: str
    relkind: str
    marker: Marker | None
    populated: bool
    columns: tuple[Column, ...]
    owner: str = ""
    """The role that owns it: markers are comments, which any owner can write, so a marker proves nothing
    unless the owner is one the engine trusts (statements.trusted_owners)."""
    has_triggers: bool = False


@dataclass(frozen=True)
class LivePart:
    """Something holding the name of the live view's function or row shape (plan/live.py), ours or not."""

    label: str
    owner: str
    marker: Marker | None


@dataclass(frozen=True)
class DependentView:
    """A view that reads the materialized view, captured so a swap can re-create it."""

    oid: int
    schema: str
    name: str
    relkind: str
    depth: int
    definition: str
    options: tuple[str, ...]
    owner: str
    comment: str | None
    acl: tuple[tuple[str, str, bool], ...]
    """(grantee or PUBLIC, privilege, grantable)."""
    has_triggers: bool


@dataclass(frozen=True)
class OwnedSequence:
    """The sequence that gives a column its values: an append-only source's ranges are safe only when each
    value it gives is larger than every one given before, and is used at once (no cache of values per
    session)."""

    name: str
    """Schema-qualified, quoted as needed."""
    cache: int
    increment: int
    readable: bool
    """The operator's role may read its last value (SELECT or USAGE)."""


@dataclass(frozen=True)
class TableState:
    oid: int
    relkind: str
    columns: tuple[str, ...]
    column_types: tuple[tuple[int, int, str], ...] = ()
    """(type oid, typmod, as format_type prints it) for each of columns; a domain's oid and typmod are its base
    type's, as a query's result describes it, and its name is the domain's."""
    column_sequences: tuple[OwnedSequence | None, ...] = ()
    """The sequence each of columns owns (an identity's, a serial's), None where it owns none."""
    has_children: bool = False
    """Other tables inherit from it (or it is partitioned): writes to them fire none of its triggers."""
    readable: bool = True
    """The role that builds the view (spec.runAsRole, else the operator's) may SELECT from it."""
    system: bool = False
    """A system catalog (pg_catalog, information_schema, pg_toast)."""


@dataclass(frozen=True)
class KeyType:
    """The type of one of the view's key columns, as the query produces it."""

    oid: int
    typmod: int
    name: str
    hashable: bool
    """Has default btree and hash operator classes: the claim compares, hashes and indexes keys."""
    equality_schema: str = ""
    """The schema of the equality its default btree operator class uses (pg_catalog for PostgreSQL's own
    types; an extension's schema for citext): the engine compares keys with pg_catalog's (comparisons.KEY_EQUALS)."""


@dataclass
class Observed:
    """Everything the planner needs to know about the database, for one resource."""

    current_user: str = ""
    schema_exists: bool = False
    relation: RelationState | None = None
    indexes: dict[str, IndexState] = field(default_factory=dict)
    """Indexes on the view, by name."""
    names_in_schema: dict[tuple[str, str], RelationState] = field(default_factory=dict)
    """Relations that hold a name the plan wants to use, by (schema, name)."""
    staging: list[RelationState] = field(default_factory=list)
    query_columns: tuple[Column, ...] | None = None
    query_error: str | None = None
    grants: dict[str, frozenset[str]] = field(default_factory=dict)
    """Privileges on the view by grantee (PUBLIC for everyone), the owner excluded."""
    roles: frozenset[str] = frozenset()
    tables: dict[tuple[str, str], TableState] = field(default_factory=dict)
    owned_supporting: list[IndexState] = field(default_factory=list)
    dependents: list[DependentView] = field(default_factory=list)
    run_as_role: RoleAccess | None = None
    """What the operator may do with spec.runAsRole (None when the spec names none)."""
    capture: capture.CaptureState | None = None
    """The view's change capture (observed for storage Table)."""
    decoding: decoding.DecodingState | None = None
    """The view's publication and replication slot (observed for storage Table)."""
    live: RelationState | None = None
    """What holds the live view's name (observed for storage Table), ours or not."""
    live_parts: list[LivePart] = field(default_factory=list)
    """What holds the names of the live view's function and row shape."""
    key_types: dict[str, KeyType] = field(default_factory=dict)
    partition_key: KeyType | None = None
    """The type of spec.partitioning.column as the query produces it (None: not partitioned, or not known)."""
    """The query's result columns that are declared keys (spec.incremental), by name."""
    key_catalog: sqltext.KeyCatalog | None = None
    """What each relation the query reads resolves to, through plain views (spec.incremental)."""
    key_catalog_error: str | None = None
    search_path_creators: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """spec.searchPath schemas → roles other than the owner that may CREATE in them (PUBLIC for everyone)."""
    filtered_query_error: str | None = None
    """Why the key-filtered query does not compile, when it does not (a refresh would fail every time)."""


@dataclass(frozen=True)
class RoleAccess:
    """Whether the connected role can build views as another role and then manage them."""

    exists: bool
    can_set: bool
    """SET ROLE to it is allowed (membership; PostgreSQL 16+: the SET option)."""
    has_privileges: bool
    """It holds the role's privileges (INHERIT), so it may alter, index, refresh and drop what that role owns."""
    superuser: bool = False
    """A superuser: every query of its views could do anything in the database."""

    @property
    def usable(self) -> bool:
        return self.exists and self.can_set and self.has_privileges


@dataclass(frozen=True)
class UpstreamRelation:
    """A table, materialized view or foreign table a view reads, directly or through plain views."""

    oid: int
    schema: str
    name: str
    relkind: str
    fingerprint: tuple[Any, ...]
    """Changes when the relation's data may have: relfilenode, write counters, an upstream MV's marker."""
