"""LogicalDecoding's pure half: pgoutput messages into keys, the refusals before apply changes anything, and
a parser that nothing a server (or anyone) sends can crash with more than a DecodeError."""

from __future__ import annotations

import contextlib
import datetime as dt
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matview.errors import SpecError
from matview.plan import checks, decoding
from matview.plan.observed import Observed
from tests.helpers import view

SOURCES = [{"table": "ops.trips", "columns": ["driver_id"]}, {"table": "public.drivers", "columns": ["driver_id"]}]


def decoding_view(**incremental: Any) -> Any:
    return view(
        storage="Table",
        query="SELECT driver_id, count(*) AS n FROM ops.trips JOIN public.drivers USING (driver_id) GROUP BY 1",
        incremental={"keyColumns": ["driver_id"], "sources": SOURCES, "capture": "LogicalDecoding", **incremental},
        refresh={"interval": "1m"},
    )


V = decoding_view()


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def relation(oid: int, schema: str, table: str, columns: list[str]) -> bytes:
    body = struct.pack(">i", oid) + cstring(schema) + cstring(table) + b"f" + struct.pack(">h", len(columns))
    for name in columns:
        body += b"\x01" + cstring(name) + struct.pack(">ii", 20, -1)
    return b"R" + body


def tuple_data(*values: str | None) -> bytes:
    body = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            body += b"n"
        elif value == "<unchanged>":
            body += b"u"
        else:
            encoded = value.encode()
            body += b"t" + struct.pack(">i", len(encoded)) + encoded
    return body


def begin(micros: int) -> bytes:
    return b"B" + struct.pack(">qqi", 1000, micros, 7)


TRIPS = relation(101, "ops", "trips", ["trip_id", "driver_id", "trip_date"])


def decode(*messages: bytes) -> decoding.Changes:
    decoder, changes = decoding.Decoder(V), decoding.Changes()
    for message in messages:
        decoder.feed(message, changes)
    return changes


def test_inserts_updates_and_deletes_yield_every_key_they_touched() -> None:
    changes = decode(
        begin(86_400_000_000),
        TRIPS,
        b"I" + struct.pack(">i", 101) + b"N" + tuple_data("1", "7", "2026-01-01"),
        # a key move with the old row logged (REPLICA IDENTITY FULL): both keys
        b"U" + struct.pack(">i", 101) + b"O" + tuple_data("2", "8", "x") + b"N" + tuple_data("2", "9", "x"),
        b"U" + struct.pack(">i", 101) + b"N" + tuple_data("3", "10", "x"),  # no old row: the key did not move
        b"D" + struct.pack(">i", 101) + b"K" + tuple_data(None, "11", None),
        b"C" + struct.pack(">bqqq", 0, 1, 2, 3),
    )
    assert changes.keys == [("7",), ("8",), ("9",), ("10",), ("11",)]
    assert changes.rebuild == []
    assert changes.oldest_commit == dt.datetime(2000, 1, 2, tzinfo=dt.UTC)


def test_truncate_a_key_that_did_not_reach_the_wal_and_a_lost_key_column_ask_for_a_rebuild() -> None:
    drivers = relation(102, "public", "drivers", ["name"])  # driver_id dropped by somebody
    changes = decode(
        TRIPS,
        drivers,
        b"T" + struct.pack(">ibi", 1, 0, 101),
        b"U" + struct.pack(">i", 101) + b"N" + tuple_data("3", "<unchanged>", "x"),
        b"I" + struct.pack(">i", 102) + b"N" + tuple_data("n"),
    )
    assert changes.keys == []
    assert changes.rebuild == [
        "TRUNCATE of ops.trips",
        "a key of ops.trips too large to reach the WAL (TOASTed, unchanged)",
        "a change of public.drivers without its key columns",
    ]


def test_a_table_that_is_not_a_source_is_ignored_and_messages_without_keys_pass() -> None:
    other = relation(103, "ops", "other", ["driver_id"])
    changes = decode(other, b"I" + struct.pack(">i", 103) + b"N" + tuple_data("5"), b"Y" + b"\0" * 8, b"O" + b"\0" * 9)
    assert changes.keys == [] and changes.rebuild == []


