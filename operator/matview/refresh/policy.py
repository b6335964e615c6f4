"""The refresh decisions, pure: given the spec, catalog facts and the remembered state, what to run and why.

No I/O here (the house rule for decisions): ``facts`` reads the catalog, ``matview.refresh.refresh``
executes. Auto's evidence (durations measured per mode, kept in the view's marker), the choice of mode,
the one fallback from CONCURRENTLY, and the bounded set of failure reasons all live in this module, so
each can be tested without a database.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg

from matview import timestamps
from matview.api import sqltext
from matview.api.spec import MaterializedView, RefreshMode, Storage
from matview.errors import MatviewError
from matview.outcomes import FailureReason
from matview.plan.marker import Marker
from matview.plan.observed import DependentView
from matview.refresh import verify
from matview.refresh.schedule import target_lag_check_seconds

#: Weight of the newest measurement in the per-mode duration average.
EVIDENCE_WEIGHT = 0.5
#: Every this many refreshes, Auto measures the other non-blocking mode again when the two are close.
EXPLORE_EVERY = 10
#: "Close": the slower mode is within this factor of the faster one.
EXPLORE_RATIO = 2.0
#: Auto swaps only when Swap was measured at most this share of Concurrent's duration. What Swap costs
#: beyond its own duration falls on the whole database: an ACCESS EXCLUSIVE lock for the renames, every
#: session's cached plans and relation entries of the view invalidated, a new relation and its indexes
#: written into the catalogs and removed again each time. On a small view the two durations are within noise
#: of each other while a Swap costs the machine about twice as much (benchmarks/overhead.py, 100 rows: 32
#: statements against 12, 3.7 ms of the engine's CPU against 1.9), so near-ties go to Concurrent.
SWAP_ADVANTAGE = 0.8
#: How many of the latest incremental refreshes, as (changed keys, seconds), Auto keeps to predict the next.
INCREMENTAL_SAMPLES = 8
#: Auto's share of changed keys above which it rebuilds in full while this view has not measured both ways
#: (spec.incremental.fullRebuildRatio, when set, replaces the measured choice altogether).
DEFAULT_FULL_REBUILD_RATIO = 0.1
#: SQLSTATEs of CONCURRENTLY failures that a non-concurrent refresh fixes (not populated; no usable index).
CONCURRENT_FALLBACK_SQLSTATES = frozenset({"0A000", "55000"})


@dataclass(frozen=True)
class RefreshState:
    """What the engine remembers between refreshes; persisted in the view's marker."""

    last_success: dt.datetime | None = None
    durations: dict[str, float] = field(default_factory=dict)
    """Moving average of successful refresh durations per mode, in seconds."""
    source_version: str | None = None
    """Fingerprint of the base tables as seen by the last successful refresh (onlyIfChanged)."""
    runs: int = 0
    untracked_version: str | None = None
    """Fingerprint of the tables an incremental view reads that are not declared sources."""
    last_verified: dt.datetime | None = None
    incremental_samples: tuple[tuple[int, float], ...] = ()
    """The latest incremental refreshes as (changed keys, seconds), oldest first: Auto's cost per key."""
    measured_at: dict[str, int] = field(default_factory=dict)
    """Per mode, the value of runs when it was last measured: Auto re-measures only what has gone stale."""
    watermarks: dict[str, int | None] = field(default_factory=dict)
    """Per append-only source (refresh.ranges.source_label): the largest value of its increasing column that
    the data holds every row up to (None: the table had no rows). A source missing here has none yet."""

    @classmethod
    def from_marker(cls, data: dict[str, Any]) -> RefreshState:
        durations = data.get("durations")
        return cls(
            last_success=timestamps.parse(data.get("lastSuccess")),
            durations={str(k): float(v) for k, v in durations.items() if isinstance(v, int | float)}
            if isinstance(durations, dict)
            else {},
            source_version=data.get("sourceVersion") if isinstance(data.get("sourceVersion"), str) else None,
            runs=int(data.get("runs", 0)) if isinstance(data.get("runs", 0), int) else 0,
            untracked_version=data.get("untrackedVersion") if isinstance(data.get("untrackedVersion"), str) else None,
            last_verified=timestamps.parse(data.get("lastVerified")),
            incremental_samples=_samples(data.get("incrementalSamples")),
            measured_at={str(k): v for k, v in measured_at.items() if isinstance(v, int) and not isinstance(v, bool)}
            if isinstance(measured_at := data.get("measuredAt"), dict)
            else {},
            watermarks=_watermarks(data.get("watermarks")),
        )

    def to_marker(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "durations": {k: round(v, 4) for k, v in sorted(self.durations.items())},
            "runs": self.runs,
        }
        if self.last_success is not None:
            data["lastSuccess"] = timestamps.rfc3339(self.last_success)
        if self.source_version is not None:
            data["sourceVersion"] = self.source_version
        if self.untracked_version is not None:
            data["untrackedVersion"] = self.untracked_version
        if self.last_verified is not None:
            data["lastVerified"] = timestamps.rfc3339(self.last_verified)
        if self.measured_at:
            data["measuredAt"] = dict(sorted(self.measured_at.items()))
        if self.incremental_samples:
            data["incrementalSamples"] = [[keys, round(seconds, 5)] for keys, seconds in self.incremental_samples]
        if self.watermarks:
            data["watermarks"] = dict(sorted(self.watermarks.items()))
        return data

    def after_success(
        self,
        mode: str,
        seconds: float,
        when: dt.datetime,
        version: str | None,
        untracked: str | None = None,
        keys: int | None = None,
        measured: bool = True,
    ) -> RefreshState:
        """The state after a successful refresh in mode that took seconds (an incremental one applied keys;
        not ``measured``: its duration is not its mode's usual work, and is not averaged in)."""
        samples = self.incremental_samples
        if mode == RefreshMode.INCREMENTAL and keys:
            samples = (*samples, (keys, seconds))[-INCREMENTAL_SAMPLES:]
        return replace(
            self.measured(mode, seconds) if measured else self,
            last_success=when,
            source_version=version,
            untracked_version=untracked,
            runs=self.runs + 1,
            incremental_samples=samples,
        )

    def measured(self, mode: str, seconds: float) -> RefreshState:
        """The moving average of mode's duration with one more measurement."""
        previous = self.durations.get(mode)
        average = seconds if previous is None else EVIDENCE_WEIGHT * seconds + (1 - EVIDENCE_WEIGHT) * previous
        return replace(
            self, durations={**self.durations, mode: average}, measured_at={**self.measured_at, mode: self.runs}
        )

    def measured_long_ago(self, mode: str) -> bool:
        """mode's last measurement is EXPLORE_EVERY refreshes old or more (or it was never measured)."""
        return self.runs - self.measured_at.get(mode, -EXPLORE_EVERY) >= EXPLORE_EVERY


