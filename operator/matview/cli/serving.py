"""The long-running verbs: ``matview run`` (the standalone scheduler over files) and ``matview operator``
(the Kubernetes operator, given its settings from the flags)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from matview.api.validation import load_file
from matview.cli import control
from matview.cli.arguments import read_dsn_file
from matview.cli.common import EXIT_INVALID, EXIT_OK, database_url, policy


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from matview.cli.files import FileFeeder, yaml_files
    from matview.observe import memory
    from matview.observe.metrics import RefreshMetrics
    from matview.refresh.refresher import Refresher
    from matview.refresh.settings import RunnerSettings

    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            print(f"error: {path}: no such file or directory", file=sys.stderr)
            return EXIT_INVALID
    for file in yaml_files(paths):
        load_file(file)  # refuse to start on an invalid file; later edits are reloaded leniently
    dsn: str | Callable[[], str] = database_url(args)
    if args.dsn_file:
        dsn_file = Path(args.dsn_file)
        dsn = lambda: read_dsn_file(dsn_file)  # noqa: E731 - re-read every pass: a rotated password needs no restart
    metrics = RefreshMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
        print(f"metrics on http://{args.metrics_address}:{args.metrics_port}/metrics", file=sys.stderr)
    refresher = Refresher(
        metrics,
        RunnerSettings(
            max_concurrent_per_database=args.max_concurrent,
            retry_seconds=args.retry_seconds,
            drift_check_seconds=args.drift_check_seconds,
            apply_policy=policy(args),
        ),
    )

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        trimming = asyncio.create_task(memory.keep_trimming())
        feeder = FileFeeder(dsn, paths, refresher, identity=lambda: control.database_identity(args))
        server = (
            await control.ControlServer.start(Path(args.control_socket), feeder.handed) if args.control_socket else None
        )
        try:
            await feeder.run(stop)
        finally:
            trimming.cancel()
            if server is not None:
                await server.close()

    _tune_long_running_process()
    try:
        asyncio.run(main_loop())
    finally:
        refresher.close()
    return EXIT_OK


#: OperatorConfig fields → the flags of ``matview operator`` that set them (for error messages).
OPERATOR_FLAGS = {
    "metrics_port": "--metrics-port",
    "drift_check_seconds": "--drift-check-seconds",
    "max_concurrent_per_database": "--max-concurrent",
    "shard_index": "--shard-index",
    "shard_count": "--shard-count",
}


def cmd_operator(args: argparse.Namespace) -> int:
    import asyncio

    import kopf

    from matview.k8s import main as operator_main  # registers the handlers
    from matview.k8s.settings import SettingsError, checked, config_from_environment

    try:
        # The environment's MATVIEW_* settings the flags do not cover (retry delays, secret cache) still apply.
        config = checked(
            dataclasses.replace(
                config_from_environment(),
                metrics_port=args.metrics_port,
                drift_check_seconds=args.drift_check_seconds,
                max_concurrent_per_database=args.max_concurrent,
                peering=args.peering or None,
                shard_index=args.shard_index,
                shard_count=args.shard_count,
                allow_superuser_run_as_role=args.allow_superuser_run_as_role,
            ),
            OPERATOR_FLAGS,
        )
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    namespaces = args.namespace or []
    if not namespaces and not args.all_namespaces:
        print("error: pass --all-namespaces or one or more --namespace NS", file=sys.stderr)
        return EXIT_INVALID
    operator_main.use(dataclasses.replace(config, namespaces=() if args.all_namespaces else tuple(namespaces)))
    _tune_long_running_process()
    asyncio.run(
        kopf.operator(
            clusterwide=args.all_namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness,
            standalone=not args.peering,
        )
    )
    return EXIT_OK


def _tune_long_running_process() -> None:
    """A long-running process's refresh threads get the interpreter's lock back soon after each round trip, and
    share few malloc arenas."""
    from matview.observe import memory
    from matview.refresh.settings import MALLOC_ARENAS, SWITCH_INTERVAL_SECONDS

    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    memory.limit_malloc_arenas(MALLOC_ARENAS)
