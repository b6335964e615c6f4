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
