"""Change capture by logical decoding (``incremental.capture: LogicalDecoding``): the pure half.

Writers pay nothing beyond the WAL they write anyway: a publication of the declared sources and a logical
replication slot with the built-in ``pgoutput`` plugin hold their changes, and each refresh reads them
over plain SQL (``pg_logical_slot_peek_binary_changes``; no extension, no replication connection) into the
same change log the triggers fill, so the claim, the key-filtered recompute and Auto are unchanged.

No change is lost or applied to the wrong effect: the keys up to an LSN are written to the log and
committed before the slot advances to that LSN, so a crash between the two reads them again, and a key
applied twice is recomputed twice to the same rows. The slot never passes a transaction the refresh cannot
see yet (its commit flushed but not visible, as one waiting for a synchronous standby is): its keys are
read again by the next drain, once it is.

This module names the objects, says what observe reads about them, writes the statements that make,
repair and drop them, and parses pgoutput's documented message format (protocol version 1). The I/O is
``matview.refresh.drain`` (at refresh) and the planner's steps (at apply).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from matview.api.spec import CaptureMethod, MaterializedView, truncate_utf8
from matview.constants import MAX_IDENTIFIER_BYTES
from matview.plan.capture import CHANGED_AT, FULL_REBUILD, changes_id
from matview.plan.marker import Marker

PLUGIN = "pgoutput"


def uses_decoding(view: MaterializedView) -> bool:
    return view.incremental is not None and view.incremental.capture == CaptureMethod.LOGICAL_DECODING


def slot_name(view: MaterializedView) -> str:
    """Slot names allow only lower-case letters, digits and underscores: one per resource, from its owner."""
    return "matview_" + hashlib.sha256(view.owner.encode()).hexdigest()[:32]


def publication_name(view: MaterializedView) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len("_mv_pub")) + "_mv_pub"


def marker(view: MaterializedView) -> Marker:
    return Marker(view.owner, "publication", decoding_digest(view))


def decoding_digest(view: MaterializedView) -> str:
    assert view.incremental is not None
    return view.incremental.digest


@dataclass(frozen=True)
class SourceIdentity:
    """What an UPDATE or DELETE of a source writes to the WAL about the old row."""

    replica_identity: str
    """pg_class.relreplident: d (primary key), i (an index), f (full), n (nothing)."""
    identity_columns: tuple[str, ...]
    """The columns of the primary key (d) or of the replica identity index (i)."""


@dataclass(frozen=True)
class DecodingState:
    """What exists of one view's logical-decoding capture (observed)."""

    wal_level: str = ""
    can_replicate: bool = False
    """The connected role is a superuser or has REPLICATION: it may create and read slots."""
    slot_exists: bool = False
    slot_plugin: str = ""
    slot_database_ours: bool = False
    slot_lost: bool = False
    """wal_status 'lost': max_slot_wal_keep_size invalidated it, its changes are gone."""
    publication_exists: bool = False
    publication_owner: str = ""
    publication_marker: Marker | None = None
    publication_tables: frozenset[tuple[str, str]] = frozenset()
    publication_publishes_all: bool = False
    """Publishes INSERT, UPDATE, DELETE and TRUNCATE, of the tables only (no row filter, no column list)."""
    identities: dict[tuple[str, str], SourceIdentity] = field(default_factory=dict)
    """Read only for a LogicalDecoding view (the refusals before apply need them)."""

    @property
    def slot_is_ours(self) -> bool:
        """A slot has no owner to prove more: ours is a pgoutput slot of this database with our name."""
        return self.slot_exists and self.slot_plugin == PLUGIN and self.slot_database_ours


def identity_problem(view: MaterializedView, source_index: int, identity: SourceIdentity | None) -> str:
    """Why UPDATEs and DELETEs of this source could lose an old key ("" when they cannot), with the fix."""
    assert view.incremental is not None
    source = view.incremental.sources[source_index]
    label = sql.Identifier(source.schema, source.table).as_string(None)
    if identity is None or identity.replica_identity == "f":
        return ""
    fix = (
        f"ALTER TABLE {label} REPLICA IDENTITY FULL, or REPLICA IDENTITY USING INDEX on a unique index that "
        "holds those columns"
    )
    if identity.replica_identity == "n":
        return f"{label} has REPLICA IDENTITY NOTHING: an UPDATE or DELETE logs no old key; {fix}"
    missing = [c for c in source.columns if c not in identity.identity_columns]
    if not missing:
        return ""
    which = "its primary key" if identity.replica_identity == "d" else "its replica identity index"
    if identity.replica_identity == "d" and not identity.identity_columns:
        which = "its replica identity (DEFAULT, and it has no primary key)"
    return (
        f"{', '.join(missing)} of {label} is not in {which}: an UPDATE that moves a row to another key would "
        f"log only the new key; {fix}"
    )