def _watermarks(raw: Any) -> dict[str, int | None]:
    """watermarks from a marker: only integers (or null) by name; anything else is as if never recorded, which
    costs a full rebuild, never a row."""
    if not isinstance(raw, dict):
        return {}
    return {
        str(label): value
        for label, value in raw.items()
        if value is None or (isinstance(value, int) and not isinstance(value, bool))
    }


def _samples(raw: Any) -> tuple[tuple[int, float], ...]:
    """incrementalSamples from a marker, keeping only well-formed pairs (a marker is read back, never trusted)."""
    if not isinstance(raw, list):
        return ()
    samples = []
    for item in raw:
        if (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], int)
            and not isinstance(item[0], bool)
            and isinstance(item[1], int | float)
            and not isinstance(item[1], bool)
            and item[0] > 0
            and 0 <= item[1] < float("inf")
        ):
            samples.append((item[0], float(item[1])))
    return tuple(samples[-INCREMENTAL_SAMPLES:])


@dataclass(frozen=True)
class PendingChanges:
    """What an incremental view's change log holds."""

    keys: int = 0
    """Distinct complete keys waiting to be applied."""
    full_reasons: tuple[str, ...] = ()
    """Why a full rebuild was requested (a TRUNCATE, repaired capture, an unfinished swap)."""
    null_keys: bool = False
    """A write recorded a key with a NULL part, which a key filter cannot select."""
    oldest: dt.datetime | None = None
    """When the oldest change still in the log was recorded."""

    def staleness_seconds(self, now: dt.datetime) -> float:
        """Age of the oldest unapplied change, 0 when there is none."""
        return max(0.0, (now - self.oldest).total_seconds()) if self.oldest is not None else 0.0


