"""controlplane/build.sh, with a stand-in `go`: a lock instead of a race, nothing partial or running after an
interrupt (issue #12). The stand-in sleeps as long as FAKE_GO_SLEEP says, then writes the -o file, and counts
its builds, so these tests take seconds and never need the real toolchain."""

from __future__ import annotations

import os
import signal
import subprocess
import time
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


#: How long an interrupted stand-in build sleeps: an odd number, so that looking for its `sleep` never
#: matches another process's (a CI runner's `sleep 300` matched the pattern "sleep 30").
INTERRUPTED_SLEEP = 29.637


def fake_go_running() -> bool:
    pattern = f"matview-fake-go|sleep {INTERRUPTED_SLEEP}"
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


def wait_for(check: object, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("gave up waiting")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_build_leaves_no_partial_directory_and_no_compiler(tmp_path: Path, signum: int) -> None:
    process = subprocess.Popen(
        [str(binaries.BUILD)],
        env=environment(tmp_path, INTERRUPTED_SLEEP),
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: partials(tmp_path) and (tmp_path / "count").exists())
    os.killpg(process.pid, signum)  # what Ctrl-C (SIGINT) or a CI timeout (SIGTERM) sends to the group
    process.wait(timeout=20)
    assert process.returncode != 0
    assert partials(tmp_path) == []
    wait_for(lambda: not fake_go_running(), 10)


def test_the_python_side_kills_the_whole_build_when_interrupted(tmp_path: Path) -> None:
    seen: list[str] = []

    def interrupt(line: str) -> None:
        seen.append(line)
        if "building etcd" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        binaries.build(interrupt, env=environment(tmp_path, INTERRUPTED_SLEEP))
    assert partials(tmp_path) == []
    wait_for(lambda: not fake_go_running(), 10)


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
