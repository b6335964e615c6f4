"""When is a view due? Pure functions of the refresh spec, the last success and the clock.

The next run is always computed from the last *successful* refresh, which is
persisted (status in Kubernetes, the marker standalone), so a restarted process
neither refreshes early nor skips a run: a run missed while nothing was running
is due at once, and only once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import zoneinfo
from itertools import islice

import cronsim

from matview.spec import MaterializedView, RefreshSpec

#: Jitter spreads views with the same interval; it is a fixed fraction per view, so it never drifts.
MAX_JITTER_FRACTION = 0.1
MAX_JITTER_SECONDS = 30.0


def _zone(spec: RefreshSpec) -> dt.tzinfo:
    return zoneinfo.ZoneInfo(spec.time_zone) if spec.time_zone else dt.UTC


def jitter_seconds(view_owner: str, interval_seconds: float) -> float:
    """A stable per-view offset in [0, min(10% of interval, 30 s))."""
    fraction = int(hashlib.sha256(view_owner.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return fraction * min(interval_seconds * MAX_JITTER_FRACTION, MAX_JITTER_SECONDS)


def next_run(view: MaterializedView, last_success: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    """The next time view is due, or None when it refreshes only on demand (suspended or no schedule)."""
    spec = view.refresh
    if spec.suspend:
        return None
    if spec.interval_seconds is not None:
        if last_success is None:
            return now
        return last_success + dt.timedelta(
            seconds=spec.interval_seconds + jitter_seconds(view.owner, spec.interval_seconds)
        )
    if spec.schedule is not None:
        zone = _zone(spec)
        start = (last_success or now).astimezone(zone)
        return next(iter(cronsim.CronSim(spec.schedule, start))).astimezone(dt.UTC)
    return None


def expected_period_seconds(view: MaterializedView, now: dt.datetime) -> float | None:
    """The expected time between refreshes (the staleness alert divides by it); None when unscheduled."""
    spec = view.refresh
    if spec.suspend:
        return None
    if spec.interval_seconds is not None:
        return spec.interval_seconds
    if spec.schedule is not None:
        times = list(islice(cronsim.CronSim(spec.schedule, now.astimezone(_zone(spec))), 2))
        return (times[1] - times[0]).total_seconds()
    return None


def retry_delay(view: MaterializedView, failures: int, first_retry_seconds: float, now: dt.datetime) -> float:
    """Seconds to wait after `failures` consecutive failures: doubling from the first retry, capped by the period."""
    period = expected_period_seconds(view, now) or first_retry_seconds
    return float(min(first_retry_seconds * 2 ** (failures - 1), period))
