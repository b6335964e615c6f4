"""The incremental decision is pure: trust the keys, rebuild in full, skip, or wait within the target lag."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from matview.api import sqltext
from matview.api.spec import RefreshMode
from matview.plan.marker import Marker
from matview.refresh import Inspection, RefreshState, policy, schedule
from tests.helpers import view

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
SOURCES = [{"table": "ops.items", "columns": ["grp"]}]


def incremental_view(**refresh: Any) -> Any:
    return view(
        storage="Table",
        query="SELECT grp, sum(v) AS total FROM ops.items GROUP BY grp",
        incremental={"keyColumns": ["grp"], "sources": SOURCES},
        refresh=refresh or {"interval": "1m"},
    )


V = incremental_view()


def inspection(
    keys: int = 5,
    rows: int = 1000,
    full: tuple[str, ...] = (),
    null_keys: bool = False,
    untracked: str | None = "u1",
    recorded_untracked: str | None = "u1",
    digest: str | None = None,
    oldest_seconds: float = 10,
    mv: Any = V,
    durations: dict[str, float] | None = None,
) -> Inspection:
    state = RefreshState(untracked_version=recorded_untracked, durations=durations or {}).to_marker()
    return Inspection(
        oid=1,
        ours=True,
        populated=True,
        marker=Marker(mv.owner, "view", digest or mv.definition_digest, state),
        key_catalog={},
        pending=policy.PendingChanges(keys, full, null_keys, NOW - dt.timedelta(seconds=oldest_seconds)),
        untracked_version=untracked,
        estimated_rows=rows,
    )


def test_a_few_changed_keys_run_incrementally() -> None:
    decision = policy.decide(V, inspection(keys=5), None, False, NOW)
    assert decision == policy.Run(RefreshMode.INCREMENTAL, "5 changed key(s), 0.50% of the view")


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"full": ("TRUNCATE of ops.items",)}, "TRUNCATE of ops.items"),
        ({"null_keys": True}, "NULL"),
        ({"untracked": "u2"}, "not a declared source was written"),
        ({"untracked": None}, "foreign table"),
        ({"digest": "other"}, "another definition"),
        ({"keys": 101}, "above fullRebuildRatio 10.0%"),
    ],
)
def test_keys_that_cannot_be_trusted_or_cost_more_rebuild_in_full(changes: dict[str, Any], why: str) -> None:
    decision = policy.decide(V, inspection(**changes), None, False, NOW)
    assert isinstance(decision, policy.Run) and decision.mode == "Swap", decision
    assert why in decision.reason


def test_mode_incremental_is_not_adaptive_but_still_rebuilds_when_keys_cannot_be_trusted() -> None:
    assert policy.decide(V, inspection(keys=900), "Incremental", False, NOW) == policy.Run(
        RefreshMode.INCREMENTAL, "900 changed key(s), 90.00% of the view"
    )
    truncated = policy.decide(V, inspection(full=("TRUNCATE of ops.items",)), "Incremental", False, NOW)
    assert isinstance(truncated, policy.Run) and truncated.mode == "Swap"


def test_nothing_pending_is_a_skip_that_counts_as_current() -> None:
    assert policy.decide(V, inspection(keys=0), None, False, NOW) == policy.Skip("no changes pending", True)


def test_capture_not_installed_rebuilds() -> None:
    missing = Inspection(oid=1, ours=True, populated=True, marker=Marker(V.owner, "view", V.definition_digest))
    decision = policy.decide(V, missing, None, False, NOW)
    assert isinstance(decision, policy.Run) and "not installed" in decision.reason


def test_target_lag_waits_while_waiting_stays_within_the_target() -> None:
    lagged = incremental_view(targetLag="1m")  # looks every 15 s
    young = inspection(mv=lagged, oldest_seconds=10, durations={"Incremental": 2.0})
    decision = policy.decide(lagged, young, None, False, NOW)
    assert isinstance(decision, policy.Skip) and not decision.data_current, decision
    # 10 s old + 15 s to the next look + 2 s to apply = 27 s: within 60 s, so it waits; at 45 s it cannot.
    old = inspection(mv=lagged, oldest_seconds=45, durations={"Incremental": 2.0})
    assert isinstance(policy.decide(lagged, old, None, False, NOW), policy.Run)
    slow = inspection(mv=lagged, oldest_seconds=10, durations={"Incremental": 40.0})
    assert isinstance(policy.decide(lagged, slow, None, False, NOW), policy.Run)
    assert isinstance(policy.decide(lagged, young, None, True, NOW), policy.Run)  # a requested refresh runs now


def test_target_lag_schedules_four_looks_per_target_and_alerts_against_the_target() -> None:
    lagged = incremental_view(targetLag="1m")
    assert schedule.next_run(lagged, NOW, NOW) is not None
    due = schedule.next_run(lagged, NOW, NOW)
    assert due is not None and 15 <= (due - NOW).total_seconds() < 15 * 1.1
    assert schedule.expected_period_seconds(lagged, NOW) == 60
    assert schedule.target_lag_check_seconds(2) == 1.0


def test_staleness_is_the_age_of_the_oldest_change() -> None:
    assert policy.PendingChanges(3, oldest=NOW - dt.timedelta(seconds=42)).staleness_seconds(NOW) == 42
    assert policy.PendingChanges().staleness_seconds(NOW) == 0


def test_the_rewrite_wraps_every_read_of_a_source_and_inlines_views_only_on_the_way() -> None:
    query = sqltext.check_query(
        "WITH items AS (SELECT 1 AS grp) SELECT i.grp, v.total FROM ops.items i "
        "JOIN ops.v_totals v USING (grp) JOIN ops.other o ON o.grp = i.grp, items"
    )
    totals = sqltext.check_view_definition("SELECT items.grp, sum(items.v) AS total FROM ops.items GROUP BY items.grp")
    other = sqltext.ResolvedRelation(("ops", "other"), "r")
    catalog: dict[sqltext.Reference, sqltext.ResolvedRelation] = {
        ("ops", "items"): sqltext.ResolvedRelation(("ops", "items"), "r"),
        ("ops", "v_totals"): sqltext.ResolvedRelation(("ops", "v_totals"), "v", totals),
        ("ops", "other"): other,
    }
    result = sqltext.inject_key_filters(query, catalog, {("ops", "items"): ("grp",)}, ("grp",))
    assert result.filtered == {("ops", "items")}
    assert result.inlined == (("ops", "v_totals"),)
    text = result.query.text
    assert text.count("IN (SELECT grp FROM pg_temp.matview_changed_keys)") == 2, text
    assert "JOIN ops.other AS o" in text  # not a source: left alone
    assert ", items" in text  # the CTE named like the table is not the table


def test_hostile_names_stay_names_in_the_rewrite() -> None:
    name = 'it"s; DROP TABLE x; --'
    query = sqltext.check_query(f'SELECT * FROM ops."{name.replace(chr(34), chr(34) * 2)}"')
    catalog: dict[sqltext.Reference, sqltext.ResolvedRelation] = {
        ("ops", name): sqltext.ResolvedRelation(("ops", name), "r")
    }
    result = sqltext.inject_key_filters(query, catalog, {("ops", name): ('k"; --',)}, ("key",))
    reparsed = sqltext.relations_read(result.query)
    assert ("ops", name) in reparsed and ("pg_temp", "matview_changed_keys") in reparsed
    assert sqltext.check_query(result.query.text).text == result.query.text  # one SELECT, names stayed quoted
