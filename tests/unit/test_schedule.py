"""Next-run math for interval and cron, computed from the last success."""

from __future__ import annotations

import datetime as dt

from matview.outcomes import Outcome
from matview.refresh import schedule
from matview.refresh.schedule import expected_period_seconds, jitter_seconds, next_run, retry_delay
from tests.helpers import view

UTC = dt.UTC
T0 = dt.datetime(2026, 3, 28, 10, 17, 0, tzinfo=UTC)


def test_interval_counts_from_last_success_with_a_stable_small_jitter() -> None:
    v = view(refresh={"interval": "1h"})
    jitter = jitter_seconds(v.owner, 3600)
    assert 0 <= jitter < 30
    assert next_run(v, T0, T0 + dt.timedelta(minutes=5)) == T0 + dt.timedelta(seconds=3600 + jitter)
    # Same answer whatever the clock says: a restart neither refreshes early nor pushes the run back.
    assert next_run(v, T0, T0 + dt.timedelta(minutes=50)) == next_run(v, T0, T0)
    assert jitter_seconds("ops/other", 3600) != jitter


def test_jitter_is_at_most_ten_percent() -> None:
    assert jitter_seconds("a/b", 10) < 1.0


def test_never_refreshed_interval_is_due_now() -> None:
    assert next_run(view(refresh={"interval": "5m"}), None, T0) == T0


def test_cron_next_after_last_success_and_missed_runs_are_due_once() -> None:
    v = view(refresh={"schedule": "0 * * * *"})
    assert next_run(v, T0, T0) == dt.datetime(2026, 3, 28, 11, 0, tzinfo=UTC)
    # Down for three hours: the missed run is due immediately (in the past), not three times.
    due = next_run(v, T0, T0 + dt.timedelta(hours=3))
    assert due == dt.datetime(2026, 3, 28, 11, 0, tzinfo=UTC)
    assert next_run(v, None, T0) == dt.datetime(2026, 3, 28, 11, 0, tzinfo=UTC)


def test_cron_in_a_time_zone_across_dst() -> None:
    v = view(refresh={"schedule": "30 2 * * *", "timeZone": "Europe/Madrid"})
    # 2026-03-29 02:30 does not exist in Madrid (clocks jump 02:00 -> 03:00).
    last = dt.datetime(2026, 3, 28, 1, 30, tzinfo=UTC)  # 02:30 CET on the 28th
    following = next_run(v, last, last)
    assert following is not None
    assert following > last
    assert following.tzinfo is not None
    assert next_run(v, following, following) is not None


def test_suspend_and_no_schedule_mean_on_demand_only() -> None:
    assert next_run(view(refresh={"interval": "1h", "suspend": True}), T0, T0) is None
    assert next_run(view(), T0, T0) is None
    assert expected_period_seconds(view(), T0) is None


def test_expected_period() -> None:
    assert expected_period_seconds(view(refresh={"interval": "90s"}), T0) == 90
    assert expected_period_seconds(view(refresh={"schedule": "*/15 * * * *"}), T0) == 900
    assert expected_period_seconds(view(refresh={"schedule": "0 3 * * *"}), T0) == 86400


def test_retry_delay_doubles_and_stops_at_the_period() -> None:
    hourly = view(refresh={"interval": "5m"})
    assert [retry_delay(hourly, n, 30, T0) for n in (1, 2, 3, 4, 5)] == [30, 60, 120, 240, 300]
    assert retry_delay(view(), 9, 30, T0) == 30  # on-demand views retry at the first delay


def test_the_scheduling_core_after_success_failure_skip_and_request() -> None:
    from matview.refresh.schedule import Track, after, due_at, wanted_now

    v = view(refresh={"interval": "5m"})
    fresh = Track()
    assert wanted_now(v, fresh, T0)  # never refreshed: due now
    done = after(v, fresh, Outcome.SUCCESS, T0, 30, completed=T0)
    assert not wanted_now(v, done, T0 + dt.timedelta(minutes=1))
    assert due_at(v, done, T0) == next_run(v, T0, T0)
    # Failures back off 30 s, 60 s, 120 s … capped by the period, and clear on success.
    failed = after(v, done, Outcome.FAILURE, T0, 30)
    failed = after(v, failed, Outcome.FAILURE, T0, 30)
    assert failed.failures == 2 and failed.hold_until == T0 + dt.timedelta(seconds=60)
    assert failed.last_success == T0
    assert after(v, failed, Outcome.SUCCESS, T0, 30).failures == 0
    # A skip holds the view one period from now, however long ago the last success was.
    late = T0 + dt.timedelta(hours=3)
    skipped = after(v, done, Outcome.SKIPPED, late, 30)
    assert not wanted_now(v, skipped, late + dt.timedelta(minutes=4))
    assert wanted_now(v, skipped, late + dt.timedelta(minutes=6))
    # A new request acts at once, once.
    assert wanted_now(v, skipped, late, request="r1")
    handled = after(v, skipped, Outcome.SUCCESS, late, 30, request="r1")
    assert not wanted_now(v, handled, late, request="r1")


def test_a_busy_view_is_looked_at_again_soon_and_its_request_stays_pending() -> None:
    hourly = view(refresh={"interval": "1h"})
    now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
    track = schedule.Track(last_success=now - dt.timedelta(minutes=5), handled_request="old")
    busy = schedule.after(hourly, track, Outcome.BUSY, now, first_retry_seconds=30)
    assert busy.handled_request == "old" and busy.last_success == track.last_success
    assert busy.busy_until is not None and (busy.busy_until - now).total_seconds() <= schedule.BUSY_RETRY_SECONDS
    assert schedule.wanted_now(hourly, busy, now + dt.timedelta(seconds=3), request="new")
    skipped = schedule.after(hourly, track, Outcome.SKIPPED, now, first_retry_seconds=30, request="new")
    assert skipped.handled_request == "new"  # a real skip does handle the request
