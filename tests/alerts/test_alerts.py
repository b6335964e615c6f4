"""Every alert fires on a series that should fire it and stays silent on one that should not (promtool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
RULE = ROOT / "manifests/monitoring/prometheusrule.yaml"


def test_promtool_rules_unit_tests(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool is not installed (Debian package 'prometheus'; .ci/run installs it)")
    rule = yaml.safe_load(RULE.read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(ROOT / "tests/alerts/alerts.test.yaml", tmp_path / "alerts.test.yaml")
    check = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_and_has_a_runbook_section() -> None:
    rule = yaml.safe_load(RULE.read_text())
    alerts = [r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert alerts == [
        "MaterializedViewRefreshFailing",
        "MaterializedViewStale",
        "MaterializedViewRefreshSlow",
        "MaterializedViewTargetLagMissed",
        "MaterializedViewIncrementalMismatch",
        "MaterializedViewCaptureSlotRetainsWAL",
        "MatviewRefreshesCannotKeepUp",
        "MatviewOperatorNearMemoryLimit",
        "MatviewOperatorDown",
    ]
    tests = (ROOT / "tests/alerts/alerts.test.yaml").read_text()
    runbook = (ROOT / "docs/runbook.md").read_text()
    for alert in alerts:
        assert f"alertname: {alert}" in tests
        assert f"## {alert}" in runbook
