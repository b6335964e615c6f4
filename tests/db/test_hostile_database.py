"""A hostile database user against the engine's own statements (issue #19).

The operator connects as a plain LOGIN role with the rights docs/operations.md and docs/incremental.md list.
An attacker who may only CREATE in ``public`` plants better-matching look-alikes of functions the engine's
catalog reads call (``obj_description(oid, text)`` beats ``pg_catalog.obj_description(oid, name)`` for a
string literal; ``unnest(int[])`` beats ``unnest(anyarray)``), each copying a table only the operator may
read. A control step proves every plant works under the server's default search_path; then plan, apply,
every refresh mode, an incremental refresh, verify and delete must never call one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from matview.api.spec import MaterializedView
from matview.constants import APPLICATION_NAME
from matview.errors import SpecError
from matview.observe.metrics import RefreshMetrics
from matview.plan import engine
from matview.plan.observed import Connection
from matview.refresh import record_build, refresh, verify
from matview.refresh.refresher import Refresher
from matview.refresh.settings import RunnerSettings
from tests import hostile
from tests.db.roles import Roles
from tests.helpers import view

#: (signature, return type, the pg_catalog call it forwards to) — each beats pg_catalog's own for the
#: argument types the engine passes, under a search_path that has public on it.
PLANTS = [
    ("obj_description(oid, text)", "text", "pg_catalog.obj_description($1, $2::name)"),
    ("pg_table_size(oid)", "bigint", "pg_catalog.pg_table_size($1::regclass)"),
    ("pg_indexes_size(oid)", "bigint", "pg_catalog.pg_indexes_size($1::regclass)"),
    ("array_position(integer[], integer)", "integer", "pg_catalog.array_position($1, $2)"),
    ("unnest(integer[])", "SETOF integer", "pg_catalog.unnest($1)"),
    ("unnest(oid[])", "SETOF oid", "pg_catalog.unnest($1)"),
    ("set_config(text, text, boolean)", "text", "pg_catalog.set_config($1, $2, $3)"),
]


@pytest.fixture
def roles(conn: Connection, dsn: str) -> Iterator[Roles]:
    r = Roles(dsn)
    operator, attacker = r["operator"], r["attacker"]
    conn.execute(f"""
        CREATE ROLE {operator} LOGIN;
        CREATE ROLE {attacker} LOGIN;
        CREATE SCHEMA app;
        CREATE TABLE app.src (k int NOT NULL, v int NOT NULL);
        INSERT INTO app.src SELECT g % 10, g FROM generate_series(1, 100) g;
        CREATE TABLE app.secret (s text NOT NULL);
        INSERT INTO app.secret VALUES ('payroll'), ('keys');
        GRANT USAGE ON SCHEMA app TO {operator};
        ALTER TABLE app.src OWNER TO {operator};  -- DROP TRIGGER needs ownership (docs/incremental.md)
        GRANT SELECT ON app.secret TO {operator};
        GRANT INSERT, UPDATE, DELETE ON app.src TO {attacker};
        GRANT USAGE ON SCHEMA app TO {attacker};
        CREATE SCHEMA reports AUTHORIZATION {operator};
        GRANT USAGE, CREATE ON SCHEMA public TO {attacker};
    """)
    yield r
    r.drop(conn, "operator", "attacker")


def plant(roles: Roles) -> None:
    """As the attacker: a table anyone may write, and look-alikes that copy app.secret into it (in place of
    the suite's forwarding look-alikes of the same signatures)."""
    with psycopg.connect(roles.dsn, autocommit=True) as admin:
        for signature, _, _ in PLANTS:
            admin.execute(f"DROP FUNCTION IF EXISTS public.{signature}")
    with psycopg.connect(roles.login("attacker"), autocommit=True) as attacker:
        attacker.execute("SET check_function_bodies = off")  # it cannot read app.secret; its victim can
        attacker.execute("CREATE TABLE public.loot (s text); GRANT INSERT ON public.loot TO PUBLIC")
        for signature, returns, forward in PLANTS:
            attacker.execute(
                f"CREATE FUNCTION public.{signature} RETURNS {returns} LANGUAGE sql VOLATILE AS "
                f"$$ INSERT INTO public.loot SELECT s FROM app.secret; SELECT {forward} $$"
            )


def loot(conn: Connection) -> int:
    row = conn.execute("SELECT count(*) FROM public.loot").fetchone()
    return int(row[0]) if row else -1


def views() -> list[MaterializedView]:
    return [
        view(
            "plain",
            "ops",
            schema="reports",
            name="plain",
            query="SELECT k, sum(v) AS total FROM app.src GROUP BY k",
            indexes=[{"columns": ["k"], "unique": True}],
        ),
        view(
            "inc",
            "ops",
            schema="reports",
            name="inc",
            storage="Table",
            query="SELECT k, sum(v) AS total FROM app.src GROUP BY k",
            indexes=[{"columns": ["k"], "unique": True}],
            incremental={"keyColumns": ["k"], "sources": [{"table": "app.src", "columns": ["k"]}]},
        ),
    ]


def test_the_plants_work_under_the_default_search_path(conn: Connection, roles: Roles) -> None:
    """The control: each plant is called by the statement shape the engine uses, from a default session."""
    plant(roles)
    with psycopg.connect(roles.login("operator"), autocommit=True) as control:
        control.execute("SELECT obj_description(c.oid, 'pg_class') FROM pg_class c WHERE c.oid = 'app.src'::regclass")
        assert loot(conn) == 2
        control.execute("SELECT pg_table_size(c.oid) FROM pg_class c WHERE c.oid = 'app.src'::regclass")
        control.execute("SELECT array_position(ARRAY[1, 2], NULL), x FROM unnest(ARRAY[1, 2]) x")
        control.execute("SELECT unnest(%s::oid[])", ([1],))
    assert loot(conn) == 2 * 6


def test_no_engine_statement_calls_a_plant(conn: Connection, roles: Roles) -> None:
    plant(roles)
    plain, inc = views()
    with engine.connect(roles.login("operator")) as operator:
        for mv in (plain, inc):
            engine.plan(operator, mv)
            assert engine.apply(operator, mv).built
            record_build(operator, mv)
        for mode in ("Concurrent", "Swap", "Full", "Auto"):
            assert refresh(operator, plain, mode).result == "success", mode
        conn.execute("UPDATE app.src SET v = v + 1 WHERE k = 3")
        result = refresh(operator, inc)
        assert (result.result, result.mode, result.keys_applied) == ("success", "Incremental", 1), result
        assert refresh(operator, inc, "Swap").result == "success"
        assert verify.compare(operator, inc, engine.settings_for(inc)).matches
        assert engine.apply(operator, inc).changed is False
        for mv in (plain, inc):
            engine.delete(operator, view(mv.owner.split("/")[1], "ops", **{**_spec(mv), "deletionPolicy": "Delete"}))
    assert loot(conn) == 0
    assert conn.execute("SELECT to_regclass('reports.inc'), to_regclass('reports.plain')").fetchone() == (None, None)


def _spec(mv: MaterializedView) -> dict[str, Any]:
    spec: dict[str, Any] = {"schema": mv.schema, "name": mv.name, "query": mv.query.text, "storage": mv.storage.value}
    if mv.incremental is not None:
        spec["incremental"] = {
            "keyColumns": list(mv.incremental.key_columns),
            "sources": [{"table": f"{s.schema}.{s.table}", "columns": list(s.columns)} for s in mv.incremental.sources],
        }
    return spec


async def test_a_query_that_sets_search_path_for_the_session_does_not_reach_the_engines_next_statement(
    conn: Connection, roles: Roles
) -> None:
    """A SELECT may call set_config('search_path', 'public', false): the engine's statements after it in the
    same session (the marker write, sizes, the next view's refresh on the pooled connection) stay pinned."""
    plant(roles)
    sneaky = view(
        "sneaky",
        "ops",
        schema="reports",
        name="sneaky",
        refresh={"mode": "Full"},
        query="SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', false) AS p, 1 AS one",
    )
    plain = views()[0]
    refresher = Refresher(RefreshMetrics(), RunnerSettings(max_concurrent_per_database=1))
    dsn = roles.login("operator")
    try:
        for mv in (sneaky, plain):
            await refresher.run_sync(dsn, functools.partial(engine.apply, view=mv))
        for mode in ("Full", "Swap"):
            assert (await refresher.refresh(dsn, sneaky, mode)).result == "success"
        assert (await refresher.refresh(dsn, plain)).result == "success"
        with engine.connect(dsn) as operator:
            assert refresh(operator, sneaky, "Swap").result == "success"
            path = operator.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()
            assert path == ("pg_catalog, pg_temp",)
    finally:
        refresher.close()
    assert loot(conn) == 0


def test_the_suite_wide_look_alikes_catch_an_engine_session_that_is_not_pinned(
    dsn: str, shadow_log: hostile.ShadowLog
) -> None:
    """Every test database is born with tests/hostile.py's look-alikes: one of them, called from a session
    that says it is the engine's but kept the default search_path, is seen in the server log."""
    planted = hostile.called_names()
    assert {"obj_description", "pg_table_size", "unnest", "array_position", "set_config"} <= planted
    with psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME) as unpinned:
        unpinned.execute("SELECT obj_description(c.oid, 'pg_class') FROM pg_class c WHERE c.relname = 'pg_class'")
        unpinned.execute("SELECT x FROM unnest(%s::oid[]) x", ([1],))
    called = shadow_log.take()
    assert any("public.obj_description(oid, text)" in line for line in called), called
    assert any("public.unnest(oid[])" in line for line in called), called
    with engine.connect(dsn) as pinned:
        pinned.execute("SELECT obj_description(c.oid, 'pg_class') FROM pg_class c WHERE c.relname = 'pg_class'")
    assert shadow_log.take() == []


