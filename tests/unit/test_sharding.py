"""Shard ownership: every view has exactly one owner, shares are even, a count change moves few views, and
each shard's label selector names exactly its buckets."""

from __future__ import annotations

from collections import Counter

from matview.constants import BUCKET_LABEL
from matview.k8s.labeler import patch_for
from matview.k8s.sharding import (
    BUCKETS,
    buckets_of_shard,
    jump_hash,
    label_value,
    mislabelled,
    owns,
    selector,
    shard_of,
)
from matview.refresh.schedule import spread_offset

NAMES = [(f"team-{i % 37}", f"view-{i}") for i in range(20_000)]


def test_every_view_has_exactly_one_owner() -> None:
    for count in (1, 2, 3, 5):
        for namespace, name in NAMES[:2000]:
            assert sum(owns(index, count, namespace, name) for index in range(count)) == 1


def test_shares_are_even() -> None:
    for count in (2, 3, 4):
        shares = Counter(shard_of(namespace, name, count) for namespace, name in NAMES)
        assert set(shares) == set(range(count))
        assert max(shares.values()) / min(shares.values()) < 1.1, (count, shares)


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


def test_each_shard_selects_its_buckets_on_the_server_and_the_selectors_cover_every_bucket_once() -> None:
    for count in (2, 3, 4, 5):
        chosen = [set(buckets_of_shard(index, count)) for index in range(count)]
        assert sum(len(c) for c in chosen) == BUCKETS and set().union(*chosen) == set(range(BUCKETS))
        for namespace, name in NAMES[:500]:
            index = shard_of(namespace, name, count)
            label = label_value(namespace, name)
            text = selector(index, count)
            assert text is not None and text.startswith(f"{BUCKET_LABEL} in (") and text.endswith(")")
            assert label in text[len(f"{BUCKET_LABEL} in (") : -1].split(",")
    assert selector(0, 1) is None, "one replica watches every view, labelled or not"


def test_a_label_is_mislabelled_only_when_it_names_another_bucket() -> None:
    namespace, name = NAMES[0]
    right = label_value(namespace, name)
    wrong = str((int(right) + 1) % BUCKETS)
    assert not mislabelled({}, namespace, name) and not mislabelled(None, namespace, name)
    assert not mislabelled({BUCKET_LABEL: right, "team": "x"}, namespace, name)
    assert mislabelled({BUCKET_LABEL: wrong}, namespace, name)
    assert mislabelled({BUCKET_LABEL: "../0"}, namespace, name)
    body = {"metadata": {"namespace": namespace, "name": name, "labels": {"team": "x"}}}
    assert patch_for(body) == {"metadata": {"labels": {BUCKET_LABEL: right}}}
    assert patch_for({"metadata": {**body["metadata"], "labels": {BUCKET_LABEL: right}}}) is None
    assert patch_for({"metadata": {**body["metadata"], "labels": {BUCKET_LABEL: wrong}}}) is not None
    assert patch_for({"metadata": {}}) is None
