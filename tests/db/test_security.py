"""The query runs under a pinned name resolution and as the role the spec names; sessions stay clean (issue #10).

The operator connects as a non-superuser role, as docs/operations.md recommends. An attacker role that
may create objects in ``public`` plants a better-matching ``public.upper(varchar)`` that copies a table
it cannot read; a control step proves the plant works against the session's default search_path, and
then apply, Swap and Concurrent refreshes must never call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from matview.api.spec import MaterializedView
from matview.errors import ApplyError, SpecError, UnmanagedObjectError
from matview.observe.metrics import RefreshMetrics
from matview.plan import engine
from matview.plan.executor import LOCK_TABLE
from matview.plan.observed import Connection
from matview.plan.versions import VERSIONS_TABLE
from matview.refresh import apply_and_record, refresh
from matview.refresh.refresher import Refresher
from matview.refresh.settings import RunnerSettings
from tests.db.roles import Roles
from tests.helpers import view


@pytest.fixture
def roles(conn: Connection, dsn: str) -> Iterator[Roles]:
    r = Roles(dsn)
    operator, attacker, team, other = r["operator"], r["attacker"], r["team"], r["other"]
    conn.execute(f"""
        CREATE ROLE {operator} LOGIN;
        CREATE ROLE {attacker} LOGIN;
        CREATE ROLE {team} NOLOGIN;
        CREATE ROLE {other} NOLOGIN;
        CREATE SCHEMA app;
        CREATE TABLE app.t (id int PRIMARY KEY, code varchar NOT NULL);
        INSERT INTO app.t SELECT g, 'code' || g FROM generate_series(1, 20) g;
        CREATE TABLE app.secret (s text NOT NULL);
        INSERT INTO app.secret VALUES ('payroll'), ('keys');
        GRANT USAGE ON SCHEMA app TO {operator}, {team};
        GRANT SELECT ON app.t TO {operator}, {team};
        GRANT SELECT ON app.secret TO {operator};
        CREATE SCHEMA reports AUTHORIZATION {operator};
        GRANT USAGE, CREATE ON SCHEMA reports TO {team};
        GRANT {team} TO {operator};
        GRANT USAGE, CREATE ON SCHEMA public TO {attacker};
    """)
    yield r
    r.drop(conn, "operator", "attacker", "team", "other")


def plant_the_attack(roles: Roles) -> None:
    """As the attacker: a table anyone may write, and an upper(varchar) that copies app.secret into it."""
    with psycopg.connect(roles.login("attacker"), autocommit=True) as attacker:
        attacker.execute("""
            SET check_function_bodies = off;  -- the attacker cannot read app.secret; its victim can
            CREATE TABLE public.loot (s text);
            GRANT INSERT ON public.loot TO PUBLIC;
            CREATE FUNCTION public.upper(varchar) RETURNS text LANGUAGE sql VOLATILE AS
              $$ INSERT INTO public.loot SELECT s FROM app.secret; SELECT pg_catalog.upper($1::text) $$;
        """)


def loot(conn: Connection) -> int:
    row = conn.execute("SELECT count(*) FROM public.loot").fetchone()
    return int(row[0]) if row else -1


def report(**spec: Any) -> MaterializedView:
    body: dict[str, Any] = {"schema": "reports", "name": "codes", "query": "SELECT id, upper(code) AS c FROM app.t"}
    body.update(spec)
    return view("codes", "ops", **body)


def test_the_planted_function_never_runs_as_the_operator(conn: Connection, roles: Roles) -> None:
    plant_the_attack(roles)
    with psycopg.connect(roles.login("operator"), autocommit=True) as control:
        control.execute("SELECT upper(code) FROM app.t")  # the session's default "$user", public
    assert loot(conn) == 2 * 20, "the control step shows the plant works against the default search_path"
    conn.execute("TRUNCATE public.loot")

    v = report(indexes=[{"columns": ["id"], "unique": True}], refresh={"mode": "Swap"})
    with engine.connect(roles.login("operator")) as operator:
        assert engine.apply(operator, v).changed
        assert refresh(operator, v, "Swap").result == "success"
        assert refresh(operator, v, "Concurrent").result == "success"
        assert refresh(operator, v, "Full").result == "success"
        changed = view("codes", "ops", **{**_spec(v), "query": "SELECT id, upper(code) AS c, 1 AS v FROM app.t"})
        assert "query, searchPath, runAsRole or storage changed" in engine.apply(operator, changed).plan.reasons
    assert loot(conn) == 0
    row = conn.execute("SELECT c FROM reports.codes WHERE id = 1").fetchone()
    assert row == ("CODE1",)
    uses_planted = conn.execute(
        "SELECT count(*) FROM pg_depend WHERE refobjid = 'public.upper(varchar)'::regprocedure"
    ).fetchone()
    assert uses_planted == (0,), "the stored definition must reference pg_catalog.upper"


def _spec(v: MaterializedView) -> dict[str, Any]:
    return {
        "schema": v.schema,
        "name": v.name,
        "indexes": [{"columns": list(i.columns), "unique": i.unique} for i in v.indexes],
        "refresh": {"mode": v.refresh.mode},
    }


def test_unqualified_names_fail_at_apply_with_what_to_do(conn: Connection, roles: Roles) -> None:
    unqualified = report(query="SELECT id, code FROM t")
    with engine.connect(roles.login("operator")) as operator, pytest.raises(SpecError) as caught:
        engine.apply(operator, unqualified)
    message = {e.path: e.message for e in caught.value.errors}["spec.query"]
    assert 'relation "t" does not exist' in message
    assert "write the name as schema.name, or list its schema in spec.searchPath" in message
    listed = report(query="SELECT id, code FROM t", searchPath=["app"])
    with engine.connect(roles.login("operator")) as operator:
        assert engine.apply(operator, listed).changed
    assert conn.execute("SELECT count(*) FROM reports.codes").fetchone() == (20,)


def test_an_unqualified_predicate_function_fails_with_the_same_hint(conn: Connection, roles: Roles) -> None:
    conn.execute("CREATE FUNCTION app.small(int) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT $1 < 5'")
    conn.execute(f"GRANT EXECUTE ON FUNCTION app.small(int) TO {roles['operator']}")
    v = report(indexes=[{"columns": ["id"], "where": "small(id)"}])
    with engine.connect(roles.login("operator")) as operator, pytest.raises(ApplyError) as caught:
        engine.apply(operator, v)
    assert "function small(integer) does not exist" in str(caught.value)
    assert "list its schema in spec.searchPath" in str(caught.value)
    assert conn.execute("SELECT to_regclass('reports.codes')").fetchone() == (None,), "nothing half-created"


def test_run_as_role_builds_and_owns_the_view_with_that_roles_rights(conn: Connection, roles: Roles) -> None:
    team = roles["team"]
    secret = report(query="SELECT s FROM app.secret", runAsRole=team)
    with engine.connect(roles.login("operator")) as operator, pytest.raises(ApplyError) as caught:
        engine.apply(operator, secret)
    assert "permission denied for table secret" in str(caught.value)
    assert conn.execute("SELECT to_regclass('reports.codes')").fetchone() == (None,), "nothing half-created"

    v = report(runAsRole=team, indexes=[{"columns": ["id"], "unique": True}])
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, v)
        for mode in ("Swap", "Concurrent", "Full"):
            assert refresh(operator, v, mode).result == "success", mode
    owner = conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'reports.codes'::regclass")
    assert owner.fetchone() == (team,)
    # Dropping the role's grant on the table shows the view really runs with the role's rights.
    conn.execute(f"REVOKE SELECT ON app.t FROM {team}")
    with engine.connect(roles.login("operator")) as operator:
        failed = refresh(operator, v, "Full")
    assert (failed.result, failed.failure_reason) == ("failure", "permission")


@pytest.mark.parametrize(("role", "words"), [("other", "cannot act as"), ("missing", "does not exist")])
def test_a_role_the_operator_cannot_use_is_refused_before_any_change(
    conn: Connection, roles: Roles, role: str, words: str
) -> None:
    v = report(runAsRole=roles[role])
    with engine.connect(roles.login("operator")) as operator, pytest.raises(SpecError) as caught:
        engine.apply(operator, v)
    assert words in {e.path: e.message for e in caught.value.errors}["spec.runAsRole"]
    assert conn.execute("SELECT to_regclass('reports.codes')").fetchone() == (None,)


def test_lock_keys_quote_schema_and_name_separately() -> None:
    first = view("one", "ops", schema="a.b", name="c")
    second = view("two", "ops", schema="a", name="b.c")
    assert engine.lock_key(first) != engine.lock_key(second)
    assert engine.lock_key(first) == engine.lock_key(view("three", "other", schema="a.b", name="c"))


def test_no_other_role_can_take_or_hold_a_views_lock(conn: Connection, roles: Roles) -> None:
    """The lock is a row of a table only the operator's role may write. A hostile login, or a view's query
    running as its team's role, can neither take nor hold it; no advisory key means anything."""
    v = report(indexes=[{"columns": ["id"], "unique": True}])
    conn.execute(f"GRANT USAGE ON SCHEMA reports TO {roles['attacker']}")
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, v)
    key = engine.lock_key(v)
    with psycopg.connect(roles.login("attacker"), autocommit=True) as attacker:
        for statement in (
            f"INSERT INTO reports.{LOCK_TABLE} VALUES ('{key}', pg_backend_pid(), now())",
            f"UPDATE reports.{LOCK_TABLE} SET pid = pg_backend_pid()",
            f"SELECT * FROM reports.{LOCK_TABLE} FOR UPDATE",
            f"LOCK TABLE reports.{LOCK_TABLE}",
            f"TRUNCATE reports.{LOCK_TABLE}",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), attacker.transaction():
                attacker.execute(statement)
        for held in range(-5, 5):  # what an older operator's keys or any guess would be
            attacker.execute("SELECT pg_advisory_lock(%s::bigint)", (held,))
        with engine.connect(roles.login("operator")) as operator:
            for mode in ("Concurrent", "Swap"):
                assert refresh(operator, v, mode).result == "success", mode
            assert engine.apply(operator, v).changed is False