@dataclass(frozen=True)
class Inspection:
    """Catalog facts that decide how a view can be refreshed (read by facts.inspect, under the view's lock)."""

    oid: int | None = None
    ours: bool = False
    populated: bool = False
    concurrent_possible: bool = False
    dependents: tuple[DependentView, ...] = ()
    indexes: tuple[str, ...] = ()
    marker: Marker | None = None
    source_version: str | None = None
    """Fingerprint of the tables the view reads now (None when unknowable: a foreign table)."""
    leftovers: tuple[tuple[str, str], ...] = ()
    """(name, relkind) of staging or retired copies of ours that an interrupted build or swap left behind."""
    key_catalog: sqltext.KeyCatalog | None = None
    """What the query's relations resolve to (incremental views: the key-filter rewrite needs it)."""
    pending: PendingChanges | None = None
    """The change log (incremental views; None when it does not exist)."""
    untracked_version: str | None = None
    estimated_rows: int | None = None
    watermarks: dict[str, int | None] | None = None
    """What this refresh's range drain read its append-only sources up to (refresh.ranges): recorded with its
    success (None: no drain ran, the recorded watermarks stay)."""

    @property
    def state(self) -> RefreshState:
        return RefreshState.from_marker(self.marker.state if self.marker else {})

    @property
    def swap_blocker(self) -> str:
        """Why build-and-swap cannot run ("" when it can): dependents it cannot re-create."""
        blocked = [d for d in self.dependents if d.relkind != "v" or d.has_triggers]
        if not blocked:
            return ""
        names = ", ".join(
            f"{d.schema}.{d.name}" + (" (has triggers)" if d.has_triggers else f" (relkind {d.relkind})")
            for d in blocked
        )
        return f"these objects depend on it and cannot be re-created automatically: {names}"

    @property
    def swap_possible(self) -> bool:
        return not self.swap_blocker


@dataclass(frozen=True)
class Run:
    """Run this mode, for this reason."""

    mode: RefreshMode
    reason: str
    touched_only: bool = False
    """A rebuild Auto chose over keys it trusts, for cost: a partitioned view whose partition sources say where
    those keys' rows lie rebuilds only the partitions they touch (partitions.claim_touched_step)."""


@dataclass(frozen=True)
class Skip:
    """Do nothing this time; data_current says whether the view is known to be up to date."""

    reason: str
    data_current: bool


@dataclass(frozen=True)
class Refuse:
    """Fail without running anything (the view is missing or not ours, or the mode is impossible)."""

    reason: str
    message: str


Decision = Run | Skip | Refuse


def decide(
    view: MaterializedView,
    inspection: Inspection,
    requested: str | None,
    force: bool,
    now: dt.datetime | None = None,
) -> Decision:
    """The whole refresh decision: refuse, skip (onlyIfChanged, nothing pending), or run a mode."""
    if inspection.oid is None or not inspection.ours:
        what = "does not exist (apply it first)" if inspection.oid is None else "is not managed by this resource"
        return Refuse(f"{view.relation} {what}", f"{view.relation} {what}")
    if view.incremental is not None:
        return decide_incremental(view, inspection, requested, force, now or dt.datetime.now(dt.UTC))
    if (
        view.refresh.only_if_changed
        and not force
        and inspection.populated
        and inspection.source_version is not None
        and inspection.source_version == inspection.state.source_version
    ):
        return Skip("onlyIfChanged: no base table was written since the last refresh", data_current=True)
    mode, reason = choose_mode(view, inspection, requested)
    if mode == RefreshMode.CONCURRENT and not inspection.concurrent_possible:
        why = "it is not populated" if not inspection.populated else "it has no unique index without WHERE"
        return Refuse(reason, f"CONCURRENTLY is impossible: {why}")
    if mode == RefreshMode.SWAP and not inspection.swap_possible:
        return Refuse(reason, f"{view.relation} cannot be swapped: {inspection.swap_blocker}")
    return Run(mode, reason)


def full_rebuild_reason(view: MaterializedView, inspection: Inspection) -> str:
    """Why an incremental view must be rebuilt in full now, whatever it costs; "" when its keys can be trusted."""
    assert view.incremental is not None
    pending = inspection.pending
    state = inspection.state
    if not inspection.populated:
        return "the view is not populated"
    if pending is None:
        return "change capture is not installed (apply the view)"
    if inspection.marker is None or inspection.marker.digest != view.definition_digest:
        return "the stored rows were built from another definition"
    if pending.full_reasons:
        return "a full rebuild was requested: " + "; ".join(sorted(pending.full_reasons))
    if pending.null_keys:
        return "a write recorded a key with a NULL part, which a key filter cannot select"
    if inspection.untracked_version is None:
        return "the query reads a foreign table, whose writes cannot be tracked"
    if inspection.untracked_version != state.untracked_version:
        return "a table the query reads that is not a declared source was written (or no refresh recorded it yet)"
    return ""


