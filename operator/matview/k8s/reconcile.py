"""Create, update, resume and the periodic drift check: make the database match the spec.

The outcome always lands in status (Ready, Reconciling, Stalled, observedGeneration)
and failures that can pass by themselves (no Secret yet, database down) are retried;
failures only the user can fix (invalid spec, a name taken by someone else) mark the
resource Stalled and are re-checked slowly. Invalid specs never reach the database.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import kopf
import psycopg
import psycopg_pool

from matview.errors import ApplyError, DependentObjectsError, SpecError, UnmanagedObjectError
from matview.k8s import conditions, kube
from matview.k8s.context import OperatorContext
from matview.k8s.credentials import CredentialsError, describe, redact
from matview.k8s.resource import resolve_dsn, validated
from matview.plan import engine
from matview.plan.observed import Connection
from matview.refresh import ViewSize, apply_and_record, schedule, view_size
from matview.refresh.settings import Lane


@dataclass(frozen=True)
class Outcome:
    ready: bool
    reason: conditions.Reason
    message: str
    retry_after: float | None = None
    """Seconds until kopf should try again; None when nothing would change by retrying."""
    stalled: bool = False
    relation: str | None = None
    built: bool = False
    rows: int | None = None
    size_bytes: int | None = None
    data_version: int | None = None


def status_after(
    status: conditions.Status, outcome: Outcome, generation: int | None, now: dt.datetime
) -> conditions.Status:
    """Pure: the status with this reconcile's outcome written in (kstatus-compatible)."""
    found = status.get("conditions") or []
    found = conditions.set_condition(
        found,
        type_=conditions.ConditionType.READY,
        status=outcome.ready,
        reason=outcome.reason,
        message=outcome.message,
        generation=generation,
        now=now,
    )
    pending = not outcome.ready and not outcome.stalled
    found = conditions.set_condition(
        found,
        type_=conditions.ConditionType.RECONCILING,
        status=pending,
        reason=conditions.Reason.RETRYING if pending else conditions.Reason.DONE,
        message=outcome.message if pending else "",
        generation=generation,
        now=now,
    )
    found = conditions.set_condition(
        found,
        type_=conditions.ConditionType.STALLED,
        status=outcome.stalled,
        reason=outcome.reason if outcome.stalled else conditions.Reason.DONE,
        message=outcome.message if outcome.stalled else "",
        generation=generation,
        now=now,
    )
    status["conditions"] = found
    if generation is not None:
        status["observedGeneration"] = generation
    if outcome.relation:
        status["relation"] = outcome.relation
    if outcome.built:
        status["lastSuccessfulRefreshTime"] = conditions.timestamp(now)
    if outcome.rows is not None:
        status["rows"] = outcome.rows
    if outcome.size_bytes is not None:
        status["sizeBytes"] = outcome.size_bytes
    if outcome.data_version is not None:
        status["dataVersion"] = outcome.data_version
    return status


def moved_relation(status: conditions.Status | None, view_relation: str) -> str | None:
    """The CRD makes schema and name immutable (CEL); where that was bypassed, refuse rather than orphan.

    status.relation is the relation this resource manages; every path (update, resume, drift timer) checks it.
    """
    managed = (status or {}).get("relation")
    if managed and managed != view_relation:
        return (
            f"spec.schema and spec.name are immutable: this resource manages {managed}, "
            f"the spec now names {view_relation}"
        )
    return None


def is_reconciled(body: Mapping[str, Any]) -> bool:
    """Ready for the current generation: only then does the view exist as the spec says, to be refreshed."""
    found = body.get("status") or {}
    ready = conditions.get_condition(found.get("conditions"), conditions.ConditionType.READY)
    generation = (body.get("metadata") or {}).get("generation")
    return bool(
        ready
        and ready.get("status") == conditions.ConditionStatus.TRUE
        and (generation is None or found.get("observedGeneration") == generation)
    )


async def apply_spec(
    ctx: OperatorContext, body: Mapping[str, Any], logger: logging.Logger | Any
) -> dict[str, Any] | None:
    """The create/update handlers: reconcile a spec not applied yet.

    kopf also calls them for a generation already applied: when it waited longer than its consistency
    timeout for its own annotation write to come back on a lagging watch (at thousands of views, about
    every view once more after its creation), and for edits of labels or annotations alone (a manual refresh
    request). The status then says Ready for this generation, which only a reconcile of this very spec
    writes, so the database matched it; the scheduler's drift checks go on verifying it. Re-applying would
    repeat every catalog read and status write of the creation, in the lane that new views wait for.

    Returns the object as the reconcile wrote it (None when there was nothing to do)."""
    if is_reconciled(body):
        logger.debug("generation %s is applied already", (body.get("metadata") or {}).get("generation"))
        return None
    return await reconcile(ctx, body, logger)


