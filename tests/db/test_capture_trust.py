"""Change capture cannot be forged, borrowed or turned against another team (issue #19).

The operator connects as a plain LOGIN role; ``team`` is a view's runAsRole, ``member`` a login in that
team, ``attacker`` a role that may CREATE in the view's schema. Every test asserts that nothing ran as
another role, and that no other table was touched.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from matview.api.spec import MaterializedView
from matview.errors import ApplyError, SpecError, UnmanagedObjectError
from matview.plan import capture, engine
from matview.plan.marker import Marker
from matview.plan.observed import Connection
from matview.refresh import record_build, refresh, verify
from tests.db.roles import Roles
from tests.helpers import view

QUERY = "SELECT k, sum(v) AS total FROM app.src GROUP BY k"


@pytest.fixture
def roles(conn: Connection, dsn: str) -> Iterator[Roles]:
    r = Roles(dsn)
    operator, team, member, attacker = r["operator"], r["team"], r["member"], r["attacker"]
    conn.execute(f"""
        CREATE ROLE {operator} LOGIN;
        CREATE ROLE {team} NOLOGIN;
        CREATE ROLE {member} LOGIN IN ROLE {team};
        CREATE ROLE {attacker} LOGIN;
        CREATE SCHEMA app AUTHORIZATION {operator};
        CREATE TABLE app.src (k int NOT NULL, v int NOT NULL);
        ALTER TABLE app.src OWNER TO {operator};
        INSERT INTO app.src SELECT g % 10, g FROM generate_series(1, 100) g;
        GRANT USAGE ON SCHEMA app TO {team}, {attacker};
        GRANT SELECT ON app.src TO {team};
        GRANT INSERT, UPDATE, DELETE ON app.src TO {attacker};
        CREATE SCHEMA reports AUTHORIZATION {operator};
        GRANT USAGE, CREATE ON SCHEMA reports TO {team}, {attacker};
        GRANT {team} TO {operator};
        CREATE TABLE public.ran (who text, what text);
        GRANT INSERT ON public.ran TO PUBLIC;
    """)
    yield r
    r.drop(conn, "operator", "member", "attacker", "team")


def incremental(**spec: Any) -> MaterializedView:
    body: dict[str, Any] = {
        "schema": "reports",
        "name": "inc",
        "storage": "Table",
        "query": QUERY,
        "indexes": [{"columns": ["k"], "unique": True}],
        "incremental": {"keyColumns": ["k"], "sources": [{"table": "app.src", "columns": ["k"]}]},
    }
    body.update(spec)
    return view("inc", "ops", **body)


def ran(conn: Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT who, what FROM public.ran").fetchall()


def capture_triggers(conn: Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.src'::regclass AND NOT tgisinternal"
    ).fetchone()
    return int(row[0]) if row else -1


def update_capture(mv: MaterializedView) -> str:
    """The capture function of the first source's UPDATEs (the tests' writes are UPDATEs of app.src)."""
    return capture.function_name(mv, 0, "UPDATE")


def owners(conn: Connection, mv: MaterializedView) -> tuple[str, str]:
    """The change log's owner and the one owner of all the capture functions (a failure if they differ)."""
    functions = [f'reports."{name}"()' for name in capture.functions(mv)]
    row = conn.execute(
        "SELECT pg_get_userbyid(c.relowner), array_agg(DISTINCT pg_get_userbyid(p.proowner)), count(p.oid) "
        "FROM pg_class c, pg_proc p WHERE c.oid = %s::regclass AND p.oid = ANY(%s::regprocedure[]) "
        "GROUP BY c.relowner",
        (f'reports."{capture.changes_name(mv)}"', functions),
    ).fetchone()
    assert row is not None and len(row[1]) == 1 and row[2] == len(functions), row
    return str(row[0]), str(row[1][0])