def test_a_superuser_run_as_role_is_refused_unless_the_operator_allows_it(conn: Connection, dsn: str) -> None:
    name = f"su_{dsn.rsplit('/', 1)[1]}"
    conn.execute(f"CREATE ROLE {name} SUPERUSER NOLOGIN")
    try:
        conn.execute("CREATE SCHEMA reports")
        mv = view("su", "ops", schema="reports", name="su", query="SELECT 1 AS one", runAsRole=name)
        with pytest.raises(SpecError) as caught:
            engine.apply(conn, mv)
        message = {e.path: e.message for e in caught.value.errors}["spec.runAsRole"]
        assert "is a superuser" in message and "--allow-superuser-run-as-role" in message
        assert conn.execute("SELECT to_regclass('reports.su')").fetchone() == (None,)
        assert engine.apply(conn, mv, policy=engine.ApplyPolicy(allow_superuser_run_as_role=True)).built
    finally:
        conn.execute("DROP SCHEMA IF EXISTS reports CASCADE")
        conn.execute(f"DROP ROLE {name}")


def test_a_search_path_schema_others_can_create_in_is_warned_about_in_plan_and_apply(conn: Connection) -> None:
    conn.execute("CREATE SCHEMA shared; GRANT CREATE ON SCHEMA shared TO PUBLIC; CREATE SCHEMA reports")
    conn.execute("CREATE SCHEMA closed")
    mv = view("sp", "ops", schema="reports", name="sp", query="SELECT 1 AS one", searchPath=["closed", "shared"])
    plan = engine.plan(conn, mv)
    assert [w for w in plan.warnings if "'shared'" in w and "PUBLIC" in w], plan.warnings
    assert not [w for w in plan.warnings if "'closed'" in w], plan.warnings
    assert engine.apply(conn, mv).plan.warnings == plan.warnings