def create_publication_statements(view: MaterializedView) -> list[sql.Composed]:
    assert view.incremental is not None
    name = sql.Identifier(publication_name(view))
    tables = sql.SQL(", ").join(sql.Identifier(s.schema, s.table) for s in view.incremental.sources)
    return [
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete, truncate')").format(
            name, tables
        ),
        sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(name, sql.Literal(marker(view).to_comment())),
    ]


def drop_publication_statement(view: MaterializedView) -> sql.Composed:
    return sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication_name(view)))


def uninstall_statements(view: MaterializedView) -> list[sql.Composed]:
    """Undo a first installation whose build failed (apply proved the names ours before making them)."""
    return [drop_slot_statement(view), drop_publication_statement(view)] if uses_decoding(view) else []


# Every function the engine calls here is schema-qualified: a look-alike planted on the search_path never runs.
def create_slot_statement(view: MaterializedView) -> sql.Composed:
    return sql.SQL("SELECT pg_catalog.pg_create_logical_replication_slot({}, {})").format(
        sql.Literal(slot_name(view)), sql.Literal(PLUGIN)
    )


def drop_slot_statement(view: MaterializedView) -> sql.Composed:
    return sql.SQL(
        "SELECT pg_catalog.pg_drop_replication_slot(s.slot_name) FROM pg_catalog.pg_replication_slots AS s "
        "WHERE s.slot_name OPERATOR(pg_catalog.=) {}::pg_catalog.name"
    ).format(sql.Literal(slot_name(view)))


