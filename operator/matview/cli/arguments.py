"""The flags several verbs share, defined once and importable without the engine.

``matview refresh`` reads its flags twice: first cheaply, to hand the refresh to a running ``matview run``
(``cli/control.py``), whose answer needs neither psycopg nor the SQL parser; then, when none takes it, through
the whole command table. Both read them from here, so the two parses cannot disagree on a flag.
"""

from __future__ import annotations

import argparse
import stat
from collections.abc import Sequence
from pathlib import Path

from matview.errors import FieldError, SpecError

DEFAULT_EMBEDDED_DIR = Path(".matview/pgdata")

#: Where ``matview run`` listens for the refreshes ``matview refresh`` hands it, relative to the directory
#: both run in (as the embedded database's directory is).
DEFAULT_CONTROL_SOCKET = Path(".matview/run.sock")


def add_view_arguments(parser: argparse.ArgumentParser, *, files: bool, database: bool) -> None:
    """--json, the spec files, and where the database is."""
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    if files:
        parser.add_argument("files", nargs="+", metavar="FILE", help="MaterializedView YAML file(s)")
    if database:
        source = parser.add_mutually_exclusive_group()
        source.add_argument(
            "--dsn",
            help="libpq connection string or URI; it shows in the process list, so prefer --dsn-file or "
            "$DATABASE_URL for one with a password (default: $DATABASE_URL, else embedded)",
        )
        source.add_argument("--dsn-file", metavar="PATH", help="read the connection string from this file")
    parser.add_argument("--embedded-dir", default=str(DEFAULT_EMBEDDED_DIR), help=argparse.SUPPRESS)


def add_refresh_arguments(parser: argparse.ArgumentParser, modes: Sequence[str] | None) -> None:
    """``matview refresh``'s own flags. modes: the accepted --mode values (None: any, for the cheap parse,
    which hands nothing over when a mode is given)."""
    parser.add_argument("--mode", choices=modes, help="override spec.refresh.mode (default: the spec's)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="refresh in this process even when a 'matview run' on the same files and database could",
    )
    add_control_socket_argument(
        parser, "the socket of a 'matview run' to hand the refresh to (it refreshes on its warm connections)"
    )


def add_control_socket_argument(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--control-socket", metavar="PATH", default=str(DEFAULT_CONTROL_SOCKET), help=text)


def read_dsn_file(path: Path) -> str:
    """A DSN kept in a file (a mounted Secret, a 0600 file) so the password never shows in the process list."""
    try:
        status = path.stat()
        dsn = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([FieldError("--dsn-file", f"{path}: {getattr(exc, 'strerror', None) or exc}")]) from None
    # As libpq refuses a .pgpass others can read: group or other access, except group read of a root-owned
    # file (how some secret stores mount them).
    loose = status.st_mode & (0o037 if status.st_uid == 0 else 0o077)
    if loose:
        raise SpecError(
            [
                FieldError(
                    "--dsn-file",
                    f"{path} has group or other permissions ({stat.filemode(status.st_mode)}): it holds a password; "
                    f"chmod 600 {path} (a mounted Secret: defaultMode: 0400)",
                )
            ]
        )
    if not dsn:
        raise SpecError([FieldError("--dsn-file", f"{path} is empty")])
    return dsn
