"""Auto's choice is pure: populated?, a usable unique index?, can it swap?, what did each mode cost here?"""

from __future__ import annotations

import pytest

from matview.plan.marker import Marker
from matview.plan.observed import DependentView
from matview.refresh import EXPLORE_EVERY, Inspection, RefreshState, choose_mode
from tests.helpers import view

V = view(indexes=[{"columns": ["one"], "unique": True}])
#: A dependent materialized view: build-and-swap cannot re-create it, so it blocks Swap.
ROLLUP = DependentView(1, "ops", "rollup", "m", 1, "", (), "owner", None, (), False)


def inspection(
    populated: bool = True,
    concurrent: bool = True,
    swap: bool = True,
    durations: dict[str, float] | None = None,
    runs: int = 0,
) -> Inspection:
    state = RefreshState(durations=durations or {}, runs=runs).to_marker()
    return Inspection(
        oid=1,
        ours=True,
        populated=populated,
        concurrent_possible=concurrent and populated,
        dependents=() if swap else (ROLLUP,),
        marker=Marker(V.owner, "view", "d", state),
    )


def test_unpopulated_view_gets_a_plain_refresh() -> None:
    mode, reason = choose_mode(V, inspection(populated=False))
    assert mode == "Full"
    assert "not populated" in reason


def test_no_evidence_starts_with_concurrent_then_measures_swap() -> None:
    assert choose_mode(V, inspection())[0] == "Concurrent"
    mode, reason = choose_mode(V, inspection(durations={"Concurrent": 4.0}))
    assert mode == "Swap"
    assert "measuring Swap" in reason


@pytest.mark.parametrize(
    ("durations", "expected"),
    [
        ({"Concurrent": 12.0, "Swap": 3.0}, "Swap"),  # cheap query over a large view: the diff dominates
        ({"Concurrent": 3.0, "Swap": 4.5}, "Concurrent"),  # expensive query, few changes
    ],
)
def test_evidence_picks_the_cheaper_non_blocking_mode(durations: dict[str, float], expected: str) -> None:
    mode, reason = choose_mode(V, inspection(durations=durations, runs=3))
    assert mode == expected
    assert "cheaper" in reason


@pytest.mark.parametrize("swap", [3.6, 2.41])
def test_swap_must_be_clearly_faster_to_be_chosen(swap: float) -> None:
    """A Swap costs the database more than its duration shows: a near-tie goes to Concurrent, and says why."""
    mode, reason = choose_mode(V, inspection(durations={"Concurrent": 3.0, "Swap": swap}, runs=3))
    assert mode == "Concurrent"
    if swap < 3.0:
        assert "not enough faster" in reason and "2.41s vs 3.00s" in reason
    mode, _ = choose_mode(V, inspection(durations={"Concurrent": 3.0, "Swap": 2.39}, runs=3))
    assert mode == "Swap"


def test_close_contenders_are_re_measured_now_and_then() -> None:
    close = {"Concurrent": 3.0, "Swap": 4.0}
    assert choose_mode(V, inspection(durations=close, runs=EXPLORE_EVERY - 1))[0] == "Swap"
    far = {"Concurrent": 3.0, "Swap": 30.0}
    assert choose_mode(V, inspection(durations=far, runs=EXPLORE_EVERY - 1))[0] == "Concurrent"


def test_only_one_non_blocking_mode_possible() -> None:
    assert choose_mode(V, inspection(swap=False))[0] == "Concurrent"
    mode, reason = choose_mode(V, inspection(concurrent=False))
    assert mode == "Swap" and "CONCURRENTLY is impossible" in reason


def test_plain_only_when_neither_is_possible() -> None:
    mode, reason = choose_mode(V, inspection(concurrent=False, swap=False))
    assert mode == "Full"
    assert "neither non-blocking mode is possible" in reason and "ops.rollup" in reason


def test_explicit_mode_wins() -> None:
    assert choose_mode(V, inspection(), "Full") == ("Full", "mode Full requested")


def test_state_round_trips_through_the_marker() -> None:
    import datetime as dt

    state = RefreshState().after_success("Swap", 2.0, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "v1")
    state = state.after_success("Swap", 4.0, dt.datetime(2026, 1, 2, tzinfo=dt.UTC), "v2")
    again = RefreshState.from_marker(Marker.parse(Marker("a/b", "view", "d", state.to_marker()).to_comment()).state)  # type: ignore[union-attr]
    assert again == state
    assert again.durations == {"Swap": 3.0}
    assert again.runs == 2
