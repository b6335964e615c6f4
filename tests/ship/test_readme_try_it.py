"""The README's "Try it" command, run verbatim with bash in a copy of the repository, as a newcomer would.

It makes a virtualenv, installs the package with the extra that brings an embedded PostgreSQL (pgserver is
not a plain dependency: the operator's image leaves it out), and runs ``matview demo``, which builds the
workload in ``.matview/`` and then keeps the view fresh until Ctrl-C. The test waits for the demo to say it
is keeping the view fresh and for its /metrics to show the view's refreshes, then interrupts it as a user
would and stops the embedded server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def try_it_command() -> str:
    block = re.search(r"## Try it[^\n]*\n\n```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README.md has no 'Try it' command block"
    return block.group(1)


def tracked_copy(destination: Path) -> None:
    """The repository's tracked files (what a clone holds), without this checkout's .venv or caches."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


@pytest.mark.timeout(900)
def test_the_readme_try_it_command_runs_the_demo_on_an_embedded_server(tmp_path: Path) -> None:
    command = try_it_command()
    assert "[embedded]" in command, "the demo needs the embedded extra installed"
    checkout = tmp_path / "matview-operator"
    tracked_copy(checkout)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MATVIEW_PG_BINDIR", "VIRTUAL_ENV")}
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C goes to the whole group, as a terminal sends it
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("keeping ") and "Ctrl-C to stop" in line:
                serving.set()
        serving.set()  # the output ended: let the test see why

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        serving.wait(timeout=840)
        assert process.poll() is None, "the demo ended on its own:\n" + "".join(lines[-60:])
        text = "".join(lines)
        assert "-> starting an embedded PostgreSQL" in text, text[-3000:]
        url = re.search(r"metrics on (http://\S+/metrics)", text)
        assert url is not None, text[-3000:]
        metrics = urllib.request.urlopen(url.group(1), timeout=10).read().decode()
        assert re.search(r'^matview_refreshes_total\{[^}]*result="success"[^}]*\} [1-9]', metrics, re.M), metrics[:3000]
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0, "".join(lines[-40:])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=10)
        matview = checkout / ".venv/bin/matview"
        if matview.exists():
            subprocess.run([str(matview), "embedded-clean"], cwd=checkout, env=env, capture_output=True, timeout=120)
    assert "Traceback" not in "".join(lines), "".join(lines[-60:])