@pytest.mark.parametrize(
    "message",
    [
        b"I" + struct.pack(">i", 999) + b"N" + tuple_data("1"),  # a relation never described
        b"I" + struct.pack(">i", 101) + b"X",  # unknown tuple tag
        b"D" + struct.pack(">i", 101) + b"N" + tuple_data("1", "2", "3"),  # a delete without the old key
        b"I" + struct.pack(">i", 101) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 1000) + b"ab",
        # a key (driver_id, the second column) that is not UTF-8
        b"I"
        + struct.pack(">i", 101)
        + b"N"
        + struct.pack(">h", 2)
        + b"t"
        + struct.pack(">i", 1)
        + b"1"
        + b"t"
        + struct.pack(">i", 2)
        + b"\xff\xfe",
        b"Z",
        b"",
    ],
)
def test_a_message_it_cannot_read_is_a_decode_error(message: bytes) -> None:
    with pytest.raises(decoding.DecodeError):
        decode(TRIPS, message)


def test_only_the_key_columns_are_read_the_others_are_checked_and_skipped() -> None:
    """With REPLICA IDENTITY FULL a change carries whole rows; only the key's columns are decoded. A column the
    view does not key on may hold bytes that are no text (another encoding): skipped, but its length still
    bounds-checked."""
    other = struct.pack(">i", 2) + b"\xff\xfe"
    row = struct.pack(">h", 3) + b"t" + other + b"t" + struct.pack(">i", 2) + b"42" + b"n"
    assert decode(TRIPS, b"I" + struct.pack(">i", 101) + b"N" + row).keys == [("42",)]
    cut = struct.pack(">h", 3) + b"t" + struct.pack(">i", 50) + b"\xff\xfe"
    with pytest.raises(decoding.DecodeError):
        decode(TRIPS, b"I" + struct.pack(">i", 101) + b"N" + cut)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_no_bytes_crash_the_decoder_with_anything_but_a_decode_error(messages: list[bytes]) -> None:
    decoder, changes = decoding.Decoder(V), decoding.Changes()
    for message in [TRIPS, *messages]:
        with contextlib.suppress(decoding.DecodeError):
            decoder.feed(message, changes)


@pytest.mark.parametrize(
    ("identity", "problem"),
    [
        (decoding.SourceIdentity("f", ()), ""),
        (decoding.SourceIdentity("d", ("driver_id", "trip_id")), ""),
        (decoding.SourceIdentity("i", ("driver_id",)), ""),
        (decoding.SourceIdentity("d", ("trip_id",)), 'driver_id of "ops"."trips" is not in its primary key'),
        (decoding.SourceIdentity("d", ()), "DEFAULT, and it has no primary key"),
        (decoding.SourceIdentity("i", ("trip_id",)), "not in its replica identity index"),
        (decoding.SourceIdentity("n", ()), "REPLICA IDENTITY NOTHING"),
    ],
)
def test_a_source_must_log_its_old_key(identity: decoding.SourceIdentity, problem: str) -> None:
    found = decoding.identity_problem(V, 0, identity)
    assert (problem in found) if problem else found == "", found
    if problem:
        assert 'ALTER TABLE "ops"."trips" REPLICA IDENTITY FULL' in found


def test_apply_refuses_a_server_or_role_that_cannot_decode_naming_the_fix() -> None:
    state = decoding.DecodingState(
        wal_level="replica",
        can_replicate=False,
        identities={("ops", "trips"): decoding.SourceIdentity("n", ())},
    )
    errors = checks.check_decoding(V, Observed(current_user="matview", decoding=state))
    text = "\n".join(f"{e.path}: {e.message}" for e in errors)
    assert "spec.incremental.capture: LogicalDecoding needs wal_level = logical" in text
    assert "ALTER ROLE matview REPLICATION" in text
    assert 'spec.incremental.sources[0].table: "ops"."trips" has REPLICA IDENTITY NOTHING' in text
    assert len(errors) == 3  # public.drivers was not found: the query check reports missing tables


def test_a_live_view_needs_trigger_capture() -> None:
    with pytest.raises(SpecError, match=r"spec\.incremental\.liveView: needs capture Triggers"):
        decoding_view(liveView=True)