def test_forged_look_alikes_with_copied_markers_are_refused_naming_their_owner(conn: Connection, roles: Roles) -> None:
    """Before the first apply, a role with CREATE in the view's schema plants the change log and the
    capture function under their names, with the markers copied: apply adopts neither and touches no
    source, and the planted function never runs."""
    mv = incremental()
    digest = capture.capture_digest(mv)
    with psycopg.connect(roles.login("attacker"), autocommit=True) as attacker:
        attacker.execute(
            f"CREATE TABLE reports.{capture.changes_name(mv)} "
            "(k int[], mv_changed_at timestamptz, mv_full_rebuild text)"
        )
        attacker.execute(
            sql.SQL("COMMENT ON TABLE {} IS {}").format(
                sql.Identifier("reports", capture.changes_name(mv)),
                sql.Literal(Marker(mv.owner, "changes", digest).to_comment()),
            )
        )
        attacker.execute(
            f"CREATE FUNCTION reports.{update_capture(mv)}() RETURNS trigger LANGUAGE plpgsql "
            "SECURITY DEFINER AS $$ BEGIN INSERT INTO public.ran VALUES (current_user, 'capture'); RETURN NULL; END $$"
        )
        attacker.execute(
            sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
                sql.Identifier("reports", update_capture(mv)),
                sql.Literal(Marker(mv.owner, "capture", digest).to_comment()),
            )
        )
    with engine.connect(roles.login("operator")) as operator, pytest.raises(UnmanagedObjectError) as caught:
        engine.apply(operator, mv)
    assert roles["attacker"] in str(caught.value) and capture.changes_name(mv) in str(caught.value)
    assert capture_triggers(conn) == 0
    assert conn.execute("SELECT to_regclass('reports.inc')").fetchone() == (None,), "nothing half-created"
    conn.execute(f"DROP TABLE reports.{capture.changes_name(mv)}")
    with engine.connect(roles.login("operator")) as operator, pytest.raises(UnmanagedObjectError) as caught:
        engine.apply(operator, mv)
    assert f"{update_capture(mv)}()" in str(caught.value) and roles["attacker"] in str(caught.value)
    conn.execute("UPDATE app.src SET v = v + 1 WHERE k = 1")
    assert capture_triggers(conn) == 0 and ran(conn) == []


def test_with_run_as_role_the_capture_belongs_to_the_operator_and_a_team_member_cannot_replace_it(
    conn: Connection, roles: Roles
) -> None:
    mv = incremental(runAsRole=roles["team"])
    with engine.connect(roles.login("operator")) as operator:
        assert engine.apply(operator, mv).built
        record_build(operator, mv)
    assert owners(conn, mv) == (roles["operator"], roles["operator"])
    owner = conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'reports.inc'::regclass")
    assert owner.fetchone() == (roles["team"],), "the view itself is the team's, as runAsRole declares"
    with psycopg.connect(roles.login("member"), autocommit=True) as member, pytest.raises(psycopg.Error) as caught:
        member.execute(
            f"CREATE OR REPLACE FUNCTION reports.{update_capture(mv)}() RETURNS trigger LANGUAGE plpgsql "
            "SECURITY DEFINER AS $$ BEGIN INSERT INTO public.ran VALUES (current_user, 'x'); RETURN NULL; END $$"
        )
    assert isinstance(caught.value, psycopg.errors.InsufficientPrivilege)
    conn.execute("UPDATE app.src SET v = v + 1 WHERE k = 2")
    with engine.connect(roles.login("operator")) as operator:
        result = refresh(operator, mv)
    assert (result.result, result.mode, result.keys_applied) == ("success", "Incremental", 1), result
    assert ran(conn) == []


def test_an_altered_capture_function_is_restored_with_a_full_rebuild(conn: Connection, roles: Roles) -> None:
    """Whoever could replace the body (the operator's own role, a superuser): apply and plan do not say
    "up to date"; apply restores the body and the next refresh rebuilds in full."""
    mv = incremental()
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, mv)
        record_build(operator, mv)
    function = f"reports.{update_capture(mv)}"
    conn.execute(
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
        "AS $$ BEGIN INSERT INTO public.ran VALUES (current_user, 'replaced'); RETURN NULL; END $$"
    )
    conn.execute(f"ALTER FUNCTION {function}() OWNER TO {roles['operator']}")
    with engine.connect(roles.login("operator")) as operator:
        plan = engine.plan(operator, mv)
        assert any("altered" in reason for reason in plan.reasons), plan.reasons
        assert engine.apply(operator, mv).changed
        assert engine.apply(operator, mv).changed is False
        conn.execute("UPDATE app.src SET v = v + 1 WHERE k = 3")
        result = refresh(operator, mv)
    assert result.mode == "Swap" and result.result == "success", result
    assert ran(conn) == []
    assert owners(conn, mv) == (roles["operator"], roles["operator"])


