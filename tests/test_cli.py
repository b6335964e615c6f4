"""The matview command as users run it: a real process, real files, a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.db.catalog_helpers import index_names, is_matview, relations
from tests.helpers import document, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def matview(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "matview.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=300,
        check=False,
    )


def test_validate_good_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(to_yaml(document("orders")))
    ok = matview("validate", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "ops/orders: valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    doc = document("orders", refesh={"interval": "1h"}, query="SELECT 1; DROP TABLE x")
    bad.write_text(to_yaml(doc))
    refused = matview("validate", str(bad))
    assert refused.returncode == 2
    assert "spec.refesh: unknown field (did you mean 'refresh'?)" in refused.stderr
    assert "spec.query: must be exactly one statement, found 2" in refused.stderr
    missing = matview("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "No such file" in missing.stderr


def test_seed_example_plan_apply_reapply_delete(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((ROOT / "sql/examples/driver_matrix/schema.sql").read_text())
        conn.execute("SELECT ops.load_driver_matrix(500)")
        before = relations(conn)
    example = str(ROOT / "examples/driver-matrix.yaml")

    planned = matview("plan", "--dsn", dsn, example)
    assert planned.returncode == 0, planned.stderr
    assert "CREATE MATERIALIZED VIEW" in planned.stdout and "CREATE INDEX CONCURRENTLY" in planned.stdout
    with psycopg.connect(dsn) as conn:
        assert relations(conn) == before  # plan changed nothing

    applied = matview("apply", example, env={"DATABASE_URL": dsn})
    assert applied.returncode == 0, applied.stderr
    assert "ops.mv_payments_driver_matrix_cabinet: applied" in applied.stdout
    with psycopg.connect(dsn) as conn:
        assert is_matview(conn, "ops", "mv_payments_driver_matrix_cabinet")
        assert len(index_names(conn, "ops", "mv_payments_driver_matrix_cabinet")) == 7

    again = matview("apply", "--json", "--dsn", dsn, example)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)[0]["changed"] is False

    planned_json = json.loads(matview("plan", "--json", "--dsn", dsn, example).stdout)
    assert planned_json[0]["steps"] == []

    deleted = matview("delete", "--dsn", dsn, example)
    assert deleted.returncode == 0
    assert "deletionPolicy is Retain" in deleted.stdout
    with psycopg.connect(dsn) as conn:
        assert is_matview(conn, "ops", "mv_payments_driver_matrix_cabinet")


def test_database_errors_exit_1_with_message(dsn: str, tmp_path: Path) -> None:
    spec = tmp_path / "mv.yaml"
    spec.write_text(to_yaml(document("orders", schema="missing_schema")))
    result = matview("apply", "--dsn", dsn, str(spec))
    assert result.returncode == 2
    assert "spec.schema: schema 'missing_schema' does not exist" in result.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id int)")
    spec.write_text(to_yaml(document("orders")))
    taken = matview("apply", "--dsn", dsn, str(spec))
    assert taken.returncode == 1
    assert "not managed by this resource" in taken.stderr
    unreachable = matview("apply", "--dsn", "postgresql://nobody@127.0.0.1:1/none", str(spec))
    assert unreachable.returncode == 1
    assert "error: database" in unreachable.stderr


def test_no_database_configured_uses_the_embedded_server(tmp_path: Path) -> None:
    example = str(ROOT / "examples/quickstart.yaml")
    try:
        first = matview("apply", example, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert "using the embedded PostgreSQL" in first.stderr
        assert "public.daily_signups: applied" in first.stdout
        second = matview("apply", example, cwd=tmp_path)
        assert second.returncode == 0 and "up to date" in second.stdout
        assert (tmp_path / ".matview/pgdata/PG_VERSION").exists()
    finally:
        stopped = matview("embedded-stop", cwd=tmp_path)
    data = (tmp_path / ".matview/pgdata").resolve()
    assert stopped.stdout.startswith(f"stopped the embedded PostgreSQL in {data} (port "), stopped.stderr
    again = matview("embedded-stop", cwd=tmp_path)
    assert again.stdout.strip() == f"no embedded PostgreSQL was running in {data}"
    cleaned = matview("embedded-clean", cwd=tmp_path)
    assert cleaned.returncode == 0 and f"removed {data} (" in cleaned.stdout
    assert not data.exists()


def test_no_postgresql_binaries_anywhere_names_the_extra_that_brings_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pgserver is an extra (the operator's image leaves it out): a machine with neither it nor Debian's
    server, asked for the embedded one, gets the install command, not a traceback."""
    from matview.cli import main
    from matview.embedded import localpg

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("MATVIEW_PG_BINDIR", raising=False)
    monkeypatch.setattr(localpg, "_debian_bindir", lambda: None)
    monkeypatch.setattr(localpg, "_pgserver_bindir", lambda: None)
    example = str(ROOT / "examples/quickstart.yaml")
    for argv in (["apply", example], ["demo", "--once"]):
        assert main([*argv, "--embedded-dir", str(tmp_path / ".matview")]) == 1, argv
        err = capsys.readouterr().err
        assert "pip install 'matview-operator[embedded]'" in err, err
    assert not (tmp_path / ".matview").exists()


