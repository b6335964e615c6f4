"""Many MaterializedViews on one operator, on the e2e tests' real kube-apiserver and etcd.

Creates --views cheap views (one table, a unique index each, intervals spread over --interval-range),
runs `matview operator` as its ServiceAccount, and reports: RSS and CPU at steady state, time until all
are Ready, then from that moment (so the burst after creation counts) refresh start lateness and
event-loop lag (from the operator's own histograms), the views not refreshed at all in the window, apiserver
requests per view-hour and per refresh (from kube-apiserver's apiserver_request_total, less this
script's own requests), then restarts the operator and reports the SIGTERM time and how long until
every view is scheduled again. With --shards N, N operators split the views (each watching only its
buckets), the RSS is reported per replica too, and the script checks that every view was scheduled by
exactly one of them; --reshard-to M then replaces them with M shards (as a StatefulSet rollout does) and
checks it again. No assertions: read the numbers.

    python benchmarks/scale.py --views 3000 --steady-minutes 6

The window must be longer than the longest interval, so that every view is due in it at least once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from _server import bench_database

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import binaries  # noqa: E402
from tests.e2e.conftest import ControlPlane, operator_token, running_control_plane  # noqa: E402

from matview.embedded.localpg import free_port  # noqa: E402

MV = "/apis/matview.dev/v1alpha1/namespaces/{ns}/materializedviews"
NAMESPACE = "scale"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


#: One scrape: metric name, labels, value.
Samples = list[tuple[str, dict[str, str], float]]


@dataclass(frozen=True)
class Snapshot:
    """What the replicas and the control plane said at one moment."""

    metrics: list[Samples]
    """Each replica's /metrics."""
    usage: list[tuple[float, float]]
    """Each replica's (RSS MiB, CPU seconds)."""
    api: dict[tuple[str, str], float]
    """The API server's request counts by (verb, resource)."""
    at: float
    """time.monotonic()."""


def scrape(url: str, token: str | None = None) -> Samples:
    if not url.startswith(("http://", "https://")):
        raise ValueError(url)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})  # noqa: S310
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the e2e apiserver's self-signed cert
    with urllib.request.urlopen(request, timeout=60, context=context) as response:  # noqa: S310
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def histogram(samples: Samples, name: str) -> dict[float, float]:
    return {
        float(labels["le"]): value for metric, labels, value in samples if metric == f"{name}_bucket" and "le" in labels
    }


def merged_histogram(per_process: list[Samples], name: str) -> dict[float, float]:
    """One histogram's buckets summed over every series (views, modes) of every process."""
    merged: dict[float, float] = {}
    for samples in per_process:
        for metric, labels, value in samples:
            if metric == f"{name}_bucket" and "le" in labels:
                merged[float(labels["le"])] = merged.get(float(labels["le"]), 0.0) + value
    return merged


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """The bucket bound under which a fraction q of the observations between two scrapes fell."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0
    if total <= 0:
        return "no data"
    for bound, count in counts:
        if count >= q * total:
            return f"≤ {bound:g} s" if bound != float("inf") else "> last bucket"
    return "?"


def apiserver_requests(plane: ControlPlane) -> dict[tuple[str, str], float]:
    found: dict[tuple[str, str], float] = {}
    for metric, labels, value in scrape(plane.url + "/metrics", "matview-e2e-admin-token"):
        if metric == "apiserver_request_total" and labels.get("verb") not in ("WATCH",):
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            key = (labels.get("verb", ""), resource)
            found[key] = found.get(key, 0.0) + value
    return found


def operator_requests(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, float]:
    ours = ("materializedviews", "materializedviews/status", "secrets", "events")
    return {
        f"{verb} {resource}": after[(verb, resource)] - before.get((verb, resource), 0.0)
        for verb, resource in after
        if resource in ours and after[(verb, resource)] - before.get((verb, resource), 0.0) > 0
    }


def process_usage(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of a process from /proc."""
    rss_kib = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS")
    )
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kib / 1024, (int(fields[11]) + int(fields[12])) / ticks


def memory_by_structure(
    process: subprocess.Popen[bytes], target: Path, views: int, idle_mib: float
) -> dict[str, object]:
    """What the operator's per-view structures hold (benchmarks/_sized_operator.py), in MiB and KiB per view,
    and the rest of its RSS above an idle operator's."""
    rss_mib = process_usage(process.pid)[0]
    process.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 600
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(1)
    found = json.loads(target.read_text())
    sized = found["by_structure_bytes"]
    rest_mib = rss_mib - idle_mib - sum(sized.values()) / 2**20
    return {
        "rss_mib": round(rss_mib, 1),
        "idle_operator_mib": round(idle_mib, 1),
        "by_structure": {
            name: {"mib": round(size / 2**20, 1), "kib_per_view": round(size / 1024 / views, 1)}
            for name, size in {**sized, "rest above idle (kopf, clients, allocator)": rest_mib * 2**20}.items()
        },
        "gc_objects_by_type": found["gc_objects_by_type"],
    }


