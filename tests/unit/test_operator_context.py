"""Connection pools are shared per database and closed when no resource uses them."""

from __future__ import annotations

from matview.k8s.context import OperatorContext

A = "postgresql://u@127.0.0.1:1/a?connect_timeout=1"
B = "postgresql://u@127.0.0.1:1/b?connect_timeout=1"


def test_pools_are_shared_and_closed_when_unused() -> None:
    context = OperatorContext()
    try:
        context.bind("ns/one", A)
        context.bind("ns/two", A)
        shared = context.refresher.pool(A)
        assert context.refresher.pool(A) is shared and context.pools_open() == 1
        context.bind("ns/one", B)  # one moves to another database; two still uses A
        context.refresher.pool(B)
        assert context.pools_open() == 2 and not shared.closed
        context.release("ns/two")  # nobody uses A any more
        assert shared.closed and context.pools_open() == 1
        context.release("ns/one")
        assert context.pools_open() == 0
    finally:
        context.refresher.close()


def test_operator_settings_name_the_variable_of_a_bad_value() -> None:
    import pytest

    from matview.k8s.settings import SettingsError, config_from_environment

    config = config_from_environment({"MATVIEW_RETRY_SECONDS": "2.5", "MATVIEW_MAX_CONCURRENT": "4"})
    assert (config.retry_seconds, config.max_concurrent_per_database) == (2.5, 4)
    for variable, value in [
        ("MATVIEW_RETRY_SECONDS", "soon"),
        ("MATVIEW_MAX_CONCURRENT", "0"),
        ("MATVIEW_DRIFT_CHECK_SECONDS", "nan"),
        ("MATVIEW_METRICS_PORT", "80.5"),
    ]:
        with pytest.raises(SettingsError, match=variable):
            config_from_environment({variable: value})
