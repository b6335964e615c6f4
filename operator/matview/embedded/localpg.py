"""A private PostgreSQL server in a local directory, for newcomers and for the test suite.

Binaries come from ``MATVIEW_PG_BINDIR``, Debian's ``postgresql`` package, or the
ones the ``pgserver`` wheel ships (the ``embedded`` extra, which the README's demo command installs), so a
laptop with no database still gets one. As root, initdb refuses to run: the server then
runs as an unprivileged system user (``postgres`` when it exists, else one we add).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matview.errors import NoPostgresBinariesError

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_FALLBACK_USER = "matview-pg"


def _pgserver_bindir() -> Path | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            from pgserver._commands import POSTGRES_BIN_PATH
    except Exception:
        return None
    path = Path(POSTGRES_BIN_PATH)
    return path if (path / "postgres").exists() else None


def _debian_bindir() -> Path | None:
    versions = sorted(
        (p for p in _DEBIAN_ROOT.glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


def find_bindir(prefer: str = "system") -> Path:
    """Where initdb/pg_ctl/postgres live; prefer "system" (Debian) or "embedded" (pgserver)."""
    configured = os.environ.get("MATVIEW_PG_BINDIR")
    if configured:
        return Path(configured)
    order = [_debian_bindir, _pgserver_bindir] if prefer == "system" else [_pgserver_bindir, _debian_bindir]
    for finder in order:
        found = finder()
        if found is not None:
            return found
    raise NoPostgresBinariesError(
        "no PostgreSQL binaries found: install the embedded extra (pip install 'matview-operator[embedded]'), "
        "or Debian's postgresql package, or set MATVIEW_PG_BINDIR"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for candidate in ("postgres", _FALLBACK_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(candidate)
            return candidate
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _FALLBACK_USER], check=True
    )
    return _FALLBACK_USER


@dataclass
class LocalServer:
    """One PostgreSQL cluster in ``data_dir``, listening on 127.0.0.1:``port``."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    bindir: Path = field(default_factory=find_bindir)
    superuser: str = "postgres"
    settings: dict[str, str] = field(default_factory=dict)
    _user: str | None = field(default=None, init=False)

    def _run(self, *args: str) -> None:
        # Drop the group too: a process left in root's group gets the (empty) group bits of root-owned dirs.
        identity: dict[str, Any] = {}
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            identity = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            **identity,
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout}")

    def _prepare_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            # The server user must reach its data directory and the server's binaries (a checkout made
            # by root under a private mktemp -d holds pgserver's): let it traverse, nothing more.
            for path in {*self.data_dir.parents, self.data_dir, *self.bindir.resolve().parents}:
                if path == Path("/"):
                    continue
                mode = path.stat().st_mode
                if not mode & 0o001:
                    path.chmod(mode | 0o001)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            self.data_dir.chmod(0o700)

    def start(self) -> LocalServer:
        """initdb when needed, then start the server and wait until it accepts connections."""
        self._user = _server_user()
        self._prepare_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "max_connections": "100",
            **self.settings,
        }
        option_text = " ".join(f"-c {key}={value}" for key, value in options.items())
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            option_text,
            "-l",
            str(self.data_dir / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop; mode "immediate" is a crash as far as clients can tell (no goodbye, recovery on start)."""
        self._user = _server_user()
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"postgresql://{user or self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def running_port(data_dir: Path) -> int | None:
    """The port of a server already running on data_dir (from postmaster.pid), if any."""
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return port


#: The one database of the embedded server: the CLI, the demo and docs/fallback.md all use it.
EMBEDDED_DATABASE = "matview"


def ensure_embedded(data_dir: Path) -> str:
    """Start (or reuse) the embedded server in data_dir and return the DSN of its ``matview`` database;
    the server keeps running for later commands."""
    port = running_port(data_dir)
    if port is None:
        server = LocalServer(data_dir.resolve(), bindir=find_bindir(prefer="embedded")).start()
        port = server.port
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DATABASE,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')  # a constant name
    return f"postgresql://postgres@127.0.0.1:{port}/{EMBEDDED_DATABASE}"


def stop_embedded(data_dir: Path) -> str | None:
    """Stop the embedded server in data_dir; say which one it was (None when none was running)."""
    port = running_port(data_dir)
    if port is None:
        return None
    LocalServer(data_dir.resolve(), port=0, bindir=find_bindir(prefer="embedded")).stop()
    return f"the embedded PostgreSQL in {data_dir.resolve()} (port {port})"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