@contextmanager
def operator(
    plane: ControlPlane, workdir: Path, shard: tuple[int, int] = (0, 1), memory_report: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """memory_report: run it as benchmarks/_sized_operator.py, which sizes its structures there on SIGUSR2."""
    kubeconfig = plane.kubeconfig(operator_token(plane), workdir / f"operator-{time.time_ns()}.kubeconfig")
    metrics = free_port()
    log = (workdir / f"operator-{shard[0]}-{time.time_ns()}.log").open("wb")
    program = (str(ROOT / "benchmarks" / "_sized_operator.py"),) if memory_report else ("-m", "matview.cli")
    traced = {"MATVIEW_MEMORY_REPORT": str(memory_report)} if memory_report else {}
    process = subprocess.Popen(
        [
            *(sys.executable, *program, "operator", "--namespace", NAMESPACE),
            *("--metrics-port", str(metrics), "--liveness", f"http://127.0.0.1:{free_port()}/healthz"),
            *("--shard-index", str(shard[0]), "--shard-count", str(shard[1])),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), **traced},
        cwd=ROOT,
    )
    try:
        yield process, metrics
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def ready_count(plane: ControlPlane) -> tuple[int, int]:
    """Views Ready, and views listed, read in pages of 500; (0, 0) when the apiserver did not answer whole (a list
    of all 10,000 views at once under four operators' load timed out once, and once was cut off mid-body, each
    ending the run): the caller polls again."""
    ready = listed = 0
    after = ""
    while True:
        page = f"{MV.format(ns=NAMESPACE)}?limit=500" + (f"&continue={urllib.parse.quote(after)}" if after else "")
        try:
            status, body = plane.request("GET", page)
        except (TimeoutError, OSError, http.client.HTTPException):
            return 0, 0
        if status != 200:  # a continue token expired (410) or an overloaded apiserver: poll again
            return 0, 0
        for item in body.get("items", []):
            listed += 1
            for condition in (item.get("status") or {}).get("conditions") or []:
                if condition["type"] == "Ready" and condition["status"] == "True":
                    ready += 1
        after = (body.get("metadata") or {}).get("continue") or ""
        if not after:
            return ready, listed


