"""The operator image, built from the Dockerfile unchanged (tests/e2e/image/build.sh), really run.

Containers run as the Deployment runs them: user 10001, read-only root filesystem with a tmpfs at /tmp,
every capability dropped, no privilege escalation. They share the host's network so that the operator
inside reaches the e2e kube-apiserver and the test's PostgreSQL on 127.0.0.1.

Two things about these machines (shared sandboxes) are handled here rather than in the image: cgroups
are in hybrid v1/v2 mode, which crun refuses ("cgroups in hybrid mode not supported"), so runc is used
when installed; and podman's default rlimits for root exceed the sandbox's hard limits ("setrlimit
RLIMIT_NOFILE: Operation not permitted"), so the containers get explicit, smaller ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from matview.embedded.localpg import free_port
from tests.conftest import skip_or_fail
from tests.e2e import binaries
from tests.e2e.conftest import ROOT, ControlPlane, operator_token
from tests.e2e.test_e2e import MV_PATH, bind_secrets, condition, mv, namespace, wait_for

IMAGE = "localhost/matview-operator:e2e"
#: The Dockerfile's FROM (made from Debian packages by build.sh where Docker Hub is out of reach).
BASE = "docker.io/library/python:3.11-slim"
RUN_AS = "10001:10001"


@pytest.fixture(scope="module")
def podman() -> list[str]:
    """The podman command line for the image's storage (build.sh's), or the test fails/skips saying why."""
    if not isinstance(binaries.image_prepared, Path):
        skip_or_fail(str(binaries.image_prepared or "the image was not built before the tests (run through pytest)"))
        raise AssertionError("unreachable")
    storage = binaries.image_prepared
    command = [
        "podman",
        "--root",
        str(storage / "storage"),
        "--runroot",
        str(storage / "run"),
        "--storage-driver",
        "vfs",
    ]
    if shutil.which("runc"):
        command += ["--runtime", "runc"]
    return command


def run_flags(remove: bool = True) -> list[str]:
    """The Deployment's securityContext, as podman flags."""
    return [
        f"--rm={str(remove).lower()}",
        "--network=host",
        "--read-only",
        "--tmpfs=/tmp:rw,size=64m",
        f"--user={RUN_AS}",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--ulimit=nofile=4096:4096",
        "--ulimit=nproc=4096:4096",
    ]


def test_the_image_runs_as_the_dockerfile_says(podman: list[str]) -> None:
    inspected = subprocess.run([*podman, "image", "inspect", IMAGE], check=True, capture_output=True, text=True).stdout
    (image,) = json.loads(inspected)
    config = image["Config"]
    assert config["User"] == RUN_AS
    assert config["Entrypoint"] == ["matview"]
    assert config["Cmd"] == ["operator", "--all-namespaces"]
    assert {"9808/tcp", "8080/tcp"} <= set(config.get("ExposedPorts", {}))
    base = json.loads(
        subprocess.run([*podman, "image", "inspect", BASE], check=True, capture_output=True, text=True).stdout
    )[0]
    print(
        f"image {IMAGE}: {image['Size'] / 1e6:.0f} MB in {len(image['RootFS']['Layers'])} layers, "
        f"{(image['Size'] - base['Size']) / 1e6:.0f} MB above {BASE}"
    )