def test_the_dsn_can_come_from_a_file_so_it_stays_off_the_process_list(dsn: str, tmp_path: Path) -> None:
    spec = tmp_path / "mv.yaml"
    spec.write_text(to_yaml(document("orders", schema="public")))
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(dsn + "\n")
    dsn_file.chmod(0o600)
    applied = matview("apply", "--dsn-file", str(dsn_file), str(spec))
    assert applied.returncode == 0, applied.stderr
    with psycopg.connect(dsn) as conn:
        assert is_matview(conn, "public", "orders")
    missing = matview("plan", "--dsn-file", str(tmp_path / "nope"), str(spec))
    assert missing.returncode == 2
    assert "--dsn-file:" in missing.stderr and "No such file" in missing.stderr
    both = matview("plan", "--dsn", dsn, "--dsn-file", str(dsn_file), str(spec))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    for loose in (0o644, 0o660, 0o604):  # (0640 is allowed for a root-owned file, as libpq allows it)
        dsn_file.chmod(loose)
        refused = matview("plan", "--dsn-file", str(dsn_file), str(spec))
        assert refused.returncode == 2, refused.stderr
        assert "group or other permissions" in refused.stderr and f"chmod 600 {dsn_file}" in refused.stderr
        assert "postgres@" not in refused.stderr


def test_refresh_runs_upstream_views_first_whatever_the_order_given(dsn: str, tmp_path: Path) -> None:
    # An MV on an MV, as in PostgreSQL's own matview regression test: the downstream one must see new data.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (x int); INSERT INTO public.t VALUES (1), (2)")
    upstream = tmp_path / "upstream.yaml"
    upstream.write_text(to_yaml(document("up", schema="public", query="SELECT sum(x) AS total FROM public.t")))
    downstream = tmp_path / "downstream.yaml"
    downstream.write_text(
        to_yaml(document("down", schema="public", query="SELECT total * 10 AS tenfold FROM public.up"))
    )
    assert matview("apply", "--dsn", dsn, str(upstream), str(downstream)).returncode == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.t VALUES (7)")
    done = matview("refresh", "--json", "--dsn", dsn, str(downstream), str(upstream))
    assert done.returncode == 0, done.stderr
    assert [r["relation"] for r in json.loads(done.stdout)] == ["public.up", "public.down"]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT tenfold FROM public.down").fetchone() == (100,)