@dataclass(frozen=True)
class CostModel:
    """An incremental refresh of k keys takes fixed + per_key · k seconds: fitted to this view's own samples."""

    fixed: float
    per_key: float
    samples: int

    def seconds(self, keys: int) -> float:
        return self.fixed + self.per_key * keys

    @classmethod
    def fit(cls, samples: tuple[tuple[int, float], ...]) -> CostModel | None:
        """Least squares with both parts ≥ 0; None until the samples hold two different key counts (one
        count cannot tell the fixed cost from the cost per key)."""
        if len({keys for keys, _ in samples}) < 2:
            return None
        n = len(samples)
        mean_keys = sum(k for k, _ in samples) / n
        mean_seconds = sum(s for _, s in samples) / n
        spread = sum((k - mean_keys) ** 2 for k, _ in samples)
        per_key = sum((k - mean_keys) * (s - mean_seconds) for k, s in samples) / spread
        fixed = mean_seconds - per_key * mean_keys
        if per_key < 0:  # noise on a view whose cost does not grow with keys
            return cls(mean_seconds, 0.0, n)
        if fixed < 0:  # refit through the origin
            return cls(0.0, sum(k * s for k, s in samples) / sum(k * k for k, _ in samples), n)
        return cls(fixed, per_key, n)


def choose_incremental(view: MaterializedView, inspection: Inspection, keys: int) -> tuple[bool, str, bool]:
    """Auto, keys pending and all of them trusted: (rebuild in full?, why, re-measuring?). From this view's measured
    durations (the full rebuild's moving average against the incremental cost fitted to its latest
    incremental refreshes), else fullRebuildRatio: the spec's override, or the default until both are measured.
    When the two are close and the slower way was last measured EXPLORE_EVERY refreshes ago or more, this
    refresh runs it, so neither measurement goes stale (a view grows; the cost per key changes with it)."""
    assert view.incremental is not None
    ratio = change_ratio(keys, inspection.estimated_rows)
    share = f"{keys} changed key(s), {ratio:.2%} of the view"
    state = inspection.state
    model = CostModel.fit(state.incremental_samples)
    full = state.durations.get(RefreshMode.SWAP)
    override = view.incremental.full_rebuild_ratio
    if override is not None or model is None or full is None:
        limit = DEFAULT_FULL_REBUILD_RATIO if override is None else override
        named = (
            f"fullRebuildRatio {limit:.1%}"
            if override is not None
            else (
                f"the default fullRebuildRatio {limit:.1%} (this view has not measured "
                + ("a full rebuild" if full is None else "incremental refreshes of two sizes")
                + " yet)"
            )
        )
        if ratio > limit:
            return True, f"Auto: {share}, above {named}: a full rebuild is cheaper", False
        return False, f"{share}, within {named}", False
    predicted = model.seconds(keys)
    rebuild = predicted > full
    fast, slow = min(predicted, full), max(predicted, full)
    slower = RefreshMode.INCREMENTAL if rebuild else RefreshMode.SWAP
    explore = state.measured_long_ago(slower) and slow <= fast * EXPLORE_RATIO
    evidence = (
        f"predicted incremental {predicted:.3f}s ({model.fixed * 1000:.1f} ms + {model.per_key * 1000:.3f} ms a key, "
        f"from {model.samples} refreshes) vs a full rebuild {full:.3f}s measured"
    )
    if explore:
        return not rebuild, f"Auto: {share}, re-measuring the slower way: {evidence}", True
    if rebuild:
        return True, f"Auto: {share}, a full rebuild is cheaper: {evidence}", False
    return False, f"{share}, incremental is cheaper: {evidence}", False


def change_ratio(keys: int, rows: int | None) -> float:
    """Changed keys as a share of the view's rows (estimated; an empty view counts as one row)."""
    return keys / max(rows or 0, 1)