def test_a_view_whose_search_path_lists_a_planted_schema_runs_no_plant_in_the_refreshs_own_statements(
    conn: Connection, roles: Roles
) -> None:
    """spec.searchPath names a schema the attacker writes: the user's query resolves names there, but the
    statements the engine adds to the refresh's transaction (marker, lock release, sizes) must not."""
    plant(roles)
    listed = view(
        "listed",
        "ops",
        schema="reports",
        name="listed",
        query="SELECT k, sum(v) AS total FROM app.src GROUP BY k",
        indexes=[{"columns": ["k"], "unique": True}],
        searchPath=["public"],
    )
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, listed)  # plan and apply warn about the schema; they do not refuse it
        record_build(operator, listed)
        for mode in ("Concurrent", "Swap", "Full", "Auto"):
            result = refresh(operator, listed, mode)
            assert result.result == "success", result
            assert result.rows is not None and result.table_bytes, "the sizes were read in the same transaction"
    assert loot(conn) == 0


def listed_live_view(name: str, table: str) -> MaterializedView:
    """reports.<name>: the sums of app.<table>'s v by k, named unqualified, with a live view, and a
    spec.searchPath that lists the attacker's public before app."""
    return view(
        name.replace("_", "-"),
        "ops",
        schema="reports",
        name=name,
        storage="Table",
        query=f"SELECT k, sum(v) AS total FROM {table} GROUP BY k",
        searchPath=["public", "app"],
        indexes=[{"columns": ["k"], "unique": True}],
        incremental={"keyColumns": ["k"], "sources": [{"table": f"app.{table}", "columns": ["k"]}], "liveView": True},
    )


