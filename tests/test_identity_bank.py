"""The identity bank on the tiny profile: one ArcFace embedding per identity, deterministic source draws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from swap_helpers import make_manifest

from pipeline.identity_bank import BANK_COLUMNS, build_identity_bank, choose_source_identity
from pipeline.stages.face_swap import ARCFACE, INSWAPPER, SCRFD
from pipeline.weights import ensure_tiny_weights

RESOLUTION = 128


@pytest.fixture(scope="session")
def bank_weights(tmp_path_factory):
    return ensure_tiny_weights(tmp_path_factory.mktemp("swap_weights"), [SCRFD, ARCFACE, INSWAPPER])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # Two clips of person00 (the bank uses the first by key), a box-less CelebV-HQ-like clip, and a
    # black clip in which no face can be found.
    clips = [
        dict(clip_id="a0", identity=0, num_frames=6),
        dict(clip_id="a1", identity=0, num_frames=6),
        dict(clip_id="b0", identity=1, num_frames=6),
        dict(clip_id="c0", identity=2, num_frames=6, with_boxes=False),
        dict(clip_id="dark", identity=3, num_frames=6, black=True),
    ]
    return make_manifest(tmp_path_factory.mktemp("bank_clips"), clips)


@pytest.fixture(scope="module")
def bank_and_path(manifest, bank_weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "identities.parquet"
    return build_identity_bank(manifest, RESOLUTION, 1.8, bank_weights, path, device="cpu"), path


def test_one_row_per_identity_with_unit_embeddings(bank_and_path, manifest):
    bank, path = bank_and_path
    assert list(bank.columns) == BANK_COLUMNS
    assert sorted(bank["identity"]) == sorted(manifest["identity"].unique())
    assert bank["identity"].is_unique
    on_disk = pd.read_parquet(path)
    assert sorted(on_disk["identity"]) == sorted(bank["identity"])
    usable = bank[bank["frames_used"] > 0]
    assert sorted(usable["identity"]) == ["person00", "person01", "person02"]
    for row in usable.itertuples():
        embedding, normed = np.asarray(row.embedding), np.asarray(row.normed)
        assert embedding.shape == (512,) and normed.shape == (512,)
        assert np.isclose(np.linalg.norm(normed), 1.0, atol=1e-5)
        assert np.allclose(normed, embedding / np.linalg.norm(embedding), atol=1e-5)
        assert row.arcface_weights == "tiny"
    assert bank.set_index("identity").loc["person00", "clip_id"] == "a0"  # the first segment by key
    assert bank.set_index("identity").loc["person02", "dataset"] == "demo-celebvhq"
    # Different people get different embeddings.
    normed = np.stack([np.asarray(v) for v in usable["normed"]])
    assert np.abs(normed @ normed.T - np.eye(len(normed))).max() > 1e-3


def test_identity_without_face_is_recorded_not_embedded(bank_and_path):
    bank, _ = bank_and_path
    dark = bank.set_index("identity").loc["person03"]
    assert dark["frames_used"] == 0
    assert "no face" in dark["skip_reason"]
    assert len(dark["embedding"]) == 0


def test_bank_is_deterministic_and_reused(bank_and_path, manifest, bank_weights, tmp_path):
    bank, path = bank_and_path
    again = build_identity_bank(manifest, RESOLUTION, 1.8, bank_weights, tmp_path / "identities.parquet")
    for a, b in zip(bank["normed"], again["normed"], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # Covered: returned as is, the file is not rewritten.
    stamp = path.stat().st_mtime_ns
    reused = build_identity_bank(manifest, RESOLUTION, 1.8, bank_weights, path)
    assert path.stat().st_mtime_ns == stamp
    assert sorted(reused["identity"]) == sorted(bank["identity"])


def test_bank_adds_only_new_identities(bank_and_path, manifest, bank_weights, tmp_path):
    bank, path = bank_and_path
    copy = tmp_path / "identities.parquet"
    copy.write_bytes(path.read_bytes())
    extra = make_manifest(tmp_path / "clips", [dict(clip_id="e0", identity=4, num_frames=6)])
    grown = build_identity_bank(pd.concat([manifest, extra]), RESOLUTION, 1.8, bank_weights, copy)
    assert sorted(grown["identity"]) == sorted([*bank["identity"], "person04"])
    old = grown.set_index("identity").loc["person00", "normed"]
    assert np.array_equal(np.asarray(old), np.asarray(bank.set_index("identity").loc["person00", "normed"]))


def test_choose_source_identity_is_deterministic_and_never_own():
    identities = [f"id{i}" for i in range(7)]
    picks = {}
    for n in range(400):
        own = identities[n % 7]
        pick = choose_source_identity("vfhq", f"clip{n}", own, identities, seed=0)
        assert pick != own and pick in identities
        assert pick == choose_source_identity("vfhq", f"clip{n}", own, list(reversed(identities)), seed=0)
        picks[n] = pick
    assert len(set(picks.values())) == 7  # spread over the bank
    other_seed = [choose_source_identity("vfhq", f"clip{n}", "none", identities, seed=1) for n in range(400)]
    assert other_seed != [
        choose_source_identity("vfhq", f"clip{n}", "none", identities, 0) for n in range(400)
    ]


def test_choose_source_identity_needs_another_identity():
    with pytest.raises(ValueError, match="no identity other than 'solo'"):
        choose_source_identity("vfhq", "clip", "solo", ["solo"], seed=0)
    with pytest.raises(ValueError, match="no identity other than"):
        choose_source_identity("vfhq", "clip", "solo", [], seed=0)
    assert choose_source_identity("vfhq", "clip", "solo", ["solo", "other"], seed=0) == "other"


def _old_modulo_draw(clip_id: str, own: str, identities: list[str]) -> str:
    """The draw before rendezvous hashing (sha256 % len(candidates)), kept here as the baseline."""
    import hashlib

    candidates = sorted(set(identities) - {own})
    digest = hashlib.sha256(f"swap-source\0vfhq\0{clip_id}\0{0}".encode()).digest()
    return candidates[int.from_bytes(digest[:8], "big") % len(candidates)]


def test_a_new_identity_moves_only_the_clips_that_pick_it():
    identities = [f"id{i:02d}" for i in range(50)]
    grown = [*identities, "newcomer"]
    clips = [(f"clip{n}", identities[n % 50]) for n in range(2000)]
    before = [choose_source_identity("vfhq", c, own, identities, seed=0) for c, own in clips]
    after = [choose_source_identity("vfhq", c, own, grown, seed=0) for c, own in clips]
    moved = [new for old, new in zip(before, after, strict=True) if old != new]
    assert moved and set(moved) == {"newcomer"}  # every clip that moved now picks the new identity
    assert len(moved) < 2 * 2000 / 50  # ~1/51 of the clips, as rendezvous hashing promises
    old_moved = sum(
        _old_modulo_draw(c, own, identities) != _old_modulo_draw(c, own, grown) for c, own in clips
    )
    assert old_moved > 0.9 * 2000  # the old scheme reassigned nearly every clip
    # Removing an identity moves only the clips that had drawn it.
    shrunk = [i for i in identities if i != "id07"]
    again = [choose_source_identity("vfhq", c, own, shrunk, seed=0) for c, own in clips]
    assert all(old == new or old == "id07" for old, new in zip(before, again, strict=True))


def test_a_too_similar_candidate_is_never_chosen():
    rng = np.random.default_rng(0)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    embeddings = {f"id{i}": unit(rng.normal(size=512)) for i in range(6)}
    # "twin" is the target's celebrity under another video id: cosine ~0.9 to the target.
    embeddings["twin"] = unit(embeddings["id0"] + 0.5 * unit(rng.normal(size=512)))
    identities = list(embeddings)
    free = [choose_source_identity("celebvhq", f"v{n}", "id0", identities, 0) for n in range(300)]
    assert "twin" in free  # by label alone the twin is drawn
    guarded = [
        choose_source_identity("celebvhq", f"v{n}", "id0", identities, 0, embeddings, max_cosine=0.3)
        for n in range(300)
    ]
    assert "twin" not in guarded and "id0" not in guarded
    # Candidates that pass keep their rendezvous draw: only the twin's clips moved.
    assert all(a == b for a, b in zip(free, guarded, strict=True) if a != "twin")
    with pytest.raises(ValueError, match="max_source_cosine=0.3"):
        choose_source_identity("celebvhq", "v", "id0", ["id0", "twin"], 0, embeddings, max_cosine=0.3)
    # An identity the bank could not embed is compared by label only.
    assert (
        choose_source_identity("celebvhq", "v", "nobody", ["twin"], 0, embeddings, max_cosine=0.3) == "twin"
    )


def test_the_ray_data_pass_gives_the_driver_side_bank(bank_and_path, manifest, bank_weights, tmp_path):
    """The bank embedded on a Ray Data actor pool (two actors, identities in batches of two) equals the
    one computed on the driver, row for row, skipped identity included."""
    import ray

    from pipeline.dag import init_ray
    from pipeline.identity_bank import BankPool

    bank, _ = bank_and_path
    init_ray(2)
    try:
        pool = BankPool(size=2, num_cpus=0.5, batch_size=2)
        pooled = build_identity_bank(
            manifest, RESOLUTION, 1.8, bank_weights, tmp_path / "identities.parquet", device="cpu", pool=pool
        )
    finally:
        ray.shutdown()
    assert list(pooled.columns) == BANK_COLUMNS
    columns = ["identity", "dataset", "clip_id", "frames_used", "skip_reason", "arcface_weights"]
    pd.testing.assert_frame_equal(pooled[columns], bank[columns])
    for column in ("embedding", "normed"):
        for a, b in zip(pooled[column], bank[column], strict=True):
            assert np.asarray(a).dtype == np.float32 and np.array_equal(np.asarray(a), np.asarray(b))
    assert (pooled["frames_used"] > 0).sum() == 3


def test_identities_whose_batch_was_lost_are_embedded_by_a_second_pass(
    bank_and_path, manifest, bank_weights, tmp_path, monkeypatch
):
    """No retries: the actor killed on the first try loses its batch; the second pass (on a pool that
    starts at one actor) embeds it, and the bank equals the driver-side one."""
    import crash_stage
    import ray

    from pipeline import identity_bank
    from pipeline.dag import init_ray
    from pipeline.identity_bank import BankPool

    bank, _ = bank_and_path
    attempts = tmp_path / "attempts"
    ray.cloudpickle.register_pickle_by_value(crash_stage)  # workers cannot import tests/
    victim = str(bank["identity"][0])
    monkeypatch.setattr(identity_bank, "IdentityEmbedder", crash_stage.crashing_embedder(victim, attempts))
    init_ray(2)
    try:
        pool = BankPool(size=2, num_cpus=0.5, batch_size=2, max_task_retries=0)
        pooled = build_identity_bank(
            manifest, RESOLUTION, 1.8, bank_weights, tmp_path / "identities.parquet", device="cpu", pool=pool
        )
        tries = len(attempts.read_text().splitlines())
        attempts.unlink()
        with pytest.raises(RuntimeError, match=r"no row for \d+ identities in 1 passes"):
            build_identity_bank(
                manifest, RESOLUTION, 1.8, bank_weights, tmp_path / "none.parquet", device="cpu",
                pool=dataclasses.replace(pool, lost_row_passes=0),
            )  # fmt: skip
    finally:
        ray.shutdown()
    assert tries == 2  # killed once, embedded by the second pass
    columns = ["identity", "dataset", "clip_id", "frames_used", "skip_reason", "arcface_weights"]
    pd.testing.assert_frame_equal(pooled[columns], bank[columns])
    for a, b in zip(pooled["normed"], bank["normed"], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