def decide_incremental(
    view: MaterializedView, inspection: Inspection, requested: str | None, force: bool, now: dt.datetime
) -> Decision:
    """Incremental views: Swap when asked or when keys cannot be trusted or would cost more, a skip when
    nothing is pending (or waiting stays within targetLag), otherwise apply the changed keys."""
    wanted = RefreshMode(requested or view.refresh.mode)
    if wanted == RefreshMode.SWAP:
        return Run(RefreshMode.SWAP, "mode Swap requested")
    if wanted not in (RefreshMode.AUTO, RefreshMode.INCREMENTAL):
        return Refuse(f"mode {wanted} requested", f"mode {wanted} does not apply to storage {view.storage}")
    full = full_rebuild_reason(view, inspection)
    if full:
        if not inspection.swap_possible:
            return Refuse(full, f"{view.relation} needs a full rebuild ({full}) but {inspection.swap_blocker}")
        return Run(RefreshMode.SWAP, full)
    pending = inspection.pending or PendingChanges()
    if pending.keys == 0:
        return Skip("no changes pending", data_current=True)
    target = view.refresh.target_lag_seconds
    if target is not None and not force:
        age = pending.staleness_seconds(now)
        expected = inspection.state.durations.get(RefreshMode.INCREMENTAL, 0.0)
        if age + target_lag_check_seconds(target) + expected < target:
            return Skip(
                f"{pending.keys} changed key(s), the oldest {age:.0f}s old: within targetLag until the next look",
                data_current=False,
            )
    if wanted == RefreshMode.INCREMENTAL:
        ratio = change_ratio(pending.keys, inspection.estimated_rows)
        return Run(RefreshMode.INCREMENTAL, f"{pending.keys} changed key(s), {ratio:.2%} of the view")
    rebuild, why, measuring = choose_incremental(view, inspection, pending.keys)
    if not rebuild:
        return Run(RefreshMode.INCREMENTAL, why)
    if not inspection.swap_possible:
        return Run(RefreshMode.INCREMENTAL, f"{why}; but {inspection.swap_blocker}, so incremental")
    # A rebuild that re-measures the full rebuild must be one.
    return Run(RefreshMode.SWAP, why, touched_only=not measuring)


def verification_due(view: MaterializedView, state: RefreshState, now: dt.datetime) -> bool:
    """An incremental view with verifyInterval is compared with a full recompute once per interval."""
    interval = view.incremental.verify_interval_seconds if view.incremental else None
    if interval is None:
        return False
    return state.last_verified is None or (now - state.last_verified).total_seconds() >= interval


def after_verification(view: MaterializedView, verification: verify.Verification) -> Run | None:
    """The full rebuild a mismatch asks for (rebuildOnMismatch), or None."""
    if view.incremental is None or not view.incremental.rebuild_on_mismatch or verification.matches:
        return None
    if verification.inconclusive:
        return None
    return Run(
        RefreshMode.SWAP,
        f"verification found {verification.mismatched_rows} row(s) that differ from a full recompute "
        f"({verification.extra_rows} extra, {verification.missing_rows} missing): rebuilt in full "
        "(rebuildOnMismatch); check spec.incremental's declaration",
    )


def choose_mode(
    view: MaterializedView, inspection: Inspection, requested: str | None = None
) -> tuple[RefreshMode, str]:
    """Pure: which mode to run and why."""
    wanted = RefreshMode(requested or view.refresh.mode)
    if view.storage is Storage.TABLE and wanted == RefreshMode.AUTO:
        return RefreshMode.SWAP, "storage Table without spec.incremental is rebuilt by build-and-swap"
    if wanted != RefreshMode.AUTO:
        return wanted, f"mode {wanted} requested"
    if not inspection.populated:
        return RefreshMode.FULL, "the view is not populated: CONCURRENTLY is impossible and nobody can read it yet"
    if inspection.concurrent_possible and inspection.swap_possible:
        state = inspection.state
        concurrent, swap = state.durations.get(RefreshMode.CONCURRENT), state.durations.get(RefreshMode.SWAP)
        if concurrent is None:
            return RefreshMode.CONCURRENT, "Auto: no measurements yet, starting with Concurrent"
        if swap is None:
            return RefreshMode.SWAP, f"Auto: measuring Swap once to compare with Concurrent ({concurrent:.2f}s)"
        if swap < concurrent * SWAP_ADVANTAGE:
            best, other = RefreshMode.SWAP, RefreshMode.CONCURRENT
        else:
            best, other = RefreshMode.CONCURRENT, RefreshMode.SWAP
        fast, slow = min(concurrent, swap), max(concurrent, swap)
        if state.runs % EXPLORE_EVERY == EXPLORE_EVERY - 1 and slow <= fast * EXPLORE_RATIO:
            measured = state.durations
            return other, f"Auto: re-measuring {other} ({measured[other]:.2f}s) against {best} ({measured[best]:.2f}s)"
        if best == RefreshMode.CONCURRENT and swap < concurrent:
            return best, (
                f"Auto: Swap is not enough faster on this view to pay for its catalog churn and exclusive lock "
                f"({swap:.2f}s vs {concurrent:.2f}s; it must take under {SWAP_ADVANTAGE:.0%} of Concurrent's)"
            )
        return best, f"Auto: {best} is cheaper on this view ({fast:.2f}s vs {slow:.2f}s)"
    if inspection.concurrent_possible:
        return RefreshMode.CONCURRENT, f"Auto: Swap is not possible ({inspection.swap_blocker})"
    if inspection.swap_possible:
        return RefreshMode.SWAP, "Auto: no unique index without WHERE on plain columns, so CONCURRENTLY is impossible"
    return RefreshMode.FULL, (
        "Auto: neither non-blocking mode is possible (no usable unique index; "
        f"{inspection.swap_blocker}); plain refresh blocks readers"
    )


