"""controlplane/build.sh, with a stand-in `go`: a lock instead of a race, nothing partial or running after an
interrupt (issue #12). The stand-in sleeps as long as FAKE_GO_SLEEP says, then writes the -o file, and counts
its builds, so these tests take seconds and never need the real toolchain."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e import binaries

FAKE_GO = """#!/usr/bin/env bash
# matview-fake-go: stands in for `go build -o OUT PKG` and `GOBIN=DIR go install PKG@VERSION`
out=""
while [[ $# -gt 0 ]]; do [[ "$1" == "-o" ]] && out="$2"; shift; done
[[ -n "$out" ]] || out="$GOBIN/helm"
echo build >> "$FAKE_GO_COUNT"
sleep "$FAKE_GO_SLEEP"
echo '#!/bin/sh' > "$out" && chmod +x "$out"
"""


def environment(tmp_path: Path, sleep: float) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "go").write_text(FAKE_GO)
    (bindir / "go").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "KUBEBUILDER_ASSETS"}
    env.update(
        PATH=f"{bindir}:{env['PATH']}",
        MATVIEW_CONTROLPLANE_CACHE=str(tmp_path / "cache"),
        FAKE_GO_SLEEP=str(sleep),
        FAKE_GO_COUNT=str(tmp_path / "count"),
    )
    return env


def partials(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*.partial*"))


#: How long an interrupted stand-in build sleeps: far longer than any wait below, so that a build still
#: running when a test looks is one that was not stopped.
INTERRUPTED_SLEEP = 60


def build_processes(tmp_path: Path) -> list[int]:
    """The processes of this test's build, whatever they run: every one of them (build.sh, its heartbeat, the
    stand-in go, its sleep) inherits the environment the test gave build.sh. Matching command lines instead
    saw the builds of other tests running beside this one (pytest-xdist), and took them for this one's."""
    marker = f"FAKE_GO_COUNT={tmp_path / 'count'}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return found


def describe(pids: list[int]) -> str:
    """ps's view of the processes (state and kernel wait channel), for a failure message."""
    if not pids:
        return "no process left"
    listing = subprocess.run(
        ["ps", "-ww", "-o", "pid,ppid,pgid,stat,wchan:24,etime,args", "-p", ",".join(map(str, pids))],
        capture_output=True,
        text=True,
    )
    return listing.stdout


@pytest.fixture(autouse=True)
def no_build_left_behind(tmp_path: Path) -> Iterator[None]:
    """Whatever a test asserted, none of its build's processes outlives it (they would hold its cache)."""
    yield
    kill_build(tmp_path)


def kill_build(tmp_path: Path) -> None:
    for pid in build_processes(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(check: Callable[[], object], seconds: float = 20, explain: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting after {seconds} s: {explain()}")


def wait_until_the_build_is_gone(tmp_path: Path) -> None:
    """Nothing of this test's build runs within 10 s; else the failure lists what still does."""
    wait_for(lambda: not build_processes(tmp_path), 10, lambda: describe(build_processes(tmp_path)))


#: Runs a command as a terminal would, with SIGINT's default action. A suite started from a background job
#: of a shell without job control (`( … & )`, nohup in a script) inherits SIGINT ignored, and bash cannot
#: trap a signal ignored on entry: build.sh then outlived its Ctrl-C (3 CI runs out of 3 started that way).
WITH_DEFAULT_SIGINT = (
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_build_leaves_no_partial_directory_and_no_compiler(tmp_path: Path, signum: int) -> None:
    process = subprocess.Popen(
        [*WITH_DEFAULT_SIGINT, str(binaries.BUILD)],
        env=environment(tmp_path, INTERRUPTED_SLEEP),
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: partials(tmp_path) and (tmp_path / "count").exists())
    os.killpg(process.pid, signum)  # what Ctrl-C (SIGINT) or a CI timeout (SIGTERM) sends to the group
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired as late:
        processes = describe(build_processes(tmp_path))
        kill_build(tmp_path)  # all of it: its children hold the stderr pipe open too
        _, said = process.communicate(timeout=10)
        raise AssertionError(f"build.sh still runs 20 s after the signal:\n{processes}\nit said:\n{said!r}") from late
    assert process.returncode != 0
    assert partials(tmp_path) == []
    wait_until_the_build_is_gone(tmp_path)


def test_the_python_side_kills_the_whole_build_when_interrupted(tmp_path: Path) -> None:
    seen: list[str] = []

    def interrupt(line: str) -> None:
        seen.append(line)
        if "building etcd" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        binaries.build(interrupt, env=environment(tmp_path, INTERRUPTED_SLEEP))
    assert partials(tmp_path) == []
    wait_until_the_build_is_gone(tmp_path)


def test_concurrent_builds_wait_for_one_another_and_build_once(tmp_path: Path) -> None:
    env = environment(tmp_path, 1)
    runs = [
        subprocess.Popen([str(binaries.BUILD)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    directories = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(directories) == 1
    built = Path(directories.pop())
    assert all((built / name).exists() for name in ("etcd", "kube-apiserver", "helm"))
    assert (tmp_path / "count").read_text().count("build") == 3, "three binaries, built once"
    assert any("waiting for it" in err for _, err in outputs)
    assert partials(tmp_path) == []
    progress = binaries.build(lambda line: None, env=env)  # cached now: nothing to do
    assert progress == built
