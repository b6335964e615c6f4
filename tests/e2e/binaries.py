"""kube-apiserver and etcd (and the operator image) for the e2e tests: built before any test runs, outside
per-test timeouts.

``build`` runs controlplane/build.sh (or image/build.sh) in its own process group, streams its progress
lines, and kills the whole group if it is interrupted, so no compiler is left running and no partial
build is left behind (build.sh cleans its own partial directory on the way out). The root conftest calls it right after
collection when e2e tests are selected (under pytest-xdist, the controller first, where its progress shows); the
control_plane fixture then only reads the result.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

BUILD = Path(__file__).resolve().parent / "controlplane" / "build.sh"
IMAGE_BUILD = Path(__file__).resolve().parent / "image" / "build.sh"

#: The result of the build made before the tests: the binaries' directory, or why there are none.
prepared: Path | str | None = None
#: The same for the operator image: the image storage directory, or why there is no image.
image_prepared: Path | str | None = None


def build(progress: Callable[[str], None], env: dict[str, str] | None = None, script: Path = BUILD) -> Path:
    """Run a build script (nothing to do when cached); raise RuntimeError with its output when it fails.
    One build of a script at a time on this machine: pytest-xdist's workers (and the controller, which
    builds first to show progress) then find it cached instead of building it side by side."""
    lock = Path(tempfile.gettempdir()) / f"matview-build-{script.parent.name}.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        return _build(progress, env, script)


def _build(progress: Callable[[str], None], env: dict[str, str] | None, script: Path) -> Path:
    process = subprocess.Popen(
        [str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    lines: list[str] = []
    try:
        assert process.stderr is not None and process.stdout is not None
        for line in process.stderr:
            lines.append(line.rstrip())
            progress(line.rstrip())
        output = process.stdout.read()
        code = process.wait()
    except BaseException:
        stop_group(process)
        raise
    if code != 0:
        raise RuntimeError(f"{script.parent.name}/{script.name} failed ({code}): " + "\n".join(lines[-40:]))
    return Path(output.strip().splitlines()[-1])


def stop_group(process: subprocess.Popen[str]) -> None:
    """TERM the build's whole process group (build.sh, go, the compilers), then KILL what remains."""
    for signum, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