async def _outcome(
    ctx: OperatorContext, body: Mapping[str, Any], logger: logging.Logger | Any, lane: Lane = "apply"
) -> Outcome:
    config = ctx.config
    try:
        view = await validated(body)
    except SpecError as exc:
        return Outcome(False, conditions.Reason.INVALID_SPEC, "; ".join(str(e) for e in exc.errors), stalled=True)
    moved = moved_relation(body.get("status"), view.relation)
    if moved:
        return Outcome(False, conditions.Reason.INVALID_SPEC, moved, stalled=True)
    try:
        dsn = await resolve_dsn(view, config.secret_max_age_seconds)
    except CredentialsError as exc:
        stalled = exc.reason == conditions.Reason.INVALID_SPEC
        return Outcome(
            False, exc.reason, str(exc), retry_after=None if stalled else config.retry_seconds, stalled=stalled
        )
    ctx.bind(f"{view.namespace}/{view.resource_name}", dsn)

    def work(conn: Connection) -> tuple[engine.ApplyResult, ViewSize]:
        result = apply_and_record(conn, view, ctx.refresher.settings.apply_policy)
        return result, view_size(conn, view)

    try:
        result, size = await ctx.refresher.run_sync(dsn, work, lane)
    except SpecError as exc:
        return Outcome(
            False,
            conditions.Reason.INVALID_SPEC,
            "; ".join(str(e) for e in exc.errors),
            retry_after=config.stalled_retry_seconds,
            stalled=True,
        )
    except UnmanagedObjectError as exc:
        return Outcome(
            False, conditions.Reason.OBJECT_CONFLICT, str(exc), retry_after=config.stalled_retry_seconds, stalled=True
        )
    except DependentObjectsError as exc:
        return Outcome(
            False, conditions.Reason.DEPENDENT_OBJECTS, str(exc), retry_after=config.stalled_retry_seconds, stalled=True
        )
    except engine.BusyError as exc:
        return Outcome(False, conditions.Reason.BUSY, str(exc), retry_after=config.busy_retry_seconds)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        message = f"cannot connect to {describe(dsn)}: {redact(str(exc).strip(), dsn)}"
        return Outcome(False, conditions.Reason.DATABASE_UNREACHABLE, message, retry_after=config.retry_seconds)
    except (ApplyError, psycopg.Error) as exc:
        return Outcome(
            False, conditions.Reason.APPLY_FAILED, redact(str(exc).strip(), dsn), retry_after=config.retry_seconds
        )
    for warning in result.plan.warnings:
        logger.warning(warning)
    summary = "; ".join(result.done) if result.done else "no change needed"
    summary += "".join(f"; warning: {warning}" for warning in result.plan.warnings)
    ctx.metrics.track(view, schedule.expected_period_seconds(view, dt.datetime.now(dt.UTC)))
    return Outcome(
        True,
        conditions.Reason.RECONCILED,
        f"{view.relation} matches the spec ({summary})",
        relation=view.relation,
        built=result.built,
        rows=size.rows,
        size_bytes=size.total_bytes,
        data_version=size.data_version,
    )


async def reconcile(
    ctx: OperatorContext, body: Mapping[str, Any], logger: logging.Logger | Any, lane: Lane = "apply"
) -> dict[str, Any] | None:
    """The body of the create/update handlers and of the scheduler's drift checks (which pass the object
    as last seen by the watch, and run in the refresher's check lane). Returns the object with the status as
    written (None if it is gone or the API could not be reached), so that the caller need not wait for the
    watch to bring it back; raises kopf.TemporaryError when the reconcile should run again."""
    metadata = body.get("metadata", {})
    namespace, name = metadata.get("namespace", ""), metadata.get("name", "")
    generation = metadata.get("generation")
    previous = conditions.get_condition((body.get("status") or {}).get("conditions"), conditions.ConditionType.READY)
    previous_message = previous.get("message") if previous else None
    outcome = await _outcome(ctx, body, logger, lane)
    if outcome.reason == conditions.Reason.BUSY:
        # A refresh (or another replica) holds the view's lock: nothing is wrong with the resource, so Ready
        # keeps what it says and no event is posted; the reconcile simply runs again shortly.
        raise kopf.TemporaryError(outcome.message, delay=outcome.retry_after)
    now = dt.datetime.now(dt.UTC)
    written = await kube.patch_status(
        namespace, name, lambda status: status_after(status, outcome, generation, now), known=body
    )
    changed = (
        previous is None
        or previous.get("reason") != outcome.reason
        or previous.get("status") != conditions.ConditionStatus.of(outcome.ready)
    )
    if not outcome.ready and changed:
        kopf.warn(cast(kopf.Body, body), reason=outcome.reason, message=outcome.message)  # one event per new problem
    if outcome.ready and outcome.message != previous_message:
        logger.info(outcome.message)  # a drift check that changed nothing says so only at debug level
    elif outcome.ready:
        logger.debug(outcome.message)
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(f"{outcome.reason}: {outcome.message}", delay=outcome.retry_after)
    return written