#: Decoding reads only WAL already flushed to disk. Under synchronous_commit = off a write that committed
#: (and that a refresh's snapshot would see) may not be flushed yet. A transaction that writes one WAL record
#: (a transactional logical message, which any role may emit and pgoutput passes on only to a subscriber that
#: asks for messages) and commits with synchronous_commit = local flushes the WAL up to its commit: every
#: write committed before the drain began becomes readable at once, without waiting for the WAL writer and
#: never for a standby.
FLUSH_QUERY = sql.SQL(
    "SELECT pg_catalog.set_config('synchronous_commit', 'local', true), "
    "pg_catalog.pg_logical_emit_message(true, 'matview', '')"
)
#: PostgreSQL moves a slot's restart_lsn (where the next read starts) only to a running-transactions record
#: the slot has passed, and writes one by itself every 15 s or at a checkpoint: until then each drain decodes
#: again everything since the last one, a rebuild's whole WAL included. From PostgreSQL 16 a role allowed to
#: run pg_log_standby_snapshot() writes one just before the LSN a drain reads up to, so the advance can move
#: restart_lsn there and the next drain reads only what is new.
#: A role without EXECUTE (the default: superusers only) skips it and keeps the 15 s pace. The check is a query
#: of its own: PostgreSQL checks EXECUTE on every function a statement names before it runs, even one a CASE
#: would not reach.
LOG_SNAPSHOT_MIN_VERSION = 160000
MAY_LOG_SNAPSHOT_QUERY = sql.SQL(
    "SELECT pg_catalog.has_function_privilege('pg_catalog.pg_log_standby_snapshot()', 'EXECUTE')"
)
LOG_SNAPSHOT_QUERY = sql.SQL("SELECT pg_catalog.pg_log_standby_snapshot()")
#: The publication as apply makes it (alias p for pg_catalog.pg_publication): INSERT, UPDATE, DELETE and
#: TRUNCATE of the tables it lists, whole rows: no row filter, no column list, no schema, not FOR ALL TABLES.
#: Anything less loses changes of the sources silently. (prqual and prattrs exist from PostgreSQL 15: read
#: through to_jsonb so the query stays valid on older servers.)
PUBLISHES_EVERY_CHANGE = sql.SQL(
    "p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate AND NOT p.puballtables "
    "AND NOT EXISTS (SELECT FROM pg_catalog.pg_publication_rel AS r WHERE r.prpubid OPERATOR(pg_catalog.=) p.oid "
    "AND (pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.->>) 'prqual' IS NOT NULL "
    "OR pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.->>) 'prattrs' IS NOT NULL)) "
    "AND NOT EXISTS (SELECT FROM pg_catalog.pg_publication_namespace AS pn "
    "WHERE pn.pnpubid OPERATOR(pg_catalog.=) p.oid)"
)
#: The tables publication p lists, as [schema, table] pairs.
PUBLISHED_TABLES = sql.SQL(
    "ARRAY(SELECT pg_catalog.jsonb_build_array(n.nspname, c.relname) FROM pg_catalog.pg_publication_rel AS r "
    "JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) r.prrelid "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
    "WHERE r.prpubid OPERATOR(pg_catalog.=) p.oid)"
)
#: The slot as it is now and the publication (one changed by hand would silently stop publishing some writes:
#: drain checks it is still as apply made it): its WAL status, the WAL it holds, whether the publication exists,
#: publishes every change, and which tables. Read from the catalogs and pg_get_replication_slots() rather than the
#: pg_replication_slots and pg_publication_tables views: a refresh makes temporary tables, which resets the
#: session's cached plans, so this is planned again at every refresh, and planning the views cost about a
#: millisecond. A refresh reads it under the view's lock in the batch that takes it, on its own connection, whose
#: catalog caches no decoding has emptied.
SLOT_QUERY = sql.SQL(
    "SELECT s.wal_status, "
    "(pg_catalog.pg_current_wal_lsn() OPERATOR(pg_catalog.-) s.restart_lsn)::pg_catalog.int8, "
    "p.oid IS NOT NULL, COALESCE({publishes}, false), {tables} "
    "FROM (SELECT) AS one LEFT JOIN pg_catalog.pg_get_replication_slots() AS s "
    "ON s.slot_name OPERATOR(pg_catalog.=) %(slot)s::pg_catalog.name "
    "AND s.plugin OPERATOR(pg_catalog.=) 'pgoutput'::pg_catalog.name "
    "AND s.datoid OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database AS d "
    "WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()) "
    "LEFT JOIN pg_catalog.pg_publication AS p ON p.pubname OPERATOR(pg_catalog.=) %(publication)s::pg_catalog.name"
).format(publishes=PUBLISHES_EVERY_CHANGE, tables=PUBLISHED_TABLES)
#: The reading transaction's setting that holds the LSN its peek reads up to.
UPTO_SETTING = "matview.drain_upto"
#: The first statement of the transaction that reads the slot, after the flush: its snapshot (a transaction it
#: does not see holds the slot back: Snapshot.sees) and the LSN to read up to (the flushed WAL: changes committed
#: later wait), kept in UPTO_SETTING so that the peek can follow in the same message.
READ_POINT_QUERY = sql.SQL(
    "SELECT pg_catalog.pg_current_snapshot()::pg_catalog.text, "
    "pg_catalog.set_config({}, pg_catalog.pg_current_wal_flush_lsn()::pg_catalog.text, true)"
).format(sql.Literal(UPTO_SETTING))
PEEK_QUERY = sql.SQL(
    "SELECT c.data FROM pg_catalog.pg_logical_slot_peek_binary_changes("
    "%(slot)s::pg_catalog.name, pg_catalog.current_setting({})::pg_catalog.pg_lsn, NULL::pg_catalog.int4, "
    "VARIADIC ARRAY['proto_version', '1', 'publication_names', %(publication)s]::pg_catalog.text[]) AS c"
).format(sql.Literal(UPTO_SETTING))
ADVANCE_QUERY = sql.SQL(
    "SELECT pg_catalog.pg_replication_slot_advance(%(slot)s::pg_catalog.name, %(upto)s::pg_catalog.pg_lsn)"
)


def lsn_text(lsn: int) -> str:
    """An LSN as pg_lsn's text form."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_value(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class Snapshot:
    """pg_current_snapshot() as text (xmin:xmax:xip,...), asked whether it sees a committed transaction by
    the 32-bit id pgoutput gives. A drain takes it before reading: a transaction it does not see may still be
    invisible to the refresh that follows, whereas one it sees is seen by every later snapshot."""

    xmax: int
    in_progress: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        _, xmax, xip = text.split(":")
        return cls(int(xmax) & 0xFFFFFFFF, frozenset(int(x) & 0xFFFFFFFF for x in xip.split(",") if x))

    def sees(self, xid: int) -> bool:
        """For a transaction known to have committed: not at or past xmax (modulo 2^32, as PostgreSQL
        compares recent ids), and not still running when the snapshot was taken."""
        xid &= 0xFFFFFFFF  # pgoutput's Int32 is read signed
        if (xid - self.xmax) & 0xFFFFFFFF < 0x80000000:
            return False
        return xid not in self.in_progress


def publication_option(view: MaterializedView) -> str:
    """pgoutput splits publication_names like an identifier list: the name goes quoted."""
    return '"' + publication_name(view).replace('"', '""') + '"'


def insert_keys_statement(view: MaterializedView) -> sql.Composed:
    """One log row from a JSON object of key arrays (text, as pgoutput sends them): jsonb_populate_record
    converts each through the log column's own type, whatever it is."""
    log = changes_id(view)
    assert view.incremental is not None
    columns = sql.SQL(", ").join(sql.Identifier(k) for k in (*view.incremental.key_columns, CHANGED_AT))
    picked = sql.SQL(", ").join(sql.Identifier("r", k) for k in (*view.incremental.key_columns, CHANGED_AT))
    return sql.SQL(
        "INSERT INTO {} ({}) SELECT {} FROM pg_catalog.jsonb_populate_record(NULL::{}, %s::pg_catalog.jsonb) AS r"
    ).format(log, columns, picked, log)