def test_names_are_what_slots_and_publications_accept() -> None:
    long = view(
        "x" * 200,
        storage="Table",
        name="Ünïcode_" + "y" * 53,  # 63 bytes
        query="SELECT 1 AS k",
        incremental={"keyColumns": ["k"], "sources": SOURCES[:1], "capture": "LogicalDecoding"},
        refresh={"interval": "1m"},
    )
    slot = decoding.slot_name(long)
    assert len(slot) <= 63 and slot.replace("_", "").isalnum() and slot == slot.lower()
    assert len(decoding.publication_name(long).encode()) <= 63
    assert decoding.publication_option(V) == '"totals_mv_pub"'


def test_the_wal_a_slot_holds_is_a_series_of_its_view_removed_with_it() -> None:
    from matview.observe.metrics import RefreshMetrics
    from matview.outcomes import Outcome
    from matview.refresh import RefreshResult

    metrics = RefreshMetrics()
    now = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    result = RefreshResult("ops.mx", "Incremental", Outcome.SUCCESS, "r", now, now, 0.1, slot_retained_wal_bytes=4096)
    metrics.record("ops", "mx", result)
    labels = {"namespace": "ops", "name": "mx"}
    assert metrics.registry.get_sample_value("matview_capture_slot_retained_wal_bytes", labels) == 4096
    metrics.forget("ops", "mx")
    assert metrics.registry.get_sample_value("matview_capture_slot_retained_wal_bytes", labels) is None


@pytest.mark.parametrize(
    ("snapshot", "xid", "sees"),
    [
        ("100:105:100,103", 99, True),  # committed before the oldest running one
        ("100:105:100,103", 101, True),
        ("100:105:100,103", 103, False),  # running when the snapshot was taken
        ("100:105:100,103", 105, False),  # at xmax: not yet completed
        ("100:105:", 4000, False),
        # Across a wraparound: xid8 values of epoch 1, pgoutput's 32-bit ids (signed on the wire).
        (f"{2**32 + 2**32 - 10}:{2**32 + 2**32 + 5}:{2**32 + 2**32 - 3}", 2**32 - 20, True),
        (f"{2**32 + 2**32 - 10}:{2**32 + 2**32 + 5}:{2**32 + 2**32 - 3}", -3, False),
        (f"{2**32 + 2**32 - 10}:{2**32 + 2**32 + 5}:{2**32 + 2**32 - 3}", 2, True),
        (f"{2**32 + 2**32 - 10}:{2**32 + 2**32 + 5}:{2**32 + 2**32 - 3}", 5, False),
    ],
)
def test_a_snapshot_tells_which_committed_transactions_it_sees(snapshot: str, xid: int, sees: bool) -> None:
    assert decoding.Snapshot.parse(snapshot).sees(xid) is sees


def test_the_slot_stops_at_the_first_unseen_transaction_that_changed_a_source() -> None:
    decoder, changes = decoding.Decoder(V, decoding.Snapshot.parse("10:20:12,15")), decoding.Changes()
    insert = b"I" + struct.pack(">i", 101) + b"N" + tuple_data("1", "7", "2026-01-01")
    commit = b"C" + struct.pack(">bqqq", 0, 1, 2, 3)
    transactions = [  # (commit LSN, xid, changes a source)
        (5000, 11, True),  # seen
        (6000, 12, False),  # unseen, but changed nothing of the view's
        (7000, 15, True),  # unseen: the slot stops here
        (8000, 21, True),  # unseen too, later
    ]
    for lsn, xid, changes_source in transactions:
        decoder.feed(b"B" + struct.pack(">qqi", lsn, 0, xid), changes)
        decoder.feed(TRIPS, changes)
        if changes_source:
            decoder.feed(insert, changes)
        decoder.feed(commit, changes)
    assert changes.unseen_commit_lsn == 7000
    assert len(changes.keys) == 3  # every key is logged, seen or not: applying one twice is harmless
    assert decode(begin(1), TRIPS, insert, commit).unseen_commit_lsn is None  # no snapshot given


def test_lsns_read_and_print_as_pg_lsn_does() -> None:
    assert decoding.lsn_value("16/B374D848") == 0x16B374D848
    assert decoding.lsn_text(0x16B374D848) == "16/B374D848"
    assert decoding.lsn_text(decoding.lsn_value("0/0")) == "0/0"
