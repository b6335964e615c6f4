"""``matview refresh`` handed to a running ``matview run``: the refresh on a warm process, without a new one.

A new ``matview`` process spends about 200 ms before its first statement (the interpreter, psycopg, the SQL
parser) and then resolves, cold, what the running scheduler already knows. When a ``matview run`` serves the
same files on the same database from the same directory, it refreshes them on its warm connections, through
its lanes (so the refresh is counted in its metrics and never races its schedule), and the command only asks
over a Unix socket and prints the answer. This module is the both ends of that socket, and imports nothing
heavier than the standard library, so the asking process starts in tens of milliseconds.

Trust: the socket is the invoking user's own (mode 0600, in the working directory's ``.matview``), and each
end checks the other's user id (SO_PEERCRED): another local user can neither ask nor answer. The server takes
only a bounded JSON request naming files it already serves; whatever it cannot vouch for (another database,
a file it does not serve or that changed since it loaded it, a view not applied yet) it declines, and the
command refreshes in process as it always did. A lost answer also falls back: a refresh run twice is a
refresh.

Protocol (one connection, JSON lines): the request ``{"refresh": [absolute file paths], "database": identity}``;
the answer ``{"declined": reason}`` or ``{"accepted": views, "deadlineSeconds": s}`` then ``{"results": [...]}``
(or ``{"declined": reason}`` when it could not finish).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from matview.cli import arguments, report
from matview.errors import SpecError

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger(__name__)

#: The most a request may hold; anything larger is declined unread.
MAX_REQUEST_BYTES = 64 * 1024
#: Files one request may name.
MAX_FILES = 1000
#: How long the server waits for a connected client's request, and a client for the server's first answer.
REQUEST_SECONDS = 5.0
#: What the client adds to the deadline the server announced before it stops waiting for the results.
ANSWER_GRACE_SECONDS = 10.0
#: What the server adds to the sum of the views' refresh timeouts (lock waits, a busy view's retry).
DEADLINE_GRACE_SECONDS = 60.0

_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def database_identity(args: argparse.Namespace) -> str | None:
    """A digest that two processes given the same database flags share (the DSN itself never leaves the
    process). None: the DSN file cannot be read here (the in-process path says why)."""
    if args.dsn:
        named = "dsn\0" + str(args.dsn)
    elif getattr(args, "dsn_file", None):
        try:
            named = "dsn\0" + arguments.read_dsn_file(Path(args.dsn_file))
        except SpecError:
            return None
    elif os.environ.get("DATABASE_URL"):
        named = "dsn\0" + os.environ["DATABASE_URL"]
    else:
        named = "embedded\0" + str(Path(args.embedded_dir).resolve())
    return hashlib.sha256(named.encode("utf-8", "surrogateescape")).hexdigest()


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end (None where the platform cannot tell: then no trust)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        _pid, uid, _gid = _PEER_CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _PEER_CREDENTIALS.size))
    except OSError:
        return None
    return int(uid)


# --- the asking end: matview refresh ------------------------------------------------------------------------


class _NotForUs(Exception):
    """The cheap parse does not take these arguments; the whole command table will (and say what is wrong)."""


class _QuietParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _NotForUs(message)


def _refresh_arguments(argv: Sequence[str]) -> argparse.Namespace | None:
    if "-h" in argv or "--help" in argv:
        return None
    words = [word for word in argv if not word.startswith("-")]
    if not words or words[0] != "refresh":
        return None
    parser = _QuietParser(prog="matview", add_help=False)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    refresh = sub.add_parser("refresh", add_help=False)
    arguments.add_view_arguments(refresh, files=True, database=True)
    arguments.add_refresh_arguments(refresh, modes=None)
    try:
        return parser.parse_args(list(argv))
    except _NotForUs:
        return None


def refresh_through_run(argv: Sequence[str]) -> int | None:
    """Hand ``matview refresh ARGV`` to a running ``matview run`` and print its answer; its exit code, or None
    when no run took it (none listens, it declined, or it stopped answering): then refresh in process."""
    args = _refresh_arguments(argv)
    if args is None or args.in_process or args.mode or not args.control_socket:
        return None
    identity = database_identity(args)
    if identity is None:
        return None
    files = [str(Path(file).resolve()) for file in args.files]
    answer = _ask(Path(args.control_socket), {"refresh": files, "database": identity}, verbose=args.verbose)
    if answer is None:
        return None
    results: list[dict[str, Any]] = answer
    return report.refresh_exit(report.finish(args.json, results, [], report.refresh_line), results)


def _ask(path: Path, request: dict[str, Any], *, verbose: bool) -> list[dict[str, Any]] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_SECONDS)
        try:
            sock.connect(str(path))
        except OSError:
            return None  # no run listens there (or the socket is stale): the usual case
        if peer_uid(sock) != os.geteuid():
            print(f"warning: {path} belongs to another user; refreshing here", file=sys.stderr)
            return None
        stream = sock.makefile("rb")
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            first = _answer(stream.readline(MAX_REQUEST_BYTES))
            if "declined" in first:
                if verbose:
                    print(f"matview run at {path} declined: {first['declined']}; refreshing here", file=sys.stderr)
                return None
            sock.settimeout(float(first["deadlineSeconds"]) + ANSWER_GRACE_SECONDS)
            second = _answer(stream.readline(16 * MAX_REQUEST_BYTES))
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            print(
                f"warning: matview run at {path} stopped answering ({exc or type(exc).__name__}); refreshing here",
                file=sys.stderr,
            )
            return None
    if "declined" in second:
        print(
            f"warning: matview run at {path} could not finish: {second['declined']}; refreshing here", file=sys.stderr
        )
        return None
    results = second["results"]
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        print(f"warning: matview run at {path} answered nonsense; refreshing here", file=sys.stderr)
        return None
    return results


def _answer(line: bytes) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise ValueError("the connection closed" if not line else "answer too long")
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


# --- the answering end: matview run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """A request the run will carry out: how many views, how long it may take, and the work."""

    views: int
    deadline_seconds: float
    results: Callable[[], Awaitable[list[dict[str, Any]]]]


#: What the run does with a request's files and database identity: a reason to decline, or the work.
Handler = Callable[[list[str], str], str | Accepted]


class ControlServer:
    """The Unix socket ``matview run`` answers ``matview refresh`` on, for as long as it runs."""

    def __init__(self, path: Path, server: asyncio.AbstractServer, inode: int) -> None:
        self.path, self._server, self._inode = path, server, inode

    @classmethod
    async def start(cls, path: Path, handle: Handler) -> ControlServer | None:
        """Listen on path; None (and a warning) when it cannot: another live run listens there, the path is
        not a socket, or the directory refuses. The run goes on either way."""
        try:
            return await cls._start(path, handle)
        except OSError as exc:
            logger.warning("cannot listen on %s (%s): 'matview refresh' will not hand refreshes here", path, exc)
            return None

    @classmethod
    async def _start(cls, path: Path, handle: Handler) -> ControlServer | None:
        import asyncio

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                logger.warning("%s exists and is not a socket: 'matview refresh' will not hand refreshes here", path)
                return None
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect(str(path))
                except OSError:
                    path.unlink()  # a stale socket of a run that is gone
                else:
                    logger.warning("another matview run listens on %s: refreshes are handed to it, not here", path)
                    return None

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await _serve_one(reader, writer, handle)
            except Exception:  # one connection's trouble never stops the run
                logger.exception("control socket: a request failed")
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        server = await asyncio.start_unix_server(serve, path=str(path), limit=MAX_REQUEST_BYTES)
        os.chmod(path, 0o600)  # connecting needs write permission: until now only the owner had it (umask)
        logger.info("'matview refresh' of these files is handed to this run on %s", path)
        return cls(path, server, path.lstat().st_ino)

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        with contextlib.suppress(OSError):
            if self.path.lstat().st_ino == self._inode:  # not a socket another run bound since
                self.path.unlink()


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handle: Handler) -> None:
    import asyncio

    async def send(value: dict[str, Any]) -> None:
        writer.write(json.dumps(value).encode() + b"\n")
        await writer.drain()

    sock = writer.get_extra_info("socket")
    if sock is None or peer_uid(sock) != os.geteuid():
        return
    try:
        line = await asyncio.wait_for(reader.readline(), REQUEST_SECONDS)
    except (ValueError, asyncio.LimitOverrunError):
        await send({"declined": f"a request is at most {MAX_REQUEST_BYTES} bytes"})
        return
    except TimeoutError:
        return
    request = _request(line)
    if isinstance(request, str):
        await send({"declined": request})
        return
    files, identity = request
    outcome = handle(files, identity)
    if isinstance(outcome, str):
        await send({"declined": outcome})
        return
    await send({"accepted": outcome.views, "deadlineSeconds": outcome.deadline_seconds})
    try:
        results = await asyncio.wait_for(outcome.results(), outcome.deadline_seconds)
    except TimeoutError:
        await send({"declined": f"no result within {outcome.deadline_seconds:.0f}s"})
        return
    await send({"results": results})


def _request(line: bytes) -> tuple[list[str], str] | str:
    """The request's files and database identity, or why it is not one."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: 64 KiB of "[" nests deeper than the parser goes
        return "a request is one line of JSON"
    if not isinstance(value, dict) or set(value) != {"refresh", "database"}:
        return 'a request is {"refresh": [files], "database": identity}'
    files, identity = value["refresh"], value["database"]
    if not isinstance(identity, str) or len(identity) > 128:
        return "database: not an identity"
    if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
        return f"refresh: a list of 1 to {MAX_FILES} files"
    if not all(isinstance(file, str) and 0 < len(file) <= 4096 and os.path.isabs(file) for file in files):
        return "refresh: each file an absolute path"
    return files, identity