def test_an_incremental_view_whose_search_path_lists_a_planted_schema_runs_no_plant_in_the_engines_reads(
    conn: Connection, roles: Roles
) -> None:
    """spec.searchPath lists the attacker's schema first. The incremental step runs under it (the key-filtered
    query resolves the user's names there), and so did the engine's own claim of the keys: ``unnest(int[])`` and
    ``array_position`` on the log's key arrays ran the attacker's look-alikes as the operator (18 rows of loot
    over three refreshes before they were qualified), and so does the live view's function. The reads the
    inspection sends with the proof of the remembered resolution, after the proof's transaction, must not resolve
    there either."""
    plant(roles)
    listed = listed_live_view("listed_inc", "src")
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, listed)
        record_build(operator, listed)
        for round_ in range(3):  # the first resolves the query; the next prove the remembered resolution
            conn.execute("UPDATE app.src SET v = v + 1 WHERE k = %s", (round_,))
            # The live view's function (SECURITY DEFINER, under the same search path) reads the log's keys too.
            live = operator.execute("SELECT total FROM reports.listed_inc_live WHERE k = %s", (round_,)).fetchone()
            assert live == conn.execute("SELECT sum(v) FROM app.src WHERE k = %s", (round_,)).fetchone()
            result = refresh(operator, listed, "Incremental")
            assert (result.result, result.keys_applied) == ("success", 1), result
    assert loot(conn) == 0


def plant_equality(roles: Roles, conn: Connection) -> None:
    """As the attacker: ``=(varchar, varchar)`` in public, copying app.secret on every comparison. pg_catalog has
    no such operator (varchar compares as text), so wherever the search path lists public an unqualified ``=``
    between two varchars resolves to it; a control query proves it does. It replaces the suite's forwarding
    look-alike of the same signature."""
    conn.execute("DROP OPERATOR public.= (varchar, varchar)")
    with psycopg.connect(roles.login("attacker"), autocommit=True) as attacker:
        attacker.execute(
            "CREATE FUNCTION public.varchar_equal(varchar, varchar) RETURNS boolean LANGUAGE sql VOLATILE AS "
            "$$ INSERT INTO public.loot SELECT s FROM app.secret; SELECT $1::text OPERATOR(pg_catalog.=) $2::text $$"
        )
        attacker.execute("CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = varchar_equal)")
    with psycopg.connect(roles.login("operator"), autocommit=True) as control:
        control.execute("SET search_path = pg_catalog, public")
        control.execute("SELECT 'a'::varchar = 'a'::varchar")
    assert loot(conn) == 2
    conn.execute("TRUNCATE public.loot")


def test_an_incremental_view_keyed_by_a_varchar_runs_no_planted_equality_in_the_engines_statements(
    conn: Connection, roles: Roles
) -> None:
    """spec.searchPath lists the attacker's schema, and the key is a varchar. The engine's comparisons of keys
    (the claim's and the key filter's ``IN``, the live view's and its function's key match, verify's match of
    pending keys) resolved ``=`` there and ran the attacker's operator as the operator's role."""
    plant(roles)
    plant_equality(roles, conn)
    conn.execute(f"""
        CREATE TABLE app.named (k varchar NOT NULL, v int NOT NULL);
        INSERT INTO app.named SELECT 'k' || g % 10, g FROM generate_series(1, 100) g;
        ALTER TABLE app.named OWNER TO {roles["operator"]};
    """)
    listed = listed_live_view("listed_varchar", "named")
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, listed)
        record_build(operator, listed)
        for round_ in range(2):
            key = f"k{round_}"
            conn.execute("UPDATE app.named SET v = v + 1 WHERE k = %s", (key,))
            expected = conn.execute("SELECT sum(v) FROM app.named WHERE k = %s", (key,)).fetchone()
            live = operator.execute(
                "SELECT total FROM reports.listed_varchar_live WHERE k OPERATOR(pg_catalog.=) %s::text", (key,)
            ).fetchone()
            assert live == expected
            outcome = verify.compare(operator, listed, engine.settings_for(listed))
            assert outcome.matches and outcome.pending_keys == 1, outcome
            result = refresh(operator, listed, "Incremental")
            assert (result.result, result.keys_applied) == ("success", 1), result
            stored = operator.execute(
                "SELECT total FROM reports.listed_varchar WHERE k OPERATOR(pg_catalog.=) %s::text", (key,)
            ).fetchone()
            assert stored == expected
    assert loot(conn) == 0
