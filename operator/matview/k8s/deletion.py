"""Deletion: honour deletionPolicy, never hang, never lose the reason.

Retain leaves the view's rows as they are (an incremental view's change capture is removed all the
same). Delete drops the view and the supporting
indexes this resource created; while the database cannot be reached, or other
views still depend on the view, the finalizer stays and status says why. A
resource whose spec never validated created nothing, and lets go at once, as
does one whose Secret is gone (a namespace being torn down deletes Secrets too).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf
import psycopg
import psycopg_pool

from matview.api.spec import Storage
from matview.errors import DependentObjectsError, MatviewError, SpecError
from matview.k8s import conditions, kube
from matview.k8s.context import OperatorContext
from matview.k8s.credentials import CredentialsError, describe, redact
from matview.k8s.resource import resolve_dsn, validated
from matview.plan import engine


async def _blocked(namespace: str, name: str, reason: conditions.Reason, message: str) -> None:
    now = dt.datetime.now(dt.UTC)

    def change(status: conditions.Status) -> conditions.Status:
        status["conditions"] = conditions.set_condition(
            status.get("conditions"),
            type_=conditions.ConditionType.READY,
            status=False,
            reason=reason,
            message=message,
            now=now,
        )
        return status

    await kube.patch_status(namespace, name, change)


async def delete(ctx: OperatorContext, body: kopf.Body, logger: logging.Logger | Any) -> None:
    metadata = body.get("metadata", {})
    namespace, name = metadata.get("namespace", ""), metadata.get("name", "")
    key = f"{namespace}/{name}"
    try:
        view = await validated(body)
    except SpecError:
        logger.info("the spec never validated, so nothing was created; letting go")
        _forget(ctx, key, namespace, name)
        return
    if view.deletion_policy == "Retain" and view.incremental is None and view.storage is Storage.MATERIALIZED_VIEW:
        logger.info("deletionPolicy Retain: %s stays in the database", view.relation)
        _forget(ctx, key, namespace, name)
        return
    # Delete drops; Retain keeps the rows but still removes change capture (triggers on the sources
    # would fill a log nobody reads): both go through the engine's delete plan.
    try:
        dsn = await resolve_dsn(view, ctx.config.secret_max_age_seconds)
    except CredentialsError as exc:
        kopf.warn(
            body,
            reason=exc.reason,
            message=f"{exc}; {view.relation} is left in the database (deletionPolicy Delete not honoured)"
            if view.deletion_policy == "Delete"
            else f"{exc}; the change capture of {view.relation} is left in the database",
        )
        _forget(ctx, key, namespace, name)
        return
    try:
        result = await ctx.refresher.run_sync(dsn, lambda conn: engine.delete(conn, view))
    except DependentObjectsError as exc:
        await _blocked(namespace, name, conditions.Reason.DELETION_BLOCKED, str(exc))
        raise kopf.TemporaryError(str(exc), delay=ctx.config.stalled_retry_seconds) from exc
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        message = f"cannot connect to {describe(dsn)} to drop {view.relation}: {redact(str(exc).strip(), dsn)}"
        await _blocked(namespace, name, conditions.Reason.DATABASE_UNREACHABLE, message)
        raise kopf.TemporaryError(message, delay=ctx.config.retry_seconds) from exc
    except (MatviewError, psycopg.Error) as exc:
        message = redact(str(exc).strip(), dsn)
        await _blocked(namespace, name, conditions.Reason.DELETION_BLOCKED, message)
        raise kopf.TemporaryError(message, delay=ctx.config.retry_seconds) from exc
    logger.info("deleted: %s", "; ".join(result.done) or "nothing to drop")
    _forget(ctx, key, namespace, name)


def _forget(ctx: OperatorContext, key: str, namespace: str, name: str) -> None:
    ctx.metrics.forget(namespace, name)
    ctx.release(key)