def request_rebuild_statement(view: MaterializedView) -> sql.Composed:
    return sql.SQL("INSERT INTO {} ({}) VALUES (%s)").format(changes_id(view), sql.Identifier(FULL_REBUILD))


# --- pgoutput, protocol version 1 (https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html)


class DecodeError(ValueError):
    """A message this parser cannot read: the drain requests a full rebuild rather than guess."""


_EPOCH_2000 = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


@dataclass
class Changes:
    """What a run of pgoutput messages means for one view: keys (as text, one tuple per changed row and
    side), and the reasons for a full rebuild."""

    keys: list[tuple[str | None, ...]] = field(default_factory=list)
    rebuild: list[str] = field(default_factory=list)
    oldest_commit: dt.datetime | None = None
    unseen_commit_lsn: int | None = None
    """The commit LSN of the first transaction here that changed a source and that the drain's snapshot does
    not see: the slot may advance up to it, not past it."""


class Decoder:
    """Reads pgoutput messages in order, keeping the relation descriptions they announce."""

    def __init__(self, view: MaterializedView, snapshot: Snapshot | None = None) -> None:
        assert view.incremental is not None
        self.sources = {s.relation: s.columns for s in view.incremental.sources}
        self.relations: dict[int, tuple[tuple[str, str], tuple[int, ...] | None]] = {}
        """oid → (schema, table), the key columns' positions (None: not a source, or a key column missing)."""
        self.commit_time: dt.datetime | None = None
        self.snapshot = snapshot
        self._unseen_lsn: int | None = None
        """The current transaction's commit LSN when the snapshot does not see it."""

    def feed(self, message: bytes, into: Changes) -> None:
        try:
            self._feed(message, into)
        except (UnicodeDecodeError, struct.error, OverflowError) as error:
            raise DecodeError(str(error)) from error

    def _feed(self, message: bytes, into: Changes) -> None:
        reader = _Reader(message)
        kind = reader.byte()
        if kind == b"B":
            commit_lsn = reader.int64()
            micros = reader.int64()
            xid = reader.int32()
            self._unseen_lsn = None if self.snapshot is None or self.snapshot.sees(xid) else commit_lsn
            self.commit_time = _EPOCH_2000 + dt.timedelta(microseconds=micros)
            if into.oldest_commit is None or self.commit_time < into.oldest_commit:
                into.oldest_commit = self.commit_time
        elif kind == b"R":
            self._relation(reader)
        elif kind == b"I":
            oid = reader.int32()
            self._tuple_after(reader, oid, b"N", into)
        elif kind == b"U":
            oid = reader.int32()
            tag = reader.byte()
            if tag in (b"K", b"O"):
                self._keys(reader, oid, into)
                tag = reader.byte()
            if tag != b"N":
                raise DecodeError(f"UPDATE message without a new tuple (tag {tag!r})")
            self._keys(reader, oid, into)
        elif kind == b"D":
            oid = reader.int32()
            tag = reader.byte()
            if tag not in (b"K", b"O"):
                raise DecodeError(f"DELETE message without an old key (tag {tag!r})")
            self._keys(reader, oid, into)
        elif kind == b"T":
            count = reader.int32()
            reader.byte()
            for _ in range(count):
                relation = self.relations.get(reader.int32())
                if relation is not None:
                    self._changed(into)
                    into.rebuild.append(f"TRUNCATE of {relation[0][0]}.{relation[0][1]}")
        elif kind in (b"C", b"O", b"Y", b"M"):
            pass  # commit, origin, type, logical message: nothing about keys
        else:
            raise DecodeError(f"unknown pgoutput message {kind!r}")

    def _relation(self, reader: _Reader) -> None:
        oid = reader.int32()
        schema, table = reader.string(), reader.string()
        reader.byte()  # replica identity setting
        names = []
        for _ in range(reader.int16()):
            reader.byte()
            names.append(reader.string())
            reader.int32()
            reader.int32()
        columns = self.sources.get((schema, table))
        positions = None
        if columns is not None and all(c in names for c in columns):
            positions = tuple(names.index(c) for c in columns)
        self.relations[oid] = ((schema, table), positions)

    def _tuple_after(self, reader: _Reader, oid: int, expected: bytes, into: Changes) -> None:
        tag = reader.byte()
        if tag != expected:
            raise DecodeError(f"expected tuple {expected!r}, got {tag!r}")
        self._keys(reader, oid, into)

    def _keys(self, reader: _Reader, oid: int, into: Changes) -> None:
        relation = self.relations.get(oid)
        if relation is None:
            raise DecodeError(f"a change of relation {oid} before its description")
        name, positions = relation
        values = reader.tuple_data(positions or ())  # no key to read: the tuple is only checked and skipped
        if name not in self.sources:
            return  # added to the publication by hand: not a source (apply repairs the publication)
        self._changed(into)
        if positions is None:
            into.rebuild.append(f"a change of {name[0]}.{name[1]} without its key columns")
            return
        key = tuple(values[p] if p < len(values) else None for p in positions)
        if any(part is _UNCHANGED for part in key):
            into.rebuild.append(f"a key of {name[0]}.{name[1]} too large to reach the WAL (TOASTed, unchanged)")
            return
        into.keys.append(key)

    def _changed(self, into: Changes) -> None:
        """The current transaction changed a source: if the snapshot does not see it, the slot stops at it."""
        if self._unseen_lsn is not None and (
            into.unseen_commit_lsn is None or self._unseen_lsn < into.unseen_commit_lsn
        ):
            into.unseen_commit_lsn = self._unseen_lsn


