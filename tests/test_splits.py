"""Held-out splits: by identity, from the dataset's own split folders first, stable as data grows."""

from __future__ import annotations

from collections import Counter

from pipeline.config import SplitConfig
from pipeline.sources.base import ClipRecord
from pipeline.splits import assign_splits


def record(identity: str, clip: str, hint: str | None = None, dataset: str = "celebvhq") -> ClipRecord:
    return ClipRecord(clip, dataset, identity, "s", "video", 25.0, 40, 64, 64, split_hint=hint)


def test_no_identity_is_in_two_splits_and_shares_follow_the_config() -> None:
    records = [record(f"id{i}", f"id{i}_{k}") for i in range(2000) for k in range(3)]
    splits = assign_splits(records, SplitConfig(val=0.1, test=0.05))
    by_identity: dict[str, set[str]] = {}
    for r in records:
        by_identity.setdefault(r.identity, set()).add(splits[(r.dataset, r.clip_id)])
    assert all(len(s) == 1 for s in by_identity.values())
    shares = Counter(next(iter(s)) for s in by_identity.values())
    assert abs(shares["val"] / 2000 - 0.1) < 0.025 and abs(shares["test"] / 2000 - 0.05) < 0.02


def test_the_draw_is_stable_when_identities_are_added() -> None:
    config = SplitConfig(val=0.2, test=0.2)
    small = [record(f"id{i}", f"c{i}") for i in range(50)]
    large = small + [record(f"new{i}", f"n{i}") for i in range(500)]
    first, second = assign_splits(small, config), assign_splits(large, config)
    assert all(second[key] == split for key, split in first.items())
    assert assign_splits(small, SplitConfig(val=0.2, test=0.2, seed=1)) != first  # the seed matters


def test_dataset_split_folders_decide_first() -> None:
    config = SplitConfig(val=0.3, test=0.4)  # train-folder identities: val with 0.3 / (1 - 0.4)
    records = [record(f"tr{i}", f"tr{i}", "train", "vfhq") for i in range(200)]
    records += [record(f"te{i}", f"te{i}", "test", "vfhq") for i in range(20)]
    # an identity with a clip in the test folder is test everywhere: no leak into training
    records += [record("both", "both_a", "train", "vfhq"), record("both", "both_b", "test", "vfhq")]
    splits = assign_splits(records, config)
    assert {splits[("vfhq", f"te{i}")] for i in range(20)} == {"test"}
    assert {splits[("vfhq", f"tr{i}")] for i in range(200)} == {"train", "val"}  # never test
    assert splits[("vfhq", "both_a")] == splits[("vfhq", "both_b")] == "test"