def test_a_lock_whose_holder_died_is_free_and_a_live_one_is_busy(conn: Connection, roles: Roles) -> None:
    v = report()
    dsn = roles.login("operator")
    with engine.connect(dsn) as holder:
        engine.apply(holder, v)
        with engine.view_lock(holder, v):
            with engine.connect(dsn) as operator:
                busy = refresh(operator, v, "Full")
                assert busy.busy and busy.result == "skipped", busy
            pid = holder.info.backend_pid
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(
                lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (0,)
            )
            with engine.connect(dsn) as operator:
                assert refresh(operator, v, "Full").result == "success", "a dead session holds nothing"


def test_a_look_alike_lock_table_is_refused_naming_its_owner(conn: Connection, roles: Roles) -> None:
    """Someone with CREATE in the view's schema made the lock table first: the engine will not use it."""
    conn.execute(f"GRANT USAGE, CREATE ON SCHEMA reports TO {roles['attacker']}")
    with psycopg.connect(roles.login("attacker"), autocommit=True) as attacker:
        attacker.execute(
            f"CREATE TABLE reports.{LOCK_TABLE} (relation text PRIMARY KEY, pid int, backend_start timestamptz, "
            "taken_at timestamptz DEFAULT now())"
        )
        attacker.execute(f"GRANT ALL ON reports.{LOCK_TABLE} TO PUBLIC")
    with engine.connect(roles.login("operator")) as operator, pytest.raises(UnmanagedObjectError) as caught:
        engine.apply(operator, report())
    assert roles["attacker"] in str(caught.value) and LOCK_TABLE in str(caught.value)
    assert conn.execute("SELECT to_regclass('reports.codes')").fetchone() == (None,)


