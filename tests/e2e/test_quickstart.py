"""The README's Kubernetes quickstart, run exactly as written, against the real control plane (issue #12).

The two shell blocks under "On Kubernetes" are read from README.md and run with bash: the first (the
operator from this checkout) in the background, the second to completion. Only what a user has in
their shell is set: KUBECONFIG (an admin of the test cluster) and DATABASE_URL (a database holding the
example's workload). So the README cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
from psycopg import sql

from matview import demo
from tests.conftest import skip_or_fail
from tests.e2e.conftest import ADMIN_TOKEN, ROOT, ControlPlane
from tests.e2e.test_e2e import MV_PATH, wait_for


def quickstart_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On Kubernetes", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def run_while_alive(
    command: list[str], env: dict[str, str], helper: subprocess.Popen[bytes], helper_log: Path, seconds: float = 400
) -> subprocess.CompletedProcess[str]:
    """Run command to completion, but fail at once, with the helper's last lines, if the helper process it
    needs (the operator) exits first: a `kubectl wait` would otherwise wait out its whole timeout."""
    steps = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + seconds
    while steps.poll() is None:
        if helper.poll() is not None:
            steps.kill()
            steps.communicate()
            raise AssertionError(
                f"the operator exited with {helper.returncode} while the steps ran:\n{helper_log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            steps.kill()
            raise AssertionError(f"the steps did not finish in {seconds} s:\n{helper_log.read_text()[-4000:]}")
        time.sleep(0.2)
    stdout, stderr = steps.communicate()
    return subprocess.CompletedProcess(command, steps.returncode, stdout, stderr)


def test_the_readme_kubernetes_quickstart_works_verbatim(control_plane: ControlPlane, dsn: str, tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        skip_or_fail("kubectl is not installed")
    operator_block, steps_block = quickstart_blocks()[:2]  # the others install the image: no kubelet here
    assert "matview operator" in operator_block and "kubectl apply -f examples/driver-matrix.yaml" in steps_block
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(demo.workload_sql())  # the shipped workload file
        conn.execute(sql.SQL("SELECT ops.load_driver_matrix(%s)"), (300,))
    env = {
        **{k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
        "KUBECONFIG": str(control_plane.kubeconfig(ADMIN_TOKEN, tmp_path / "admin.kubeconfig")),
        "DATABASE_URL": dsn,
    }
    log = (tmp_path / "operator.log").open("w")
    operator = subprocess.Popen(
        ["bash", "-c", operator_block], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        steps = run_while_alive(
            ["bash", "-euo", "pipefail", "-c", steps_block], env, operator, tmp_path / "operator.log"
        )
        assert steps.returncode == 0, (
            f"{steps.stdout}\n{steps.stderr}\n{(tmp_path / 'operator.log').read_text()[-4000:]}"
        )
        assert "mv-payments-driver-matrix-cabinet" in steps.stdout and "condition met" in steps.stdout

        def request_handled() -> bool:
            _, body = control_plane.request("GET", MV_PATH.format(ns="ops") + "/mv-payments-driver-matrix-cabinet")
            annotations = body.get("metadata", {}).get("annotations", {})
            wanted = annotations.get("matview.dev/refresh-requested-at")
            return bool(wanted) and body.get("status", {}).get("lastHandledRefreshRequest") == wanted

        try:
            wait_for(request_handled, "the annotated refresh to be handled", 60)
        except AssertionError as exc:
            _, body = control_plane.request("GET", MV_PATH.format(ns="ops") + "/mv-payments-driver-matrix-cabinet")
            seen = {"annotations": body.get("metadata", {}).get("annotations"), "status": body.get("status")}
            raise AssertionError(f"{exc}\n{seen}\n{(tmp_path / 'operator.log').read_text()[-6000:]}") from None
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT count(*) FROM ops.mv_payments_driver_matrix_cabinet").fetchone()
        assert rows is not None and rows[0] > 0
    finally:
        os.killpg(operator.pid, 15)
        try:
            operator.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(operator.pid, 9)
        log.close()
