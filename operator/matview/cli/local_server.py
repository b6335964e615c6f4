"""The verbs for the embedded PostgreSQL a newcomer gets: stop it, remove it."""

from __future__ import annotations

import argparse
from pathlib import Path

from matview.cli.common import EXIT_OK


def cmd_embedded_stop(args: argparse.Namespace) -> int:
    from matview.embedded.localpg import stop_embedded

    stopped = stop_embedded(Path(args.embedded_dir))
    print(
        f"stopped {stopped}"
        if stopped
        else f"no embedded PostgreSQL was running in {Path(args.embedded_dir).resolve()}"
    )
    return EXIT_OK


def cmd_embedded_clean(args: argparse.Namespace) -> int:
    import shutil

    from matview.embedded.localpg import directory_bytes, stop_embedded

    data = Path(args.embedded_dir).resolve()
    stopped = stop_embedded(data)
    if stopped:
        print(f"stopped {stopped}")
    if not data.exists():
        print(f"nothing to remove: {data} does not exist")
        return EXIT_OK
    size = directory_bytes(data)
    shutil.rmtree(data)
    print(f"removed {data} ({size / 1024 / 1024:.0f} MB)")
    return EXIT_OK