def test_a_look_alike_versions_table_is_refused_and_never_written(conn: Connection, roles: Roles) -> None:
    """The data versions table is written on every refresh, as the operator: one planted first, with a
    trigger of its maker's, is never used."""
    conn.execute(f"GRANT USAGE, CREATE ON SCHEMA reports TO {roles['attacker']}")
    with psycopg.connect(roles.login("attacker"), autocommit=True) as attacker:
        attacker.execute(
            f"CREATE TABLE reports.{VERSIONS_TABLE} (relation text PRIMARY KEY, version bigint, changed_at "
            "timestamptz, mode text); GRANT ALL ON reports.matview_versions TO PUBLIC"
        )
    with engine.connect(roles.login("operator")) as operator, pytest.raises(UnmanagedObjectError) as caught:
        engine.apply(operator, report())
    assert roles["attacker"] in str(caught.value) and VERSIONS_TABLE in str(caught.value)
    assert conn.execute(f"SELECT count(*) FROM reports.{VERSIONS_TABLE}").fetchone() == (0,)
    assert conn.execute("SELECT to_regclass('reports.codes')").fetchone() == (None,)


@pytest.mark.parametrize("planted", [LOCK_TABLE, VERSIONS_TABLE])
def test_tables_the_schemas_owner_replaces_between_refreshes_are_never_written(
    conn: Connection, roles: Roles, planted: str
) -> None:
    """The owner of a view's schema may drop the engine's lock or versions table after it was made and plant a
    look-alike whose statement trigger runs as whoever writes to it (such triggers fire even for a write that
    changes no row): the next refresh fails naming the planter, writes nothing there and fires nothing."""
    attacker, operator = roles["attacker"], roles["operator"]
    conn.execute(f"CREATE SCHEMA owned AUTHORIZATION {attacker}; GRANT USAGE, CREATE ON SCHEMA owned TO {operator}")
    v = view("owned", "ops", schema="owned", query="SELECT id FROM app.t", refresh={"mode": "Full"})
    with engine.connect(roles.login("operator")) as operator_conn:
        apply_and_record(operator_conn, v)
        assert refresh(operator_conn, v, "Full").result == "success"
    with psycopg.connect(roles.login("attacker"), autocommit=True) as planter:
        planter.execute(f"""
            DROP TABLE owned.{planted};
            CREATE TABLE owned.loot (who text);
            GRANT INSERT ON owned.loot TO PUBLIC;
            CREATE TABLE owned.{planted} (relation text PRIMARY KEY, pid int, backend_start timestamptz,
                                          taken_at timestamptz DEFAULT now(), version bigint, changed_at timestamptz,
                                          mode text);
            GRANT ALL ON owned.{planted} TO PUBLIC;
            CREATE FUNCTION owned.steal() RETURNS trigger LANGUAGE plpgsql AS
                $$BEGIN INSERT INTO owned.loot VALUES (current_user); RETURN NULL; END$$;
            CREATE TRIGGER steal BEFORE INSERT OR UPDATE OR DELETE ON owned.{planted}
                FOR EACH STATEMENT EXECUTE FUNCTION owned.steal();
        """)
    with engine.connect(roles.login("operator")) as operator_conn:
        result = refresh(operator_conn, v, "Full")
    assert result.result == "failure" and attacker in (result.message or "") and planted in (result.message or "")
    assert conn.execute("SELECT count(*) FROM owned.loot").fetchone() == (0,), "the planted trigger ran"
    assert conn.execute(f"SELECT count(*) FROM owned.{planted}").fetchone() == (0,)