_UNCHANGED: Any = object()


_INT16, _INT32, _INT64 = struct.Struct(">h"), struct.Struct(">i"), struct.Struct(">q")
_NULL, _UNCHANGED_TOAST, _TEXT = ord("n"), ord("u"), ord("t")


class _Reader:
    """Bounds-checked reads from one message: a malformed one raises DecodeError, never IndexError."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise DecodeError("message shorter than its fields")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def byte(self) -> bytes:
        return self.take(1)

    def _number(self, kind: struct.Struct) -> int:
        if self.at + kind.size > len(self.data):
            raise DecodeError("message shorter than its fields")
        (value,) = kind.unpack_from(self.data, self.at)
        self.at += kind.size
        return int(value)

    def int16(self) -> int:
        return self._number(_INT16)

    def int32(self) -> int:
        return self._number(_INT32)

    def int64(self) -> int:
        return self._number(_INT64)

    def string(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise DecodeError("unterminated string")
        text = self.data[self.at : end].decode("utf-8", errors="replace")
        self.at = end + 1
        return text

    def tuple_data(self, wanted: tuple[int, ...]) -> list[Any]:
        """A tuple's columns: None for a null, _UNCHANGED for an unchanged TOASTed value, text otherwise; only the
        columns at the wanted positions are decoded (the others are checked and skipped: with REPLICA IDENTITY
        FULL an UPDATE carries two whole rows, and a key is one or two of their columns)."""
        count = self._number(_INT16)
        data, at, end = self.data, self.at, len(self.data)
        values: list[Any] = [None] * max(count, 0)
        for position in range(count):
            if at >= end:
                raise DecodeError("message shorter than its fields")
            kind = data[at]
            at += 1
            if kind == _TEXT:
                if at + 4 > end:
                    raise DecodeError("message shorter than its fields")
                (size,) = _INT32.unpack_from(data, at)
                at += 4
                if size < 0 or at + size > end:
                    raise DecodeError("message shorter than its fields")
                if position in wanted:
                    values[position] = data[at : at + size].decode("utf-8", errors="strict")
                at += size
            elif kind == _UNCHANGED_TOAST:
                values[position] = _UNCHANGED
            elif kind != _NULL:
                raise DecodeError(f"unknown column kind {bytes([kind])!r}")
        self.at = at
        return values


def log_document(view: MaterializedView, keys: list[tuple[str | None, ...]], changed_at: dt.datetime) -> str:
    """The JSON insert_keys_statement turns into one log row: each key column's values, in one array."""
    assert view.incremental is not None
    document: dict[str, Any] = {
        column: [key[i] for key in keys] for i, column in enumerate(view.incremental.key_columns)
    }
    document[CHANGED_AT] = changed_at.isoformat()
    return json.dumps(document)
