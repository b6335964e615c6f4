"""The scheduler's timer heap against a plain dict model, under random operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from matview.refresh.queue import DueQueue

operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 20), st.floats(0, 100, allow_nan=False)),
        st.tuples(st.just("discard"), st.integers(0, 20), st.just(0.0)),
        st.tuples(st.just("pop"), st.just(0), st.floats(0, 100, allow_nan=False)),
        st.tuples(st.just("count"), st.just(0), st.floats(0, 100, allow_nan=False)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_the_heap_behaves_like_a_dict_of_due_times(ops: list[tuple[str, int, float]]) -> None:
    queue: DueQueue[int] = DueQueue()
    model: dict[int, float] = {}
    for op, key, value in ops:
        if op == "set":
            queue.set(key, value)
            model[key] = value
        elif op == "discard":
            queue.discard(key)
            model.pop(key, None)
        elif op == "count":
            assert queue.count_due(value) == sum(1 for due in model.values() if due <= value)
        else:
            expected = {k for k, due in model.items() if due <= value}
            taken = queue.pop_due(value)
            assert set(taken) == expected and len(taken) == len(expected)
            assert [model[k] for k in taken] == sorted(model[k] for k in taken)  # earliest first
            for k in taken:
                del model[k]
        assert len(queue) == len(model)
        assert queue.next_at() == (min(model.values()) if model else None)
        assert all(queue.at(k) == due for k, due in model.items())


def test_stale_entries_do_not_pile_up() -> None:
    queue: DueQueue[str] = DueQueue()
    for round_ in range(10_000):
        queue.set("only", float(round_))
    assert len(queue._heap) <= 2 * len(queue) + 64
    assert queue.pop_due(1e9, limit=5) == ["only"]
    assert queue.next_at() is None