def wait_until(condition: Callable[[], bool], seconds: float = 30) -> None:
    """Wait for the condition itself; the bound only stops a hang."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


async def test_pooled_sessions_are_reset_and_stay_usable(conn: Connection, dsn: str) -> None:
    """A query may take an advisory lock or change settings; the session is reset (in the refresh's own last
    transaction for a REFRESH-only attempt, see tests/db/test_session.py; else by the lane's thread before the
    connection goes back to the pool) and
    every later use of it still works (psycopg's prepared statements would not survive: the pool does not
    prepare)."""
    conn.execute("CREATE SCHEMA ops")
    victim = view("victim", "ops", schema="ops", query="SELECT 1 AS one")
    grabber = view(
        "grabber",
        "ops",
        schema="ops",
        query="SELECT pg_try_advisory_lock(42::bigint) AS grabbed",
        refresh={"mode": "Full"},
    )
    refresher = Refresher(RefreshMetrics(), RunnerSettings(max_concurrent_per_database=1))
    try:
        await refresher.run_sync(dsn, lambda c: engine.apply(c, victim))
        await refresher.run_sync(dsn, lambda c: engine.apply(c, grabber))
        assert (await refresher.refresh(dsn, grabber)).result == "success"
        assert conn.execute("SELECT grabbed FROM ops.grabber").fetchone() == (True,), "the query did take it"

        # The lane's thread cleans its connection before refresh() returns (session.clean_for_return).
        held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 42").fetchone()
        assert held == (0,), "the pooled session kept the advisory lock (no reset)"
        results = [await refresher.refresh(dsn, victim) for _ in range(8)]
        results += await asyncio.gather(*(refresher.refresh(dsn, victim) for _ in range(3)))
        assert [r.result for r in results] == ["success"] * 11, [r.message for r in results]
    finally:
        refresher.close()


def prepared_statements_per_connection(pool: ConnectionPool[Connection], from_sql: bool) -> list[int]:
    """Count the prepared statements (from SQL's PREPARE, or else psycopg's own) on every connection of pool,
    held all at once: the pool can hand out any of them, and only those a refresh ran on hold its statements."""
    with contextlib.ExitStack() as stack:
        connections = [stack.enter_context(pool.connection()) for _ in range(pool.max_size)]
        counts = [
            c.execute("SELECT count(*) FROM pg_prepared_statements WHERE from_sql = %s", [from_sql]).fetchone()
            for c in connections
        ]
    return [count[0] for count in counts if count is not None]


async def test_a_query_that_prepares_or_deallocates_statements_does_not_disturb_other_views(
    conn: Connection, dsn: str
) -> None:
    """The pool keeps psycopg's prepared catalog reads across refreshes (issue #22). A query's function can
    PREPARE statements under psycopg's own names or DEALLOCATE ALL of them (not from a materialized view,
    whose query PostgreSQL runs as a security-restricted operation, but from an incremental Table's key
    recompute); the reset must see it, so the next views on the same pooled session refresh as before."""
    conn.execute("""
        CREATE SCHEMA ops;
        CREATE TABLE ops.events (kind text NOT NULL);
        INSERT INTO ops.events VALUES ('a'), ('b');
        CREATE FUNCTION ops.squat() RETURNS int LANGUAGE plpgsql AS $$
        BEGIN
            FOR i IN 0..200 LOOP
                BEGIN
                    EXECUTE format('PREPARE %I AS SELECT 1', '_pg3_' || i);
                EXCEPTION WHEN duplicate_prepared_statement THEN NULL;
                END;
            END LOOP;
            RETURN 1;
        END $$;
        CREATE FUNCTION ops.evict() RETURNS int LANGUAGE plpgsql AS $$
        BEGIN EXECUTE 'DEALLOCATE ALL'; RETURN 1; END $$;
    """)
    victims = [view(name, "ops", schema="ops", query="SELECT 1 AS one", refresh={"mode": "Full"}) for name in "vw"]

    def table_calling(name: str, function: str) -> MaterializedView:
        return view(
            name,
            "ops",
            schema="ops",
            storage="Table",
            query=f"SELECT kind, count(*) AS n, max({function}()) AS f FROM ops.events GROUP BY kind",
            incremental={"keyColumns": ["kind"], "sources": [{"table": "ops.events", "columns": ["kind"]}]},
            refresh={"mode": "Incremental"},
        )

    refresher = Refresher(RefreshMetrics(), RunnerSettings(max_concurrent_per_database=1))
    results: list[Any] = []

    async def refresh_victims() -> None:
        for victim in victims:
            results.extend([await refresher.refresh(dsn, victim) for _ in range(8)])

    try:
        hostile = [table_calling("squatter", "ops.squat"), table_calling("evictor", "ops.evict")]
        for each in (*victims, *hostile):
            await refresher.run_sync(dsn, functools.partial(apply_and_record, view=each))
        await refresh_victims()
        pool = refresher.pool(dsn)
        prepared = prepared_statements_per_connection(pool, from_sql=False)
        assert max(prepared) > 0, f"the refresh lane's catalog reads are not prepared: {prepared}"
        for each in hostile:
            conn.execute("INSERT INTO ops.events VALUES ('c')")
            outcome = await refresher.refresh(dsn, each)
            assert outcome.mode == "Incremental", outcome  # the key recompute ran the function
            victims.append(view(f"after-{each.resource_name}", "ops", schema="ops", query="SELECT 2 AS two"))
            await refresher.run_sync(dsn, functools.partial(engine.apply, view=victims[-1]))
            await refresh_victims()  # old ones, and a new one whose statements get prepared afresh
        assert all(r.result == "success" for r in results), [r.message for r in results if r.message]
        assert len(results) == 8 * (2 + 3 + 4)
        squatted = prepared_statements_per_connection(pool, from_sql=True)
        assert squatted == [0] * pool.max_size, squatted
    finally:
        refresher.close()


async def test_settings_a_query_changes_do_not_outlive_it(conn: Connection, dsn: str) -> None:
    conn.execute("CREATE SCHEMA ops")
    sneaky = view(
        "sneaky",
        "ops",
        schema="ops",
        query="SELECT set_config('statement_timeout', '1ms', false) AS t, set_config('work_mem', '64kB', false) AS w",
        refresh={"mode": "Full"},
    )
    refresher = Refresher(RefreshMetrics(), RunnerSettings(max_concurrent_per_database=1))
    try:
        await refresher.run_sync(dsn, lambda c: engine.apply(c, sneaky))
        assert (await refresher.refresh(dsn, sneaky)).result == "success"
        settings = await refresher.run_sync(
            dsn, lambda c: c.execute("SELECT current_setting('work_mem'), pg_sleep(0.05)::text").fetchone()
        )
        assert settings[0] != "64kB"
    finally:
        refresher.close()


#: Events of ten weeks, ending this week (the partitioned views below read them).
EVENTS = """
    CREATE TABLE app.events (id int PRIMARY KEY, at date NOT NULL, code varchar NOT NULL);
    INSERT INTO app.events SELECT g, current_date - 7 * (g % 10), 'c' || g FROM generate_series(1, 200) g;