def test_the_image_leaves_out_what_the_operator_never_imports(podman: list[str]) -> None:
    """The embedded PostgreSQL is the demo's (an extra), and the kubernetes client's asyncio copy is unused:
    together about 100 MB of the image. The operator itself still starts (test_the_operator_in_the_image_…)."""
    probe = (
        "import importlib.util as u; import matview.k8s.main; "
        "print([name for name in ('pgserver', 'kubernetes.aio') if u.find_spec(name)])"
    )
    found = subprocess.run(
        [*podman, "run", *run_flags(), "--entrypoint=python", IMAGE, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]", found.stdout


def test_help_and_validate_as_a_non_root_user_on_a_read_only_root(podman: list[str]) -> None:
    helped = subprocess.run(
        [*podman, "run", *run_flags(), IMAGE, "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr
    assert "validate" in helped.stdout and "operator" in helped.stdout
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
    validated = subprocess.run(
        [*podman, "run", *run_flags(), f"--volume={ROOT / 'examples'}:/examples:ro", IMAGE, "validate"]
        + [f"/examples/{name}" for name in examples],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr
    for name in examples:
        for document in yaml.safe_load_all((ROOT / "examples" / name).read_text()):
            metadata = document["metadata"]
            assert f"{metadata.get('namespace', 'default')}/{metadata['name']}: valid" in validated.stdout
    wrote = subprocess.run(
        [*podman, "run", *run_flags(), "--entrypoint=sh", IMAGE, "-c", "id -u; touch /usr/x || echo refused"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrote.stdout.split() == ["10001", "refused"], wrote.stdout + wrote.stderr


def test_the_container_memory_limit_and_headroom_are_exported(podman: list[str]) -> None:
    """The Deployment's memory limit, as the process inside sees it (cgroup v1 or v2, whichever the host has)."""
    probe = (
        "from prometheus_client import generate_latest; from matview.observe.metrics import RefreshMetrics; "
        "print(generate_latest(RefreshMetrics().registry).decode())"
    )
    limited = subprocess.run(
        [*podman, "run", *run_flags(), "--memory=300m", "--entrypoint=python", IMAGE, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert limited.returncode == 0, limited.stderr
    values = {
        line.split()[0]: float(line.split()[1])
        for line in limited.stdout.splitlines()
        if line.startswith("matview_memory_")
    }
    assert values["matview_memory_limit_bytes"] == 300 * 1024 * 1024, limited.stdout
    assert 0 < values["matview_memory_working_set_bytes"] < values["matview_memory_limit_bytes"]
    headroom = values["matview_memory_limit_bytes"] - values["matview_memory_working_set_bytes"]
    assert abs(values["matview_memory_headroom_bytes"] - headroom) < 16 * 1024 * 1024  # read a moment apart


@pytest.fixture
def container(podman: list[str]) -> Iterator[str]:
    name = f"matview-e2e-{time.time_ns()}"
    try:
        yield name
    finally:
        stopped = subprocess.run([*podman, "stop", "--time=30", name], capture_output=True, text=True)
        print("podman stop:", stopped.returncode, stopped.stderr[-500:])
        subprocess.run([*podman, "rm", "--force", "--ignore", name], capture_output=True)


def test_the_operator_in_the_image_makes_a_view_ready(
    podman: list[str], container: str, control_plane: ControlPlane, dsn: str, tmp_path: Path
) -> None:
    ns = namespace(control_plane, "e2e-image")
    bind_secrets(control_plane, ns)
    control_plane.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": ns}, "stringData": {"uri": dsn}}
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.sales (id int PRIMARY KEY, region text, amount int);"
            "INSERT INTO public.sales SELECT g, 'r' || (g % 3), g FROM generate_series(1, 100) g"
        )
    kubeconfig = control_plane.kubeconfig(operator_token(control_plane), tmp_path / "kubeconfig")
    kubeconfig.chmod(0o644)  # read by user 10001 inside
    metrics = free_port()
    subprocess.run(
        [
            *podman,
            "run",
            *run_flags(remove=False),
            "--detach",
            f"--name={container}",
            f"--volume={kubeconfig}:/etc/matview/kubeconfig:ro",
            "--env=KUBECONFIG=/etc/matview/kubeconfig",
            IMAGE,
            *("operator", "--namespace", ns, "--metrics-port", str(metrics)),
            *("--liveness", f"http://127.0.0.1:{free_port()}/healthz"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    status, body = control_plane.request(
        "POST", MV_PATH.format(ns=ns), mv("sales-by-region", ns, refresh={"interval": "5s"})
    )
    assert status == 201, body

    def ready() -> bool:
        found = condition(control_plane, ns, "sales-by-region", "Ready")
        return found is not None and found["status"] == "True"

    try:
        wait_for(ready, "the view to be Ready under the containerised operator", 120)
    finally:
        logs = subprocess.run([*podman, "logs", container], capture_output=True, text=True)
        print(logs.stdout[-3000:], logs.stderr[-3000:])
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM public.sales_by_region").fetchone() == (3,)

    def scraped_a_refresh() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            return "matview_refresh_duration_seconds_count{" in response.read().decode()

    wait_for(scraped_a_refresh, "a scheduled refresh (interval 5s) in /metrics", 60)

    started = time.monotonic()
    stopped = subprocess.run([*podman, "stop", "--time=30", container], capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr
    waited = subprocess.run([*podman, "wait", container], capture_output=True, text=True)
    print(f"SIGTERM to exit: {time.monotonic() - started:.1f} s, exit code {waited.stdout.strip()}")
    assert waited.stdout.strip() == "0", "the operator did not shut down cleanly on SIGTERM"
