"""Shard ownership: every view has exactly one owner, shares are even, and a count change moves few views."""

from __future__ import annotations

from collections import Counter

from matview.k8s.sharding import jump_hash, owns, shard_of
from matview.refresh.schedule import spread_offset

NAMES = [(f"team-{i % 37}", f"view-{i}") for i in range(20_000)]


def test_every_view_has_exactly_one_owner() -> None:
    for count in (1, 2, 3, 5):
        for namespace, name in NAMES[:2000]:
            assert sum(owns(index, count, namespace, name) for index in range(count)) == 1


def test_shares_are_even() -> None:
    shares = Counter(shard_of(namespace, name, 4) for namespace, name in NAMES)
    assert set(shares) == {0, 1, 2, 3}
    assert max(shares.values()) / min(shares.values()) < 1.1


def test_growing_from_n_to_n_plus_1_moves_only_the_new_shards_share() -> None:
    for count in (1, 2, 3, 4):
        moved = [(ns, n) for ns, n in NAMES if shard_of(ns, n, count) != shard_of(ns, n, count + 1)]
        assert all(shard_of(ns, n, count + 1) == count for ns, n in moved)  # only ever to the new shard
        assert abs(len(moved) / len(NAMES) - 1 / (count + 1)) < 0.02


def test_jump_hash_stays_in_range() -> None:
    assert {jump_hash(key, 7) for key in range(5000)} == set(range(7))
    assert jump_hash(2**64 - 1, 1) == 0


def test_drift_checks_spread_evenly_over_their_period() -> None:
    offsets = [spread_offset(f"{ns}/{n}", 300.0) for ns, n in NAMES]
    assert all(0 <= o < 300 for o in offsets)
    per_ten_seconds = Counter(int(o // 10) for o in offsets)
    assert len(per_ten_seconds) == 30
    assert max(per_ten_seconds.values()) < 1.25 * len(NAMES) / 30