"""


def weekly_events(team: str, partitioning: dict[str, Any] | None = None, **spec: Any) -> MaterializedView:
    """A view of app.events as the team, split by week, with the events as its partition source."""
    return report(
        query="SELECT id, at, upper(code) AS c FROM app.events",
        storage="Table",
        runAsRole=team,
        indexes=[{"columns": ["id", "at"], "unique": True}],
        partitioning={
            "column": "at",
            "by": "Range",
            "period": "Week",
            "sources": [{"table": "app.events", "column": "at"}],
            **(partitioning or {}),
        },
        **spec,
    )


def test_a_partitioned_view_is_built_rebuilt_and_retired_as_its_role(conn: Connection, roles: Roles) -> None:
    """Each partition's build runs the query as spec.runAsRole (its rights, not the operator's), the tables it
    makes are that role's, and a look-alike planted in public is never called by any of it."""
    team = roles["team"]
    conn.execute(EVENTS + f"GRANT SELECT ON app.events TO {roles['operator']}, {team};")
    plant_the_attack(roles)
    v = weekly_events(team, {"retain": "4w"})
    with engine.connect(roles.login("operator")) as operator:
        apply_and_record(operator, v)
        result = refresh(operator, v, "Swap")
    assert result.result == "success", result
    assert result.partitions is not None and result.partitions.rebuilt and result.partitions.retired, result
    owners = conn.execute(
        "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = 'reports.codes'::regclass "
        "OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'reports.codes'::regclass)"
    ).fetchall()
    assert owners == [(team,)]
    assert loot(conn) == 0
    conn.execute(f"REVOKE SELECT ON app.events FROM {team}")
    with engine.connect(roles.login("operator")) as operator:
        failed = refresh(operator, v, "Swap")
    assert (failed.result, failed.failure_reason) == ("failure", "permission"), failed