def test_json_errors_and_every_file_reported_past_a_bad_one(dsn: str, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(to_yaml(document("orders", schema="public")))
    broken = tmp_path / "broken.yaml"
    broken.write_text(to_yaml(document("broken", refresh={"interval": "soon"})))
    missing_schema = tmp_path / "missing.yaml"
    missing_schema.write_text(to_yaml(document("elsewhere", schema="nowhere")))
    done = matview("apply", "--json", "--dsn", dsn, str(broken), str(good), str(missing_schema))
    assert done.returncode == 2, done.stderr
    report = json.loads(done.stdout)
    applied = [r for r in report if "error" not in r]
    assert [(r["relation"], r["changed"], r["file"]) for r in applied] == [("public.orders", True, str(good))]
    errors = {r["file"]: r for r in report if "error" in r}
    assert errors[str(broken)]["error"]["problems"][0]["field"] == "spec.refresh.interval"
    assert errors[str(missing_schema)]["resource"] == "ops/elsewhere"
    assert errors[str(missing_schema)]["error"]["problems"] == [
        {"field": "spec.schema", "message": "schema 'nowhere' does not exist"}
    ]
    text = matview("plan", "--dsn", dsn, str(missing_schema), str(good))
    assert text.returncode == 2
    assert f"invalid: {missing_schema} (ops/elsewhere):" in text.stderr
    assert "public.orders: up to date" in text.stdout
    unreachable = matview("plan", "--json", "--dsn", "postgresql://nobody@127.0.0.1:1/none", str(good))
    assert unreachable.returncode == 1
    assert json.loads(unreachable.stdout)[0]["error"]["kind"] == "failed"


def test_help_has_no_markup_and_shows_defaults() -> None:
    shown = matview("run", "--help")
    assert shown.returncode == 0
    assert "``" not in shown.stdout and "(default: 9808)" in shown.stdout
    assert "``" not in matview("--help").stdout


def test_matview_page_walks_a_view_and_plan_says_when_no_index_allows_it(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, tag text NOT NULL)")
        conn.execute("INSERT INTO public.items SELECT g, 't' || (g % 2) FROM generate_series(1, 25) g")
    spec = tmp_path / "items.yaml"
    spec.write_text(
        to_yaml(
            document(
                "items",
                "shop",
                schema="public",
                name="item_view",
                query="SELECT id, tag FROM public.items",
                indexes=[{"columns": ["id"], "unique": True}],
            )
        )
    )
    assert matview("apply", "--dsn", dsn, str(spec)).returncode == 0
    seen: list[int] = []
    cursor: str | None = None
    while True:
        extra = ["--after", cursor] if cursor else []
        done = matview(
            "page", "--dsn", dsn, "--order", "id", "--limit", "10", "--equal", "tag=t1", "--json", *extra, str(spec)
        )
        assert done.returncode == 0, done.stderr
        [result] = json.loads(done.stdout)
        seen += [row[0] for row in result["rows"]]
        cursor = result["next"]
        if cursor is None:
            break
    assert seen == list(range(1, 26, 2))
    refused = matview("page", "--dsn", dsn, "--order", "tag", str(spec))
    assert refused.returncode == 2 and "--order: order (tag)" in refused.stderr, refused.stderr
    garbled = matview("page", "--dsn", dsn, "--order", "id", "--after", "nonsense", str(spec))
    assert garbled.returncode == 2 and "--after/--before" in garbled.stderr
    no_unique = tmp_path / "plain.yaml"
    no_unique.write_text(
        to_yaml(document("plain", "shop", schema="public", name="plain_view", query="SELECT id, tag FROM public.items"))
    )
    planned = matview("plan", "--dsn", dsn, str(no_unique))
    assert "keyset pages" in planned.stdout, planned.stdout
    assert "keyset pages" not in matview("plan", "--dsn", dsn, str(spec)).stdout


def test_operator_flags_are_checked_and_named_before_it_starts() -> None:
    """The operator gets its settings from the flags directly (not through the environment); a value it
    cannot use stops it at once with the flag's name, before it talks to any cluster."""
    wrong = matview("operator", "--all-namespaces", "--shard-count", "2", "--shard-index", "2")
    assert wrong.returncode == 2 and "--shard-index=2: must be below --shard-count=2" in wrong.stderr, wrong.stderr
    zero = matview("operator", "--all-namespaces", "--max-concurrent", "0")
    assert zero.returncode == 2 and "--max-concurrent=0" in zero.stderr, zero.stderr