def fallback(
    view: MaterializedView, inspection: Inspection, requested: str | None, ran: RefreshMode, error: BaseException
) -> Run | None:
    """After a failure: the one other mode worth trying (only Auto falls back, only from CONCURRENTLY, only
    for errors a rebuild fixes), or None."""
    if ran == RefreshMode.INCREMENTAL and sqlstate(error) == PROGRAM_LIMIT_EXCEEDED and inspection.swap_possible:
        # A key too large for the claim's index ("index row requires N bytes") would fail every incremental
        # refresh while it waits in the log; a rebuild claims the whole log.
        return Run(
            RefreshMode.SWAP,
            f"a changed key is too large for an incremental refresh ({message(error)}); rebuilt in full",
        )
    automatic = RefreshMode(requested or view.refresh.mode) == RefreshMode.AUTO
    if not automatic or ran != RefreshMode.CONCURRENT or sqlstate(error) not in CONCURRENT_FALLBACK_SQLSTATES:
        return None
    mode = RefreshMode.SWAP if inspection.populated and inspection.swap_possible else RefreshMode.FULL
    return Run(mode, f"Concurrent failed ({message(error)}); fell back to {mode}")


#: SQLSTATE of "index row requires N bytes, maximum size is M" and other limits of the server.
PROGRAM_LIMIT_EXCEEDED = "54000"


def sqlstate(error: BaseException) -> str | None:
    found = getattr(error, "sqlstate", None) or getattr(error.__cause__, "sqlstate", None)
    return str(found) if found else None


def message(error: BaseException) -> str:
    if isinstance(error, psycopg.Error) and error.diag.message_primary:
        return error.diag.message_primary
    return str(error).strip()


def classify(error: BaseException) -> FailureReason:
    """Map an error to its failure reason: the one place where errors become reasons."""
    if isinstance(error, psycopg.errors.QueryCanceled):
        # statement_timeout; a cancel on shutdown says "due to user request" and is not a timeout.
        return FailureReason.TIMEOUT if "timeout" in str(error) else FailureReason.OTHER
    if isinstance(error, psycopg.errors.LockNotAvailable):
        return FailureReason.LOCK_TIMEOUT
    if isinstance(error, psycopg.errors.UniqueViolation | psycopg.errors.CardinalityViolation):
        return FailureReason.DUPLICATE_ROWS
    if isinstance(error, psycopg.errors.InsufficientPrivilege):
        return FailureReason.PERMISSION
    code = sqlstate(error)
    # psycopg raises OperationalError for server errors of classes 53-58 too (a key too large for an index is
    # 54000): only a missing server answer, class 08 or 57P (shutdown, crash) is the connection's fault.
    if (isinstance(error, psycopg.OperationalError) and code is None) or (code or "").startswith(("08", "57P")):
        return FailureReason.CONNECTION
    if type(error).__name__ in ("PoolTimeout", "PoolClosed", "TooManyRequests"):  # psycopg_pool: no server
        return FailureReason.CONNECTION
    cause = error.__cause__
    if isinstance(error, MatviewError) and isinstance(cause, psycopg.Error):
        return classify(cause)
    return FailureReason.OTHER
