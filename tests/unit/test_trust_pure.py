"""Pure parts of issue #19: failure classification, the CLI's defaults for what it exposes."""

from __future__ import annotations

import psycopg

from matview.cli import build_parser
from matview.refresh import policy


def test_a_key_too_large_for_an_index_is_not_a_connection_failure() -> None:
    """psycopg raises OperationalError for server errors of classes 53-58; only a missing answer, 08 and
    57P are the connection's fault."""
    too_large = psycopg.errors.lookup("54000")("index row requires 9616 bytes, maximum size is 8191")
    assert isinstance(too_large, psycopg.OperationalError)
    assert policy.classify(too_large) == "other"
    assert policy.classify(psycopg.OperationalError("connection refused")) == "connection"
    assert policy.classify(psycopg.errors.lookup("57P01")("terminating connection")) == "connection"
    assert policy.classify(psycopg.errors.lookup("08006")("connection failure")) == "connection"


def test_matview_run_serves_metrics_on_this_machine_only_unless_told() -> None:
    args = build_parser().parse_args(["run", "specs/"])
    assert args.metrics_address == "127.0.0.1"
    everywhere = "0.0.0.0"  # noqa: S104 - what a user passes to be scraped from elsewhere
    assert build_parser().parse_args(["run", "--metrics-address", everywhere, "specs/"]).metrics_address == everywhere


def test_no_command_allows_a_superuser_run_as_role_unless_told() -> None:
    for command in (["plan", "f.yaml"], ["apply", "f.yaml"], ["run", "d/"], ["operator", "-A"]):
        assert build_parser().parse_args(command).allow_superuser_run_as_role is False
        flagged = build_parser().parse_args([command[0], "--allow-superuser-run-as-role", *command[1:]])
        assert flagged.allow_superuser_run_as_role is True
