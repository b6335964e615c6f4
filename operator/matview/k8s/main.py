"""Handler registration, and nothing else: each handler's body lives in its own module.

Run with ``matview operator`` or ``kopf run -m matview.k8s.main``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from matview.constants import GROUP, PLURAL, VERSION
from matview.k8s import deletion, labeler, reconcile, sharding
from matview.k8s.context import OperatorConfig, OperatorContext
from matview.k8s.settings import config_from_environment, configure
from matview.k8s.watch import WatchFeeder
from matview.observe import memory

_config: OperatorConfig | None = None


def use(config: OperatorConfig) -> None:
    """Give the operator its settings before it starts (``matview operator`` does, from its flags);
    without it they are read from MATVIEW_* variables at start-up (``kopf run -m matview.k8s.main``)."""
    global _config
    _config = config


def _settings() -> OperatorConfig:
    global _config
    if _config is None:
        _config = config_from_environment()
    return _config


class _QuietWatchHandler(logging.Filter):
    """kopf logs each successful handler call at INFO; the watch handler runs for every event of every
    view (thousands a minute at scale), which would drown the log and cost CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Handler 'watch_handler' succeeded."


logging.getLogger("kopf.objects").addFilter(_QuietWatchHandler())


def _mine(meta: kopf.Meta, **_: Any) -> bool:
    """This replica's share of the views (all of them unless sharded)."""
    return _owns(_settings(), meta.namespace or "", meta.name or "")


def _owns(config: OperatorConfig, namespace: str, name: str) -> bool:
    return sharding.owns(config.shard_index, config.shard_count, namespace, name)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    config = _settings()
    configure(settings, config.peering)
    selection = sharding.selector(config.shard_index, config.shard_count)
    if selection is not None:  # the apiserver sends this replica its own views only
        settings.watching.label_selectors[GROUP, PLURAL] = selection
    context = OperatorContext(config=config)
    if config.metrics_port:
        context.metrics.serve(config.metrics_port)
        logger.info("metrics on :%d/metrics", config.metrics_port)
    if config.shard_count > 1:
        logger.info("shard %d of %d", config.shard_index, config.shard_count)
    memo.context = context
    memo.feeder = WatchFeeder(context)
    memo.tasks = [
        asyncio.create_task(memo.feeder.run()),
        asyncio.create_task(context.metrics.watch_event_loop()),
        asyncio.create_task(memory.keep_trimming()),
    ]
    if selection is not None:
        labels = labeler.Labeler(lambda namespace, name: _owns(config, namespace, name), config.namespaces)
        memo.tasks.append(asyncio.create_task(labels.run()))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for task in getattr(memo, "tasks", []):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    feeder: WatchFeeder | None = getattr(memo, "feeder", None)
    if feeder is not None:
        await feeder.stop()
    context: OperatorContext | None = getattr(memo, "context", None)
    if context is not None:
        context.refresher.close()


@kopf.on.event(GROUP, VERSION, PLURAL, when=_mine)
async def watch_handler(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.feeder.observe(type, body)


def _mislabelled(meta: kopf.Meta, **_: Any) -> bool:
    sharded = _settings().shard_count > 1
    return sharded and sharding.mislabelled(meta.labels, meta.namespace or "", meta.name or "")


@kopf.on.event(GROUP, VERSION, PLURAL, when=_mislabelled)
async def relabel_handler(type: str | None, body: kopf.Body, **_: Any) -> None:
    """A bucket label edited by hand put the view in this replica's selection: put the label back, so that its
    own shard sees it (and this one's watch lets it go)."""
    if type != "DELETED":
        await labeler.label(body)


# No on.resume: after a restart kopf still runs on.update for specs edited meanwhile and resumes retries,
# and the scheduler's drift checks (spread over their period) re-verify every view; re-applying all of
# them at once on start-up would delay the first refreshes behind thousands of reconciles.
@kopf.on.create(GROUP, VERSION, PLURAL, when=_mine)
@kopf.on.update(GROUP, VERSION, PLURAL, when=_mine)
async def reconcile_handler(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    written = await reconcile.apply_spec(memo.context, body, logger)
    if written is not None:
        await memo.feeder.reconciled(written)


# Registered on every shard: kopf removes its finalizer from objects that no deletion handler matches,
# so replicas filtering deletion by shard would take the shared finalizer off each other's views, back
# and forth (measured: 21,000 PATCHes in two minutes, 1,000 views on 2 shards). The other shards wait
# for the owner instead, which removes the finalizer when its clean-up is done.
@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_handler(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    if not _mine(meta):
        config = _settings()
        owner = sharding.shard_of(meta.namespace or "", meta.name or "", config.shard_count)
        raise kopf.TemporaryError(f"deleted by shard {owner}; waiting for it", delay=config.stalled_retry_seconds)
    await deletion.delete(memo.context, body, logger)


__all__ = ["OperatorContext"]