def test_the_claim_of_a_rebuild_of_touched_partitions_reads_as_the_views_role_and_a_refusal_loses_nothing(
    conn: Connection, roles: Roles
) -> None:
    """Auto rebuilding only the partitions an incremental view's changes touch first reads where the changed
    keys' rows lie, in the sources: as spec.runAsRole, never with the operator's rights (here the operator
    owns the source and the team may no longer read it). Refused, it changes nothing: the changes stay in the
    log, and the rebuild that follows once the team may read again applies every one."""
    operator, team = roles["operator"], roles["team"]
    conn.execute(EVENTS + f"ALTER TABLE app.events OWNER TO {operator}; GRANT SELECT ON app.events TO {team};")
    plant_the_attack(roles)
    v = weekly_events(
        team,
        incremental={
            "keyColumns": ["id"],
            "sources": [{"table": "app.events", "columns": ["id"]}],
            "fullRebuildRatio": 0.000001,
        },
    )
    with engine.connect(roles.login("operator")) as operator_conn:
        apply_and_record(operator_conn, v)
        operator_conn.execute("UPDATE app.events SET code = 'changed' WHERE id IN (10, 20, 30)")
        conn.execute(f"REVOKE SELECT ON app.events FROM {team}")
        refused = refresh(operator_conn, v)
        assert (refused.result, refused.failure_reason) == ("failure", "permission"), refused
        assert "find the partitions they touch" in refused.message, refused.message
        logged = conn.execute("SELECT count(*) FROM reports.codes_mv_changes").fetchone()
        assert logged is not None and logged[0] > 0  # not claimed
        conn.execute(f"GRANT SELECT ON app.events TO {team}")
        result = refresh(operator_conn, v)
    assert result.result == "success" and result.partitions is not None, result
    assert result.partitions.scope == "touched" and len(result.partitions.rebuilt) == 1, result.partitions
    assert conn.execute("SELECT count(*) FROM reports.codes WHERE c = 'CHANGED'").fetchone() == (3,)
    assert conn.execute("SELECT count(*) FROM reports.codes_mv_changes").fetchone() == (0,)
    assert loot(conn) == 0
