"""When is a view due? Pure functions of the refresh spec, the last success and the clock.

The next run is always computed from the last *successful* refresh, which is
persisted (status in Kubernetes, the marker standalone), so a restarted process
neither refreshes early nor skips a run: a run missed while nothing was running
is due at once, and only once.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math
import zoneinfo
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import TypeVar

import cronsim

from matview.api.spec import MaterializedView, RefreshSpec
from matview.outcomes import Outcome

K = TypeVar("K", bound=Hashable)

#: Jitter spreads views with the same interval; it is a fixed fraction per view, so it never drifts.
MAX_JITTER_FRACTION = 0.1
MAX_JITTER_SECONDS = 30.0
#: After a refresh found the view's lock held by another process: try again this soon.
BUSY_RETRY_SECONDS = 2.0


def _zone(spec: RefreshSpec) -> dt.tzinfo:
    return zoneinfo.ZoneInfo(spec.time_zone) if spec.time_zone else dt.UTC


@functools.lru_cache(maxsize=1 << 16)  # asked at every reschedule of every view: hash each key once
def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on key: the same in every process, replica and restart."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x1_0000_0000


def jitter_seconds(view_owner: str, interval_seconds: float) -> float:
    """A stable per-view offset in [0, min(10% of interval, 30 s))."""
    return stable_fraction(view_owner) * min(interval_seconds * MAX_JITTER_FRACTION, MAX_JITTER_SECONDS)


def spread_offset(key: str, period: float) -> float:
    """A stable offset in [0, period): drift checks of many views land evenly over the period."""
    return stable_fraction(key) * period


def next_on_spread(key: str, period: float, now: float) -> float:
    """The next time after now (clock seconds) on key's stable grid (spread_offset + k * period), at least half
    a period away: a drift check that ran late (behind a burst of creations, or after a restart) does not carry
    its lateness into the next period, so the checks of many views return to their even spread by themselves."""
    offset = spread_offset(key, period)
    at = offset + (math.floor((now - offset) / period) + 1) * period
    return at + period if at - now < period / 2 else at


def target_lag_check_seconds(target_lag_seconds: float) -> float:
    """How often a view with a target lag looks at its change log: four looks per target, at most one a
    second. Each look is cheap (a skip when nothing is pending, or when waiting stays within the target)."""
    return max(1.0, target_lag_seconds / 4)


def _interval(spec: RefreshSpec) -> float | None:
    if spec.target_lag_seconds is not None:
        return target_lag_check_seconds(spec.target_lag_seconds)
    return spec.interval_seconds


def next_run(view: MaterializedView, last_success: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    """The next time view is due, or None when it refreshes only on demand (suspended or no schedule)."""
    spec = view.refresh
    if spec.suspend:
        return None
    interval = _interval(spec)
    if interval is not None:
        if last_success is None:
            return now
        return last_success + dt.timedelta(seconds=interval + jitter_seconds(view.owner, interval))
    if spec.schedule is not None:
        zone = _zone(spec)
        start = (last_success or now).astimezone(zone)
        return next(iter(cronsim.CronSim(spec.schedule, start))).astimezone(dt.UTC)
    return None


def expected_period_seconds(view: MaterializedView, now: dt.datetime) -> float | None:
    """The expected time between refreshes (the staleness alert divides by it); None when unscheduled.
    For a target lag it is the target: the view may rightly wait that long before applying changes."""
    spec = view.refresh
    if spec.suspend:
        return None
    if spec.target_lag_seconds is not None:
        return spec.target_lag_seconds
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


@dataclass(frozen=True)
class Track:
    """What a scheduler knows about one view between refreshes: the scheduling core's whole state.

    The standalone runner and the operator keep one per view and change it only through ``after``, so
    backoff, skips, holds and manual requests behave the same in both.
    """

    last_success: dt.datetime | None = None
    failures: int = 0
    """Consecutive failed refreshes or applies (0 after a success)."""
    hold_until: dt.datetime | None = None
    """No scheduled attempt before this: backoff after a failure, one period after a skip."""
    busy_until: dt.datetime | None = None
    """No attempt at all before this, not even a requested one: another process held the view."""
    handled_request: str | None = None
    """The last value of the refresh-requested annotation acted upon."""


def held_until(track: Track) -> dt.datetime | None:
    """The end of the later of the two holds (backoff or skip; busy), or None when none is set."""
    holds = [t for t in (track.hold_until, track.busy_until) if t is not None]
    return max(holds) if holds else None


def due_at(view: MaterializedView, track: Track, now: dt.datetime) -> dt.datetime | None:
    """When the next scheduled refresh is due (None: only on request)."""
    at = next_run(view, track.last_success, now)
    hold = held_until(track)
    if at is not None and hold is not None:
        at = max(at, hold)
    return at


def next_attempt(view: MaterializedView, track: Track, now: dt.datetime, request: str | None) -> dt.datetime | None:
    """When the next refresh starts: a new request at once (after a backoff too: somebody asked), but not
    while another process holds the view; else when due."""
    if request is not None and request != track.handled_request:
        return max(now, track.busy_until) if track.busy_until is not None else now
    return due_at(view, track, now)


def wanted_now(view: MaterializedView, track: Track, now: dt.datetime, request: str | None = None) -> bool:
    """A refresh should start now: it is due, or a new manual request came in."""
    at = next_attempt(view, track, now, request)
    return at is not None and at <= now


def after(
    view: MaterializedView,
    track: Track,
    outcome: Outcome,
    now: dt.datetime,
    first_retry_seconds: float,
    completed: dt.datetime | None = None,
    request: str | None = None,
    busy_seconds: float = BUSY_RETRY_SECONDS,
) -> Track:
    """The state after an attempt ended with outcome success, failure, skipped or busy.

    Busy (the view's lock was held elsewhere) changes nothing but a busy hold of busy_seconds. Success counts from its
    completion; a failure holds the view for a backoff that doubles from
    first_retry_seconds up to the view's period; a skip (sources unchanged, or another process at work)
    holds it one period from now. A request acted upon is remembered whatever the outcome.
    """
    if outcome == Outcome.BUSY:
        # Another process held the view (an apply, a drift check): nothing ran, and a request is not
        # handled yet. Look again soon instead of holding the view for a whole period.
        return replace(track, busy_until=now + dt.timedelta(seconds=busy_seconds))
    handled = request if request is not None else track.handled_request
    if outcome == Outcome.SUCCESS:
        return Track(last_success=completed or now, handled_request=handled)
    if outcome == Outcome.FAILURE:
        failures = track.failures + 1
        delay = retry_delay(view, failures, first_retry_seconds, now)
        hold = now + dt.timedelta(seconds=delay)
        return replace(track, failures=failures, hold_until=hold, busy_until=None, handled_request=handled)
    period = next_run(view, now, now) or now + dt.timedelta(seconds=first_retry_seconds)
    return replace(track, hold_until=period, busy_until=None, handled_request=handled)


def upstream_first(keys: Sequence[K], upstream: Mapping[K, set[K]]) -> list[K]:
    """keys with each after the keys it reads (upstream[key], as far as known), else in their given order.
    A cycle (only names can seem to cycle: views of different databases) is broken in the given order."""
    ordered: list[K] = []
    placed: set[K] = set()
    pending, batch = list(keys), set(keys)
    while pending:
        ready = [key for key in pending if upstream.get(key, set()) & batch <= placed] or pending[:1]
        for key in ready:
            ordered.append(key)
            placed.add(key)
        pending = [key for key in pending if key not in placed]
    return ordered
