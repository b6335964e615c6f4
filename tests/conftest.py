"""Shared fixtures: one real PostgreSQL server per test session, a fresh database per test.

The server is started by the suite itself (Debian's binaries when installed, else
the ones the pgserver wheel ships). Nothing here is mocked.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest

from matview.embedded.localpg import LocalServer, find_bindir
from matview.plan import engine
from tests import hostile

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_counter = itertools.count()
#: What tests/e2e/image/build.sh and the image test need (Debian packages of the same names).
IMAGE_TOOLS = ("buildah", "podman", "mmdebstrap")


def skip_or_fail(reason: str) -> NoReturn:
    """Outside CI a test that cannot run is skipped with its reason; in CI it fails instead."""
    if IN_CI:
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


#: Every server the suite starts: fast (nothing here must survive a power cut), and able to decode logical
#: replication (incremental.capture: LogicalDecoding).
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "logical",
    "max_replication_slots": "64",
}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalServer]:
    base = Path(tempfile.mkdtemp(prefix="matview-test-pg-"))
    server = LocalServer(
        base / "data",
        bindir=find_bindir(prefer="system"),
        settings={**SERVER_SETTINGS, "max_connections": "200"},
    )
    server.start()
    try:
        hostile.plant_in_template(server.dsn(), server.dsn("template1"))
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def shadow_log(pg_server: LocalServer) -> hostile.ShadowLog:
    """Where the hostile look-alikes say that an engine session called them (tests/hostile.py)."""
    return hostile.ShadowLog(pg_server.data_dir / "server.log")


@pytest.fixture
def dsn(pg_server: LocalServer, shadow_log: hostile.ShadowLog) -> Iterator[str]:
    """A fresh database for one test, born with the hostile look-alikes of template1; the test fails if
    any of them ran in an engine session."""
    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    shadow_log.take()
    try:
        yield pg_server.dsn(name)
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            # A database with a replication slot cannot be dropped; a test that failed may have left one, in use
            # by a session that is ended first (waiting up to 10 s for it to go).
            admin.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = %s", (name,))
            admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s", (name,)
            )
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    called = shadow_log.take()
    if called:
        pytest.fail("an engine session called a hostile look-alike:\n" + "\n".join(called[:20]))


@pytest.fixture
def conn(dsn: str) -> Iterator[engine.Connection]:
    with engine.connect(dsn) as connection:
        yield connection


#: Tests that run in one pytest-xdist worker, one after another: the e2e tests share one control plane
#: (and the machine's few cores), the fault scenarios crash and slow down servers on purpose.
SERIAL_GROUPS = {"tests/e2e/": "e2e", "tests/faults/": "faults"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs PostgreSQL with ``db``: those using the suite's server (the pg_server
    fixture) and the fault scenarios, which start servers of their own to crash. ``pytest -m "not db"``
    then runs the rest alone. Put the serial groups in one xdist worker each."""
    for item in items:
        if "pg_server" in getattr(item, "fixturenames", ()) or item.nodeid.startswith("tests/faults/"):
            item.add_marker(pytest.mark.db)
        for prefix, group in SERIAL_GROUPS.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))


def _selected(config: pytest.Config, path: str) -> bool:
    """Whether the paths pytest was given include path (a directory or file under the root): how the
    pytest-xdist controller, which collects nothing itself, knows that the e2e tests will run."""
    wanted = (config.rootpath / path).resolve()
    for arg in config.args:
        given = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if given == wanted or given in wanted.parents or wanted in given.parents:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Give the fault suite's report a file of this run's own. Under pytest-xdist, the controller builds
    what the e2e tests need before the workers start, so the build's progress shows; the workers then find
    it cached (tests/e2e/binaries.py)."""
    config = session.config
    if hasattr(config, "workerinput"):
        return
    from tests.faults.harness import REPORT_VARIABLE

    if REPORT_VARIABLE not in os.environ:  # inherited by the workers, which xdist starts after this hook
        os.environ[REPORT_VARIABLE] = str(Path(tempfile.mkdtemp(prefix="matview-faults-")) / "report.jsonl")
    if not config.getoption("numprocesses", None):
        return
    if _selected(config, "tests/e2e"):
        _prepare_e2e(config, image=_selected(config, "tests/e2e/test_image.py"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's table (tests/faults/harness.py): rows lost, reader errors, failures counted and
    injected, recovery time, a scenario a line."""
    from tests.faults.harness import report_table

    lines = report_table()
    if lines:
        terminalreporter.section("fault suite")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the e2e control plane (and the operator image, when its test is selected) before any test
    runs, not inside a fixture, whose time would count against the first test's timeout; show the build
    scripts' progress lines."""
    if any(item.nodeid.startswith("tests/e2e/") for item in session.items):
        _prepare_e2e(
            session.config, image=any(item.nodeid.startswith("tests/e2e/test_image.py") for item in session.items)
        )


def _prepare_e2e(config: pytest.Config, image: bool) -> None:
    import shutil

    from tests.e2e import binaries

    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def show(line: str) -> None:
        if reporter is not None:
            reporter.write_line(line)

    if shutil.which("go") is None and not os.environ.get("KUBEBUILDER_ASSETS"):
        binaries.prepared = "neither Go nor KUBEBUILDER_ASSETS is available to provide kube-apiserver and etcd"
    else:
        try:
            binaries.prepared = binaries.build(show)
        except RuntimeError as exc:
            binaries.prepared = str(exc)
    if image:
        missing = [tool for tool in IMAGE_TOOLS if shutil.which(tool) is None]
        if missing:
            binaries.image_prepared = f"{', '.join(missing)} not installed (.ci/run installs them from Debian)"
            return
        try:
            binaries.image_prepared = binaries.build(show, script=binaries.IMAGE_BUILD)
        except RuntimeError as exc:
            binaries.image_prepared = str(exc)
