"""Handler registration, and nothing else: each handler's body lives in its own module.

Run with ``matview operator`` or ``kopf run -m matview.k8s.main``.
"""

from __future__ import annotations

import os
from typing import Any

import kopf

from matview.constants import GROUP, PLURAL, VERSION
from matview.k8s import daemon, deletion, reconcile
from matview.k8s.context import OperatorContext
from matview.k8s.settings import config_from_environment, configure

_CONFIG = config_from_environment()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    configure(settings, os.environ.get("MATVIEW_PEERING") or None)
    context = OperatorContext(config=_CONFIG)
    if _CONFIG.metrics_port:
        context.metrics.serve(_CONFIG.metrics_port)
        logger.info("metrics on :%d/metrics", _CONFIG.metrics_port)
    memo.context = context


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    context: OperatorContext | None = getattr(memo, "context", None)
    if context is not None:
        context.refresher.close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_handler(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    await reconcile.reconcile(memo.context, body, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=_CONFIG.drift_check_seconds, initial_delay=_CONFIG.drift_check_seconds)
async def drift_check(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    await reconcile.reconcile(memo.context, body, logger)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=30)
async def refresh_daemon(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    await daemon.run(memo.context, body, stopped, logger)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_handler(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    await deletion.delete(memo.context, body, logger)


__all__ = ["OperatorContext"]
