"""The incremental decision is pure: trust the keys, rebuild in full, skip, or wait within the target lag."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest

from matview.api import sqltext
from matview.api.spec import RefreshMode
from matview.plan.marker import Marker
from matview.plan.observed import DependentView
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
    samples: tuple[tuple[int, float], ...] = (),
    runs: int = 3,
    swap_possible: bool = True,
    measured_at: dict[str, int] | None = None,
) -> Inspection:
    state = RefreshState(
        untracked_version=recorded_untracked,
        durations=durations or {},
        incremental_samples=samples,
        runs=runs,
        measured_at=measured_at
        if measured_at is not None
        else dict.fromkeys([*(durations or {}), *(["Incremental"] if samples else [])], runs),
    ).to_marker()
    return Inspection(
        oid=1,
        ours=True,
        populated=True,
        marker=Marker(mv.owner, "view", digest or mv.definition_digest, state),
        key_catalog={},
        pending=policy.PendingChanges(keys, full, null_keys, NOW - dt.timedelta(seconds=oldest_seconds)),
        untracked_version=untracked,
        estimated_rows=rows,
        dependents=()
        if swap_possible
        else (DependentView(1, "ops", "rollup", "m", 1, "", (), "owner", None, (), False),),
    )


def test_a_few_changed_keys_run_incrementally() -> None:
    decision = policy.decide(V, inspection(keys=5), None, False, NOW)
    assert decision == policy.Run(
        RefreshMode.INCREMENTAL,
        "5 changed key(s), 0.50% of the view, within the default fullRebuildRatio 10.0% "
        "(this view has not measured a full rebuild yet)",
    )


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"full": ("TRUNCATE of ops.items",)}, "TRUNCATE of ops.items"),
        ({"null_keys": True}, "NULL"),
        ({"untracked": "u2"}, "not a declared source was written"),
        ({"untracked": None}, "foreign table"),
        ({"digest": "other"}, "another definition"),
        ({"keys": 101}, "above the default fullRebuildRatio 10.0%"),
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
    assert text.count("grp OPERATOR(pg_catalog.=) ANY (SELECT grp FROM pg_temp.matview_changed_keys)") == 2, text
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


#: A view whose incremental refreshes cost 20 ms + 1 ms a key, and whose full rebuild takes 0.5 s.
LINEAR = ((10, 0.03), (100, 0.12), (40, 0.06), (200, 0.22))
MEASURED = {"Swap": 0.5}


@pytest.mark.parametrize(("keys", "expected"), [(5, "Incremental"), (400, "Incremental"), (600, "Swap")])
def test_auto_weighs_the_measured_full_rebuild_against_the_cost_per_key_it_fitted(keys: int, expected: str) -> None:
    # 100,000 rows: 600 keys are 0.6% of the view, far under any ratio; only the measurements say rebuild.
    decision = policy.decide(
        V, inspection(keys=keys, rows=100_000, durations=MEASURED, samples=LINEAR), None, False, NOW
    )
    assert isinstance(decision, policy.Run) and decision.mode == expected, decision
    predicted = 0.02 + 0.001 * keys
    assert f"predicted incremental {predicted:.3f}s" in decision.reason, decision.reason
    assert "20.0 ms + 1.000 ms a key, from 4 refreshes" in decision.reason
    assert "a full rebuild 0.500s measured" in decision.reason
    cheaper = "a full rebuild is cheaper" if expected == "Swap" else "incremental is cheaper"
    assert cheaper in decision.reason


def test_a_large_share_runs_incrementally_when_the_measurements_say_incremental_is_cheaper() -> None:
    slow_rebuild = {"Swap": 60.0}
    decision = policy.decide(
        V, inspection(keys=500, rows=1000, durations=slow_rebuild, samples=LINEAR), None, False, NOW
    )
    assert isinstance(decision, policy.Run) and decision.mode == "Incremental", decision


def test_fullrebuildratio_when_set_overrides_the_measurements() -> None:
    pinned = view(
        storage="Table",
        query=V.query.text,
        incremental={"keyColumns": ["grp"], "sources": SOURCES, "fullRebuildRatio": 0.5},
        refresh={"interval": "1m"},
    )
    # The measurements say rebuild at 600 keys; the override says incremental up to 50% of the rows.
    measured = inspection(mv=pinned, keys=600, rows=10_000, durations=MEASURED, samples=LINEAR)
    decision = policy.decide(pinned, measured, None, False, NOW)
    assert decision == policy.Run(
        RefreshMode.INCREMENTAL, "600 changed key(s), 6.00% of the view, within fullRebuildRatio 50.0%"
    )
    over = policy.decide(
        pinned, inspection(mv=pinned, keys=600, rows=1000, durations=MEASURED, samples=LINEAR), None, False, NOW
    )
    assert isinstance(over, policy.Run) and over.mode == "Swap" and "above fullRebuildRatio 50.0%" in over.reason


def test_without_two_sizes_of_incremental_evidence_the_default_ratio_decides_and_says_why() -> None:
    one_size = ((100, 0.12), (100, 0.13))
    decision = policy.decide(V, inspection(keys=200, rows=1000, durations=MEASURED, samples=one_size), None, False, NOW)
    assert isinstance(decision, policy.Run) and decision.mode == "Swap", decision
    assert (
        "above the default fullRebuildRatio 10.0% (this view has not measured incremental refreshes of two sizes"
        in (decision.reason)
    )


def test_when_the_two_ways_are_close_auto_re_measures_the_slower_one_once_its_measurement_is_old() -> None:
    # 300 keys: predicted 0.32 s against 0.5 s, within EXPLORE_RATIO.
    def decided(runs: int, swap_measured_at: int, keys: int = 300) -> policy.Decision:
        state = inspection(
            keys=keys,
            rows=100_000,
            durations=MEASURED,
            samples=LINEAR,
            runs=runs,
            measured_at={"Swap": swap_measured_at},
        )
        return policy.decide(V, state, None, False, NOW)

    stale = decided(runs=30, swap_measured_at=30 - policy.EXPLORE_EVERY)
    assert isinstance(stale, policy.Run) and stale.mode == "Swap" and "re-measuring" in stale.reason, stale
    assert not stale.touched_only  # what it re-measures is a whole rebuild: it must be one
    fresh = decided(runs=30, swap_measured_at=30 - policy.EXPLORE_EVERY + 1)
    assert isinstance(fresh, policy.Run) and fresh.mode == "Incremental", fresh
    far = decided(runs=30, swap_measured_at=0, keys=5)  # 25 ms against 0.5 s: not worth re-measuring
    assert isinstance(far, policy.Run) and far.mode == "Incremental", far


def test_a_measurement_records_when_it_was_made() -> None:
    state = RefreshState(runs=4).after_success("Swap", 1.0, NOW, None)
    assert state.measured_at == {"Swap": 4} and state.runs == 5
    assert not state.measured_long_ago("Swap") and state.measured_long_ago("Incremental")
    assert RefreshState.from_marker(state.to_marker()).measured_at == {"Swap": 4}
    assert RefreshState.from_marker({"measuredAt": {"Swap": "x", "Full": True, "Incremental": 3}}).measured_at == {
        "Incremental": 3
    }


def test_a_rebuild_that_cannot_swap_says_so_and_applies_the_keys() -> None:
    blocked = inspection(keys=600, rows=100_000, durations=MEASURED, samples=LINEAR, swap_possible=False)
    decision = policy.decide(V, blocked, None, False, NOW)
    assert isinstance(decision, policy.Run) and decision.mode == "Incremental", decision
    assert "a full rebuild is cheaper" in decision.reason and "so incremental" in decision.reason


@pytest.mark.parametrize(
    ("samples", "fixed", "per_key"),
    [
        (LINEAR, 0.02, 0.001),
        (((10, 0.5), (100, 0.4), (1000, 0.45)), 0.45, 0.0),  # noise: the cost does not grow with keys
        (((10, 0.001), (1000, 2.0)), 0.0, 2.0 * 1000 / (1000**2 + 10**2) + 0.001 * 10 / (1000**2 + 10**2)),
    ],
)
def test_the_cost_model_is_a_least_squares_line_with_both_parts_at_least_zero(
    samples: tuple[tuple[int, float], ...], fixed: float, per_key: float
) -> None:
    model = policy.CostModel.fit(samples)
    assert model is not None
    assert model.fixed == pytest.approx(fixed, abs=1e-9) and model.per_key == pytest.approx(per_key, rel=1e-6)
    assert policy.CostModel.fit(((5, 0.1),)) is None and policy.CostModel.fit(()) is None


def test_a_success_keeps_the_latest_incremental_samples_and_a_marker_never_breaks_the_state() -> None:
    state = RefreshState()
    for keys in range(1, policy.INCREMENTAL_SAMPLES + 3):
        state = state.after_success("Incremental", keys / 100, NOW, None, keys=keys)
    state = state.after_success("Swap", 1.0, NOW, None)  # a rebuild adds no sample
    kept = tuple((k, k / 100) for k in range(3, policy.INCREMENTAL_SAMPLES + 3))
    assert state.incremental_samples == kept
    assert RefreshState.from_marker(state.to_marker()).incremental_samples == kept
    hostile: list[Any] = [
        [1, 0.1],
        "x",
        [True, 1.0],
        [2, float("nan")],
        [3, -1],
        [0, 0.1],
        [4, "1"],
        [5, 1e309],
        [6, 2],
    ]
    assert RefreshState.from_marker({"incrementalSamples": hostile}).incremental_samples == ((1, 0.1), (6, 2.0))
    assert RefreshState.from_marker({"incrementalSamples": {"a": 1}}).incremental_samples == ()


def test_only_a_rebuild_auto_chose_over_trusted_keys_may_rebuild_only_the_partitions_they_touch() -> None:
    cheaper = policy.decide(V, inspection(keys=600, rows=100_000, durations=MEASURED, samples=LINEAR), None, False, NOW)
    assert isinstance(cheaper, policy.Run) and cheaper.mode == "Swap" and cheaper.touched_only, cheaper
    truncated = policy.decide(V, inspection(keys=600, full=("TRUNCATE ops.items",)), None, False, NOW)
    assert isinstance(truncated, policy.Run) and truncated.mode == "Swap" and not truncated.touched_only
    requested = policy.decide(V, inspection(keys=600), "Swap", False, NOW)
    assert isinstance(requested, policy.Run) and requested.mode == "Swap" and not requested.touched_only


def test_a_refresh_that_is_not_measured_leaves_its_modes_average_alone() -> None:
    state = RefreshState(durations={"Swap": 2.0}, runs=4)
    assert state.after_success("Swap", 0.1, NOW, None, measured=False).durations == {"Swap": 2.0}
    assert state.after_success("Swap", 0.1, NOW, None).durations["Swap"] < 2.0


def test_a_query_sliced_once_gives_each_period_the_rewrite_made_for_that_period() -> None:
    """period_slices rewrites the query once with stand-ins for the bounds; each period's text is what a
    rewrite for that period makes, a literal of the user's that looks like a stand-in stays as written, and
    only the engine's own bounds go in."""
    query = sqltext.check_query(
        "SELECT l.driver_id, l.lead_date, 'matview-period-from-0123' AS tag FROM ops.leads l "
        "JOIN (SELECT driver_id FROM ops.leads WHERE origin_tag = 'web') w USING (driver_id)"
    )
    catalog: dict[sqltext.Reference, sqltext.ResolvedRelation] = {
        ("ops", "leads"): sqltext.ResolvedRelation(("ops", "leads"), "r")
    }
    slices = sqltext.period_slices(query, catalog, {("ops", "leads"): "lead_date"})
    weeks = [f"{day} 00:00:00+00" for day in ("2025-12-29", "2026-01-05", "2026-01-12")]
    for lower, upper in itertools.pairwise(weeks):
        each = sqltext.inject_source_filters(
            query, catalog, {("ops", "leads"): sqltext.period_predicate("lead_date", lower, upper)}
        )
        sliced = slices.query(lower, upper)
        assert sliced.text == each.query.text, (sliced.text, each.query.text)
        assert sliced.text.count(f"'{lower}'") == 2 and "'matview-period-from-0123' AS tag" in sliced.text
    for bad in ("2026-01-05' OR true --", "now()"):
        with pytest.raises(ValueError, match="not a period bound"):
            slices.query(bad, "2026-01-12 00:00:00+00")


def test_watermarks_survive_the_marker_and_anything_malformed_is_as_if_never_recorded() -> None:
    state = RefreshState(watermarks={'"ops"."trips"': 41, '"ops"."empty"': None})
    assert RefreshState.from_marker(state.to_marker()).watermarks == state.watermarks
    after = state.after_success("Incremental", 0.1, dt.datetime(2026, 12, 6, tzinfo=dt.UTC), None, keys=3)
    assert after.watermarks == state.watermarks  # a success that read no range keeps them
    hand_written = {"watermarks": {"a": 7, "b": None, "c": "8", "d": True, "e": 1.5, "f": [1]}}
    assert RefreshState.from_marker(hand_written).watermarks == {"a": 7, "b": None}
    assert RefreshState.from_marker({"watermarks": ["a", 7]}).watermarks == {}
    assert "watermarks" not in RefreshState().to_marker()