def test_capture_made_by_an_older_operator_as_the_team_is_re_created_as_the_operators(
    conn: Connection, roles: Roles
) -> None:
    mv = incremental(runAsRole=roles["team"])
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, mv)
        record_build(operator, mv)
    conn.execute(f"ALTER TABLE reports.{capture.changes_name(mv)} OWNER TO {roles['team']}")
    conn.execute(f"ALTER FUNCTION reports.{update_capture(mv)}() OWNER TO {roles['team']}")
    with engine.connect(roles.login("operator")) as operator:
        assert engine.apply(operator, mv).changed
        assert owners(conn, mv) == (roles["operator"], roles["operator"])
        conn.execute("DELETE FROM app.src WHERE k = 4")
        result = refresh(operator, mv)
    assert result.result == "success", result
    assert conn.execute("SELECT count(*) FROM reports.inc WHERE k = 4").fetchone() == (0,)


def test_a_trigger_someone_put_on_the_change_log_makes_apply_re_create_it(conn: Connection, roles: Roles) -> None:
    mv = incremental()
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, mv)
        record_build(operator, mv)
    conn.execute(
        "CREATE FUNCTION public.spy() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO public.ran VALUES (current_user, 'spy'); RETURN NULL; END $$"
    )
    conn.execute(
        f"CREATE TRIGGER spy AFTER DELETE ON reports.{capture.changes_name(mv)} "
        "FOR EACH STATEMENT EXECUTE FUNCTION public.spy()"
    )
    with engine.connect(roles.login("operator")) as operator:
        assert engine.apply(operator, mv).changed
        conn.execute("UPDATE app.src SET v = v + 1 WHERE k = 5")
        assert refresh(operator, mv).result == "success"
        assert refresh(operator, mv).result in ("success", "skipped")
    assert ran(conn) == []


def _refused(roles: Roles, mv: MaterializedView) -> dict[str, str]:
    with engine.connect(roles.login("operator")) as operator, pytest.raises(SpecError) as caught:
        engine.apply(operator, mv)
    return {e.path: e.message for e in caught.value.errors}


def _nothing_created(conn: Connection, mv: MaterializedView, table: str = "app.src") -> None:
    assert conn.execute("SELECT to_regclass('reports.inc')").fetchone() == (None,)
    log = conn.execute("SELECT to_regclass(%s)", (f"reports.{capture.changes_name(mv)}",)).fetchone()
    assert log == (None,)
    triggers = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal", (table,)
    ).fetchone()
    assert triggers == (0,)


@pytest.mark.parametrize(
    ("column", "query_key", "words"),
    [
        ("ref text", "ref::int", "column 'ref' is text but key column 'k' is integer"),
        ("ref integer", "ref::smallint", "column 'ref' is integer but key column 'k' is smallint"),
        ("ref json", "ref", "no default equality and hash operator classes"),
        ("ref varchar(8)", "ref::varchar(4)", "column 'ref' is character varying(8)"),
    ],
)
def test_a_key_that_a_write_could_fail_to_convert_is_refused_before_anything_is_created(
    conn: Connection, roles: Roles, column: str, query_key: str, words: str
) -> None:
    conn.execute(f"CREATE TABLE app.refs ({column}, v int); ALTER TABLE app.refs OWNER TO {roles['operator']}")
    conn.execute("INSERT INTO app.refs VALUES ('1', 1)")
    mv = incremental(
        query=f"SELECT {query_key} AS k, v FROM app.refs",
        indexes=[],
        incremental={"keyColumns": ["k"], "sources": [{"table": "app.refs", "columns": ["ref"]}]},
    )
    errors = _refused(roles, mv)
    assert words in errors.get("spec.incremental.sources[0].columns[0]", ""), errors
    _nothing_created(conn, mv, "app.refs")
    conn.execute(
        "INSERT INTO app.refs VALUES ('x', 2)" if "text" in column else "INSERT INTO app.refs VALUES (NULL, 2)"
    )


