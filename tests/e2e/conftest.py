"""A real kube-apiserver and etcd (built from Go modules by controlplane/build.sh) for end-to-end tests.

The session fixture starts etcd and kube-apiserver on free loopback ports with RBAC authorization, a
service-account issuer and signing key, and self-signed serving certificates; applies crds/ and the
RBAC from manifests/; and mints a token for the operator's ServiceAccount through the TokenRequest API,
so the operator runs with exactly the manifests' permissions.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI, skip_or_fail
from tests.e2e import binaries

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "matview-e2e-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ControlPlane:
    url: str
    workdir: Path
    apiserver_command: list[str] = field(default_factory=list)
    apiserver: subprocess.Popen[bytes] | None = None

    def stop_apiserver(self) -> None:
        """Take the API away abruptly (the fault suite's outage: a graceful stop waits on open watches);
        etcd and the data stay."""
        assert self.apiserver is not None
        self.apiserver.kill()
        self.apiserver.wait(timeout=30)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again with the same flags, certificates and port; wait until it is ready."""
        log_path = self.workdir / "apiserver.log"
        self.apiserver = subprocess.Popen(self.apiserver_command, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
        _wait_ready(self, self.apiserver, log_path)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str = ADMIN_TOKEN,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": content_type, "Accept": accept},
        )
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return response.status, _decode(response.read().decode())
        except urllib.error.HTTPError as error:
            return error.code, _decode(error.read().decode())

    def apply_file(self, path: Path) -> None:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                self.create(document)

    def create(self, document: dict[str, Any]) -> None:
        status, body = self.request("POST", collection_path(document), document)
        assert status in (200, 201, 409), (status, body)

    def _trust(self) -> dict[str, Any]:
        """Verify the apiserver's self-signed certificate (kube-apiserver writes it to --cert-dir) like a real
        kubeconfig would; skipping verification makes the Python client warn on every single request."""
        certificate = self.workdir / "certs" / "apiserver.crt"
        if certificate.exists():
            return {"certificate-authority-data": base64.b64encode(certificate.read_bytes()).decode()}
        return {"insecure-skip-tls-verify": True}

    def kubeconfig(self, token: str, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "e2e",
                    "clusters": [{"name": "e2e", "cluster": {"server": self.url, **self._trust()}}],
                    "users": [{"name": "e2e", "user": {"token": token}}],
                    "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
                }
            )
        )
        return path


def _decode(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text  # /readyz and friends answer plain text


_PLURALS = {
    "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "CustomResourceDefinition": "customresourcedefinitions",
    "Secret": "secrets",
    "MaterializedView": "materializedviews",
    "RoleBinding": "rolebindings",
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "Service": "services",
}


def collection_path(document: dict[str, Any]) -> str:
    api_version, kind = document["apiVersion"], document["kind"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    namespace = document.get("metadata", {}).get("namespace")
    plural = _PLURALS[kind]
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


def _binaries() -> Path:
    if isinstance(binaries.prepared, Path):
        return binaries.prepared
    if shutil.which("go") is None and not os.environ.get("KUBEBUILDER_ASSETS"):
        skip_or_fail("neither Go nor KUBEBUILDER_ASSETS is available to provide kube-apiserver and etcd")
    message = binaries.prepared or "the control plane was not built before the tests (run them through pytest)"
    if IN_CI:
        pytest.fail(message)
    skip_or_fail(message)
    raise AssertionError("unreachable")


def _wait_ready(plane: ControlPlane, process: subprocess.Popen[bytes], log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited: {log.read_text()[-3000:]}")
        try:
            status, _ = plane.request("GET", "/readyz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"kube-apiserver not ready after {seconds} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    with running_control_plane(_binaries()) as plane:
        yield plane


@contextlib.contextmanager
def running_control_plane(binaries: Path) -> Iterator[ControlPlane]:
    """etcd and kube-apiserver from binaries, with the CRD, the namespace and RBAC applied (the e2e tests'
    fixture; benchmarks/scale.py uses it too)."""
    workdir = Path(tempfile.mkdtemp(prefix="matview-e2e-"))
    processes: list[subprocess.Popen[bytes]] = []
    plane: ControlPlane | None = None
    try:
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_log = (workdir / "etcd.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    str(binaries / "etcd"),
                    "--data-dir",
                    str(workdir / "etcd"),
                    "--name",
                    "e2e",
                    "--listen-client-urls",
                    f"http://127.0.0.1:{etcd_port}",
                    "--advertise-client-urls",
                    f"http://127.0.0.1:{etcd_port}",
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{peer_port}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{peer_port}",
                    "--initial-cluster",
                    f"e2e=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",
                    "--log-level",
                    "warn",
                ],
                stdout=etcd_log,
                stderr=subprocess.STDOUT,
            )
        )
        key = workdir / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        (workdir / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n')
        api_log_path = workdir / "apiserver.log"
        api_log = api_log_path.open("wb")
        apiserver_command = [
            str(binaries / "kube-apiserver"),
            "--etcd-servers",
            f"http://127.0.0.1:{etcd_port}",
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            str(api_port),
            "--cert-dir",
            str(workdir / "certs"),
            "--token-auth-file",
            str(workdir / "tokens.csv"),
            "--authorization-mode",
            "RBAC",
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            str(key),
            "--service-account-signing-key-file",
            str(key),
            "--service-cluster-ip-range",
            "10.0.0.0/24",
            "--disable-admission-plugins",
            "ServiceAccount",
            "--allow-privileged=true",  # a boolean flag: its value must be attached
        ]
        plane = ControlPlane(f"https://127.0.0.1:{api_port}", workdir, apiserver_command)
        plane.apiserver = subprocess.Popen(apiserver_command, stdout=api_log, stderr=subprocess.STDOUT)
        processes.append(plane.apiserver)
        _wait_ready(plane, plane.apiserver, api_log_path)
        plane.apply_file(ROOT / "crds/matview.dev_materializedviews.yaml")
        _wait_for_crd(plane)
        plane.apply_file(ROOT / "manifests/core/namespace.yaml")
        plane.apply_file(ROOT / "manifests/core/rbac.yaml")
        yield plane
    finally:
        if plane is not None and plane.apiserver is not None and plane.apiserver not in processes:
            processes.append(plane.apiserver)  # restarted by a test
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_crd(plane: ControlPlane) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = plane.request(
            "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/materializedviews.matview.dev"
        )
        # A CRD just created answers "conditions": null until the apiserver has looked at its names.
        found = ((body or {}).get("status") or {}).get("conditions") or []
        conditions = {c["type"]: c["status"] for c in found}
        if status == 200 and conditions.get("Established") == "True":
            return
        time.sleep(0.3)
    raise RuntimeError("the CRD was not established")


def operator_token(plane: ControlPlane) -> str:
    status, body = plane.request(
        "POST",
        "/api/v1/namespaces/matview-system/serviceaccounts/matview-operator/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )
    assert status == 201, (status, body)
    return str(body["status"]["token"])