def create_views(plane: ControlPlane, dsn: str, count: int, low: int, high: int) -> None:
    plane.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "matview-operator-secrets", "namespace": NAMESPACE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "matview-operator-secrets"},
        "subjects": [{"kind": "ServiceAccount", "name": "matview-operator", "namespace": "matview-system"}],
    }
    plane.create(binding)
    plane.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "namespace": NAMESPACE},
            "stringData": {"uri": dsn},
        }
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.src (id int PRIMARY KEY, v int NOT NULL)")
        conn.execute("INSERT INTO public.src SELECT g, g FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING")

    def one(i: int) -> None:
        interval = low + (i * 7919) % (high - low + 1)
        plane.create(
            {
                "apiVersion": "matview.dev/v1alpha1",
                "kind": "MaterializedView",
                "metadata": {"name": f"v{i:05d}", "namespace": NAMESPACE},
                "spec": {
                    "name": f"v{i:05d}",
                    "query": f"SELECT id, v FROM public.src WHERE id % 97 = {i % 97}",
                    "indexes": [{"columns": ["id"], "unique": True}],
                    "refresh": {"interval": f"{interval}s"},
                    "database": {"secretRef": {"name": "db"}},
                },
            }
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def scheduled_names(port: int) -> set[str] | None:
    """The views one operator schedules (each has its interval series from its first scheduling on)."""
    try:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return None
    return scheduled_in(samples)


def scheduled_in(samples: Samples) -> set[str]:
    """The views of one operator's /metrics samples: a view has its interval series from its first scheduling."""
    return {labels["name"] for m, labels, _ in samples if m == "matview_refresh_interval_seconds"}


def split(seen: list[set[str]], views: int) -> tuple[int, int]:
    """Views scheduled by two shards or more, and views scheduled by none."""
    union = set().union(*seen)
    return sum(1 for name in union if sum(name in names for names in seen) > 1), views - len(union)


def reshard(
    plane: ControlPlane, workdir: Path, old: list[tuple[subprocess.Popen[bytes], int]], count: int, views: int
) -> dict[str, object]:
    """Start `count` new shards, then stop the old ones (a StatefulSet's new pods and old overlap the same
    way); until every view is scheduled by exactly one new shard: how long, and how many were twice or missing."""
    started = time.monotonic()
    with ExitStack() as stack:
        new = [stack.enter_context(operator(plane, workdir, (i, count))) for i in range(count)]
        for process, _ in old:
            process.send_signal(signal.SIGTERM)
        for process, _ in old:
            process.wait(120)
        twice = missing = views
        while time.monotonic() - started < 900:
            time.sleep(2)
            seen = [scheduled_names(port) for _, port in new]
            answered = [names for names in seen if names is not None]
            if len(answered) < len(seen):
                continue
            twice, missing = split(answered, views)
            if twice == 0 and missing == 0:
                break
        return {
            "to_shards": count,
            "all_scheduled_once_s": round(time.monotonic() - started, 1),
            "views_scheduled_by_two_shards": twice,
            "views_scheduled_by_no_shard": missing,
            "rss_mib_per_replica": [round(process_usage(p.pid)[0], 1) for p, _ in new],
        }


def restart(
    plane: ControlPlane,
    workdir: Path,
    operators: list[tuple[subprocess.Popen[bytes], int]],
    views: int,
    shards: int,
    stack: ExitStack,
) -> dict[str, object]:
    """SIGTERM the first operator; unsharded, start a new one: how long until every view is scheduled again?"""
    report: dict[str, object] = {}
    process, _ = operators[0]
    stopping = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(120)
    report["sigterm_to_exit_s"] = round(time.monotonic() - stopping, 1)
    if shards == 1:
        restarted = time.monotonic()
        _, port = stack.enter_context(operator(plane, workdir))
        scheduled = 0.0
        while time.monotonic() - restarted < 600:
            time.sleep(1)
            try:
                samples = scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                continue
            # Scheduled (waiting in the heap) or running now: every view the new process knows to refresh.
            scheduled = sum(v for m, _, v in samples if m in ("matview_scheduled_views", "matview_refreshes_running"))
            if scheduled >= views:
                break
        report["restart_all_scheduled_s"] = round(time.monotonic() - restarted, 1)
        report["restart_scheduled"] = int(scheduled)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--views", type=int, default=1000)
    parser.add_argument("--interval-range", default="60-300", help="refresh intervals, seconds, spread over this range")
    parser.add_argument("--steady-minutes", type=float, default=6.0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--reshard-to", type=int, default=0, help="after the window, replace the shards with this many")
    parser.add_argument("--dsn", help="an existing server (default: a private one in a temp dir)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="at the end of the window, size what the operator's per-view structures hold (kopf's own state, "
        "the clients and the allocator are the rest of the RSS above an idle operator)",
    )
    args = parser.parse_args()
    low, high = (int(x) for x in args.interval_range.split("-"))
    built = binaries.build(lambda line: print(line, file=sys.stderr))
    workdir = Path(tempfile.mkdtemp(prefix="matview-scale-"))
    report: dict[str, object] = {"views": args.views, "intervals_s": args.interval_range, "shards": args.shards}
    with bench_database(args.dsn) as dsn, running_control_plane(built) as plane, ExitStack() as stack:
        with operator(plane, workdir) as (idle, _):  # RSS with nothing to watch: the per-view figure excludes it
            time.sleep(15)
            baseline_mib = process_usage(idle.pid)[0]
        report["baseline_rss_mib"] = round(baseline_mib, 1)
        t0 = time.monotonic()
        create_views(plane, dsn, args.views, low, high)
        report["create_seconds"] = round(time.monotonic() - t0, 1)
        started = time.monotonic()
        memory_report = workdir / "memory.json" if args.memory else None
        operators = [
            stack.enter_context(operator(plane, workdir, (i, args.shards), memory_report if i == 0 else None))
            for i in range(args.shards)
        ]
        while (ready := ready_count(plane))[0] < args.views:
            if time.monotonic() - started > 1800:
                break
            time.sleep(2)
        report["ready"] = ready[0]
        report["time_to_all_ready_s"] = round(time.monotonic() - started, 1)

        def snapshot() -> Snapshot:
            return Snapshot(
                metrics=[scrape(f"http://127.0.0.1:{port}/metrics") for _, port in operators],
                usage=[process_usage(p.pid) for p, _ in operators],
                api=apiserver_requests(plane),
                at=time.monotonic(),
            )

        before = snapshot()
        rss_samples: list[float] = []
        rss_per_replica: list[float] = [0.0] * len(operators)
        # Per 30 s slice of the window: when the late starts happened (a burst after creation, or all along).
        slices: list[dict[str, object]] = []
        previous = merged_histogram(before.metrics, "matview_refresh_start_lateness_seconds")
        deadline = time.monotonic() + args.steady_minutes * 60
        while time.monotonic() < deadline:
            time.sleep(10)
            each = [process_usage(p.pid)[0] for p, _ in operators]
            rss_samples.append(sum(each))
            rss_per_replica = [max(a, b) for a, b in zip(rss_per_replica, each, strict=True)]
            if len(rss_samples) % 3 == 0:
                metrics = [scrape(f"http://127.0.0.1:{port}/metrics") for _, port in operators]
                current = merged_histogram(metrics, "matview_refresh_start_lateness_seconds")
                slices.append(
                    {
                        "at_s": round(time.monotonic() - before.at),
                        "lateness_p99": quantile(previous, current, 0.99),
                        "queue_depth": sum(v for m in metrics for n, _, v in m if n == "matview_refresh_queue_depth"),
                        "lanes": sum(v for m in metrics for n, _, v in m if n == "matview_refresh_lanes"),
                    }
                )
                previous = current
        after = snapshot()
        seconds = after.at - before.at
        cpu = sum(a[1] - b[1] for a, b in zip(after.usage, before.usage, strict=True))
        refreshes = 0.0
        lateness = {"p50": "", "p99": ""}
        lag = {"p99": ""}
        merged_before: dict[float, float] = {}
        merged_after: dict[float, float] = {}
        lag_before: dict[float, float] = {}
        lag_after: dict[float, float] = {}
        for b_metrics, a_metrics in zip(before.metrics, after.metrics, strict=True):
            refreshes += sum(v for m, labels, v in a_metrics if m == "matview_refreshes_total")
            refreshes -= sum(v for m, labels, v in b_metrics if m == "matview_refreshes_total")
            for target, source, name in (
                (merged_before, b_metrics, "matview_refresh_start_lateness_seconds"),
                (merged_after, a_metrics, "matview_refresh_start_lateness_seconds"),
                (lag_before, b_metrics, "matview_event_loop_lag_seconds"),
                (lag_after, a_metrics, "matview_event_loop_lag_seconds"),
            ):
                for bound, value in histogram(source, name).items():
                    target[bound] = target.get(bound, 0.0) + value
        lateness = {q: quantile(merged_before, merged_after, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        refreshed_in_window = set()
        for b_metrics, a_metrics in zip(before.metrics, after.metrics, strict=True):
            counted = {labels["name"]: 0.0 for m, labels, _ in a_metrics if m == "matview_refreshes_total"}
            for m, labels, v in a_metrics:
                if m == "matview_refreshes_total":
                    counted[labels["name"]] += v
            for m, labels, v in b_metrics:
                if m == "matview_refreshes_total":
                    counted[labels["name"]] -= v
            refreshed_in_window |= {name for name, count in counted.items() if count > 0}
        lag = {"p99": quantile(lag_before, lag_after, 0.99)}
        requests = operator_requests(before.api, after.api)
        total_requests = sum(requests.values())
        view_hours = args.views * seconds / 3600
        report.update(
            rss_mib=round(max(rss_samples), 1),
            rss_mib_per_replica=[round(r, 1) for r in rss_per_replica],
            rss_kib_per_view=round((max(rss_samples) - baseline_mib * args.shards) * 1024 / args.views, 1),
            cpu_percent_of_one_core=round(100 * cpu / seconds, 1),
            steady_seconds=round(seconds),
            refreshes=int(refreshes),
            refreshes_per_second=round(refreshes / seconds, 1),
            views_not_refreshed_in_window=args.views - len(refreshed_in_window),
            refresh_start_lateness=lateness,
            refresh_duration={
                q: quantile(
                    merged_histogram(before.metrics, "matview_refresh_duration_seconds"),
                    merged_histogram(after.metrics, "matview_refresh_duration_seconds"),
                    v,
                )
                for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
            },
            per_30s=slices,
            event_loop_lag=lag,
            apiserver_requests=requests,
            apiserver_requests_per_view_hour=round(total_requests / view_hours, 2),
            apiserver_requests_per_refresh=round(total_requests / max(refreshes, 1), 2),
        )
        if args.shards > 1:
            scheduled_by = [scheduled_in(metrics) for metrics in after.metrics]
            twice, missing = split(scheduled_by, args.views)
            report["views_scheduled_by_two_shards"] = twice
            report["views_scheduled_by_no_shard"] = missing
            report["views_per_shard"] = [len(shard) for shard in scheduled_by]
        if memory_report is not None:
            report["memory"] = memory_by_structure(operators[0][0], memory_report, args.views, baseline_mib)
        if args.reshard_to > 1:
            report["reshard"] = reshard(plane, workdir, operators, args.reshard_to, args.views)
        else:
            report.update(restart(plane, workdir, operators, args.views, args.shards, stack))
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