def test_a_key_whose_equality_is_an_extensions_is_refused_before_anything_is_created(
    conn: Connection, roles: Roles
) -> None:
    """citext's equality is public.=(citext, citext), which ignores case. The engine compares keys with
    pg_catalog's operators (so that nothing planted on the search path runs in its statements), and for citext
    pg_catalog's is text's, which does not: a change to 'ABC' would recompute its group without the 'abc' rows.
    Refused, naming the key and why, instead of applying keys differently from the type's own equality."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS citext SCHEMA public")
    conn.execute(f"CREATE TABLE app.refs (ref public.citext, v int); ALTER TABLE app.refs OWNER TO {roles['operator']}")
    conn.execute("INSERT INTO app.refs VALUES ('ABC', 1), ('abc', 2)")
    mv = incremental(
        query="SELECT ref AS k, sum(v) AS total FROM app.refs GROUP BY ref",
        indexes=[],
        incremental={"keyColumns": ["k"], "sources": [{"table": "app.refs", "columns": ["ref"]}]},
    )
    errors = _refused(roles, mv)
    message = errors.get("spec.incremental.sources[0].columns[0]", "")
    assert "key column 'k' is public.citext, whose equality is public's, not PostgreSQL's own" in message, errors
    _nothing_created(conn, mv, "app.refs")


def test_a_table_the_view_role_cannot_read_gets_no_capture(conn: Connection, roles: Roles) -> None:
    """Another team's table, which the view's role may not read: refused before anything is created."""
    conn.execute(f"CREATE TABLE app.theirs (k int, v int); ALTER TABLE app.theirs OWNER TO {roles['operator']}")
    mv = incremental(
        runAsRole=roles["team"],
        query="SELECT k, sum(v) AS total FROM app.src GROUP BY k UNION ALL SELECT k, v FROM app.theirs",
        indexes=[],
        incremental={
            "keyColumns": ["k"],
            "sources": [{"table": "app.src", "columns": ["k"]}, {"table": "app.theirs", "columns": ["k"]}],
        },
    )
    errors = _refused(roles, mv)
    assert f"role {roles['team']!r}, which builds this view, may not read app.theirs" in str(errors), errors
    _nothing_created(conn, mv, "app.theirs")
    _nothing_created(conn, mv, "app.src")


def test_a_first_build_that_fails_leaves_no_capture_on_any_source(conn: Connection, roles: Roles) -> None:
    mv = incremental(query="SELECT k, 1 / (v - 50) AS total FROM app.src", indexes=[])
    with engine.connect(roles.login("operator")) as operator, pytest.raises(ApplyError, match="division by zero"):
        engine.apply(operator, mv)
    _nothing_created(conn, mv)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("pg_catalog.pg_class", "is a system catalog"),
        ("reports.inc_mv_changes", "this view's own storage or change log"),
        ("reports.inc", "this view's own storage or change log"),
        ("app.parent", "has inheritance children"),
    ],
)
def test_sources_that_capture_cannot_watch_are_refused_before_anything_is_created(
    conn: Connection, roles: Roles, table: str, words: str
) -> None:
    conn.execute(f"""
        CREATE TABLE app.parent (k int, v int); CREATE TABLE app.child () INHERITS (app.parent);
        ALTER TABLE app.parent OWNER TO {roles["operator"]}; ALTER TABLE app.child OWNER TO {roles["operator"]};
    """)
    mv = incremental(
        query="SELECT k, v AS total FROM app.parent",
        indexes=[],
        incremental={"keyColumns": ["k"], "sources": [{"table": table, "columns": ["k"]}]},
    )
    errors = _refused(roles, mv)
    assert words in errors.get("spec.incremental.sources[0].table", ""), errors
    _nothing_created(conn, mv, "app.parent")


def test_writes_under_replica_role_are_captured_and_a_trigger_not_enabled_always_is_repaired(
    conn: Connection, roles: Roles
) -> None:
    mv = incremental()
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, mv)
        record_build(operator, mv)
        with psycopg.connect(roles.dsn, autocommit=True) as replica:  # as logical replication applies
            replica.execute("SET session_replication_role = replica")
            replica.execute("UPDATE app.src SET v = v + 1000 WHERE k = 6")
        result = refresh(operator, mv)
        assert (result.mode, result.keys_applied) == ("Incremental", 1), result
        assert conn.execute("SELECT total FROM reports.inc WHERE k = 6").fetchone() == (
            conn.execute("SELECT sum(v) FROM app.src WHERE k = 6").fetchone()[0],  # type: ignore[index]
        )
        for state in ("ENABLE REPLICA", "ENABLE", "DISABLE"):
            conn.execute(f"ALTER TABLE app.src {state} TRIGGER {capture.trigger_names(mv)['UPDATE']}")
            plan = engine.plan(operator, mv)
            assert any("not enabled ALWAYS" in reason for reason in plan.reasons), (state, plan.reasons)
            assert engine.apply(operator, mv).changed
            result = refresh(operator, mv)
            assert result.mode == "Swap", (state, result)
        enabled = conn.execute(
            "SELECT array_agg(DISTINCT tgenabled::text) FROM pg_trigger WHERE tgrelid = 'app.src'::regclass "
            "AND NOT tgisinternal"
        ).fetchone()
        assert enabled == (["A"],)


def incompressible(length: int) -> str:
    return base64.b64encode(os.urandom(length))[:length].decode()


def test_a_key_too_large_for_the_claim_falls_back_to_a_full_rebuild_that_says_why(
    conn: Connection, roles: Roles
) -> None:
    conn.execute(f"CREATE TABLE app.texts (k text, v int); ALTER TABLE app.texts OWNER TO {roles['operator']}")
    conn.execute("INSERT INTO app.texts VALUES ('a', 1), ('b', 2)")
    mv = incremental(
        query="SELECT k, sum(v) AS total FROM app.texts GROUP BY k",
        indexes=[],
        incremental={"keyColumns": ["k"], "sources": [{"table": "app.texts", "columns": ["k"]}]},
    )
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, mv)
        record_build(operator, mv)
        # Every edge a text key can take is written without a failure.
        edges = ["", " ", "é" * 100, "x" * 9600, "'; DROP TABLE app.src; --", "\\", "NULL", incompressible(9600)]
        for value in edges:
            conn.execute("INSERT INTO app.texts VALUES (%s, 7)", (value,))
        conn.execute("INSERT INTO app.texts VALUES (NULL, 7)")
        result = refresh(operator, mv)
        assert result.result == "success" and result.mode == "Swap", result
        conn.execute("INSERT INTO app.texts VALUES (%s, 8)", (incompressible(9600),))
        result = refresh(operator, mv)
    assert (result.result, result.mode) == ("success", "Swap"), result
    assert "too large for an incremental refresh" in result.reason, result.reason
    stored = conn.execute("SELECT count(*) FROM reports.inc").fetchone()
    assert stored == conn.execute("SELECT count(DISTINCT k) + 1 FROM app.texts").fetchone()  # NULL is a group


def test_a_query_the_key_filter_cannot_rewrite_is_refused_and_verify_does_not_say_it_matches(
    conn: Connection, roles: Roles
) -> None:
    """schema.table.column names the relation the filter replaces with a subquery: the refresh could never
    compile it. Apply refuses it; verify of such a declaration says it cannot verify, never "matches"."""
    qualified = incremental(query="SELECT app.src.k, sum(app.src.v) AS total FROM app.src GROUP BY app.src.k")
    errors = _refused(roles, qualified)
    assert "the key filter cannot be injected here" in errors.get("spec.query", ""), errors
    assert "never schema.table.column" in errors["spec.query"]
    _nothing_created(conn, qualified)
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, incremental())
        record_build(operator, incremental())
        result = verify.compare(operator, qualified, engine.settings_for(qualified))
        assert not result.matches and "cannot verify" in result.inconclusive, result
        assert verify.compare(operator, incremental(), engine.settings_for(qualified)).matches


def test_a_decoy_trigger_with_the_capture_triggers_name_is_refused_naming_it(conn: Connection, roles: Roles) -> None:
    mv = incremental()
    decoy = capture.trigger_names(mv)["UPDATE"]
    conn.execute(
        "CREATE FUNCTION public.decoy() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO public.ran VALUES (current_user, 'decoy'); RETURN NULL; END $$"
    )
    conn.execute(f"CREATE TRIGGER {decoy} AFTER UPDATE ON app.src FOR EACH STATEMENT EXECUTE FUNCTION public.decoy()")
    errors = _refused(roles, mv)
    message = errors.get("spec.incremental.sources[0].table", "")
    assert f"trigger {decoy} calls public.decoy" in message and "drop or rename it" in message, errors
    assert conn.execute("SELECT to_regclass('reports.inc')").fetchone() == (None,)
    conn.execute(f"DROP TRIGGER {decoy} ON app.src")
    with engine.connect(roles.login("operator")) as operator:
        assert engine.apply(operator, mv).built


def test_with_run_as_role_the_live_view_is_the_teams_and_its_function_runs_for_its_readers_only(
    conn: Connection, roles: Roles
) -> None:
    """The live view, its function and row shape belong to the team (runAsRole), not the operator; a role
    not granted on the view cannot call the SECURITY DEFINER function to read as the team; a look-alike
    function planted under its name with the marker copied is refused, naming its owner."""
    live_spec = {
        "keyColumns": ["k"],
        "sources": [{"table": "app.src", "columns": ["k"]}],
        "liveView": True,
    }
    mv = incremental(runAsRole=roles["team"], incremental=live_spec, grants=[{"role": roles["member"]}])
    with psycopg.connect(roles.login("attacker"), autocommit=True) as attacker:
        attacker.execute("CREATE FUNCTION reports.inc_live_rows(int) RETURNS SETOF int LANGUAGE sql AS 'SELECT 1'")
        attacker.execute(
            sql.SQL("COMMENT ON FUNCTION reports.inc_live_rows(int) IS {}").format(
                sql.Literal(Marker(mv.owner, "live", "copied", {"part": "rows"}).to_comment())
            )
        )
    with engine.connect(roles.login("operator")) as operator, pytest.raises(UnmanagedObjectError) as caught:
        engine.apply(operator, mv)
    assert "inc_live_rows" in str(caught.value) and roles["attacker"] in str(caught.value)
    assert conn.execute("SELECT to_regclass('reports.inc')").fetchone() == (None,), "nothing half-created"
    conn.execute("DROP FUNCTION reports.inc_live_rows(int)")
    with engine.connect(roles.login("operator")) as operator:
        engine.apply(operator, mv)
    found = conn.execute(
        "SELECT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid IN "
        "('reports.inc_live'::regclass, 'reports.inc_live_shape'::regclass) "
        "UNION ALL SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE proname = 'inc_live_rows'"
    ).fetchall()
    assert found == [(roles["team"],)] * 3
    conn.execute("UPDATE app.src SET v = v + 1000 WHERE k = 1")  # pending until the next refresh
    expected = conn.execute("SELECT sum(v) FROM app.src WHERE k = 1").fetchone()
    with psycopg.connect(roles.login("member"), autocommit=True) as member:
        assert member.execute("SELECT total FROM reports.inc_live WHERE k = 1").fetchone() == expected
    with (
        psycopg.connect(roles.login("attacker"), autocommit=True) as attacker,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        attacker.execute("SELECT * FROM reports.inc_live_rows(1)")
    assert ran(conn) == []
