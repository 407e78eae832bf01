"""The identity bank: one ArcFace embedding per identity of the manifest (`identities.parquet`), built
before the face-swap stage, and the deterministic choice of each clip's source identity.

Per identity, the bank decodes the head (`window_frames`) of the identity's first segment by key
with the DAG's own `decode_segment`, finds the face in a few evenly spaced frames the way the swap
stage does (`find_face`: SCRFD, guided by the dataset's boxes where there are any) and averages
the ArcFace embeddings. An identity whose segments show no face is kept as a row with `frames_used` 0 and a
`skip_reason`, so a rerun does not retry it and the swap stage never draws it.

The embeddings are a Ray Data pass on an actor pool (`BankPool`: each actor loads SCRFD + ArcFace once
and embeds a batch of identities), so CelebV-HQ's ~15 k identities spread over the cluster like any other
stage; without a pool they are computed on the driver (small runs, tests) by the same `IdentityEmbedder`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.faces import (
    ARCFACE,
    find_face,
    load_face_analysis,
    onnx_providers,
    parse_boxes,
    weight_paths,
    weights_id,
)
from pipeline.resources import Demand, require
from pipeline.segment import decode_segment
from pipeline.writer import atomic_write_parquet

log = logging.getLogger(__name__)

BANK_COLUMNS = [
    "identity",
    "dataset",
    "clip_id",  # the clip the embedding came from ("" when skipped)
    "frames_used",  # frames whose embeddings were averaged; 0 = skipped
    "skip_reason",
    "arcface_weights",  # weights id of the ArcFace model ("tiny" or sha256 prefix)
    "embedding",  # float32 [512]: mean ArcFace embedding (empty when skipped)
    "normed",  # float32 [512]: the same, unit length (what INSwapper reads)
]


def load_identity_bank(path: Path | str) -> pd.DataFrame:
    # a local path or a URI (s3://...): pipeline/storage.py
    if not storage.is_file(path):
        raise FileNotFoundError(f"identity bank {path} does not exist; build it with build_identity_bank")
    bank = storage.read_parquet(path)
    missing = sorted(set(BANK_COLUMNS) - set(bank.columns))
    if missing:
        raise ValueError(f"identity bank {path} lacks columns {missing}")
    return bank


def rendezvous_score(dataset: str, clip_id: str, seed: int, candidate: str) -> int:
    """Highest-random-weight hash of (clip, candidate): salted so the draw is independent of the
    bucket hash, which also hashes the clip id and seed."""
    text = f"swap-source\0{dataset}\0{clip_id}\0{seed}\0{candidate}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def choose_source_identity(
    dataset: str,
    clip_id: str,
    own_identity: str,
    bank_identities: list[str],
    seed: int,
    embeddings: Mapping[str, np.ndarray] | None = None,
    max_cosine: float = 1.0,
) -> str:
    """The swap source of one clip: of the other identities, the one maximising a hash of (clip,
    candidate) (rendezvous hashing), so a bank that gains or loses an identity only moves the clips
    that now pick (or had picked) that identity. Every segment of a clip gets the same source.

    Labels are not people (CelebV-HQ labels are video ids; one celebrity has many): with `embeddings`
    (normed ArcFace per identity) holding the clip's own identity, candidates whose cosine to it is
    `max_cosine` or more are never drawn."""
    others = sorted(set(bank_identities) - {own_identity})
    if not others:
        raise ValueError(
            f"the identity bank has no identity other than {own_identity!r} "
            f"({len(set(bank_identities))} usable identities): cannot pick a swap source"
        )
    candidates = others
    target = None if embeddings is None else embeddings.get(own_identity)
    if target is not None and max_cosine < 1.0:
        candidates = [c for c in others if source_cosine(embeddings[c], target) < max_cosine]
        if not candidates:
            raise ValueError(
                f"every other identity of the bank ({len(others)}) has an ArcFace cosine >= "
                f"max_source_cosine={max_cosine} to {own_identity!r}: cannot pick a swap source"
            )
    return max(candidates, key=lambda c: (rendezvous_score(dataset, clip_id, seed, c), c))


def source_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two ArcFace embeddings (the bank's `normed` are unit length; normalised again anyway)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def _head_of_segment(row: dict, window_frames: int) -> dict:
    """The manifest row cut to its first `window_frames` frames: decoding a whole 240-frame segment
    for three embeddings would dominate the bank's cost on real data."""
    row = dict(row)
    start = int(row["frame_start"])
    stop = min(int(row["frame_stop"]), start + window_frames)
    if row["face_boxes"]:
        row["face_boxes"] = json.dumps(json.loads(str(row["face_boxes"]))[: stop - start])
    row["frame_stop"] = stop
    return row


def _embed_identity(
    rows: pd.DataFrame,
    app,
    resolution: int,
    crop_scale: float,
    frames_per_identity: int,
    window_frames: int,
    min_iou: float,
) -> dict:
    """Try the identity's segments in key order until one yields faces; average their embeddings."""
    recognizer = app.models["recognition"]
    reasons = []
    for row in rows.to_dict("records"):
        try:
            decoded = decode_segment(_head_of_segment(row, window_frames), resolution, crop_scale)
        except Exception as exc:  # noqa: BLE001 - a bad clip is recorded and the next one is tried
            reasons.append(f"{row['key']}: decode failed ({type(exc).__name__}: {exc})")
            continue
        frames = decoded["frames"]
        boxes = parse_boxes(decoded, len(frames))
        picks = np.unique(np.linspace(0, len(frames) - 1, frames_per_identity).round().astype(int))
        embeddings = []
        for t in picks:
            bgr = np.ascontiguousarray(frames[t][..., ::-1])
            face = find_face(app.det_model, bgr, None if boxes is None else boxes[t], min_iou)
            if face is not None:
                embeddings.append(recognizer.get(bgr, face))
        if not embeddings:
            reasons.append(f"{row['key']}: no face in frames {picks.tolist()}")
            continue
        mean = np.mean(embeddings, axis=0).astype(np.float32)
        return {
            "clip_id": str(row["clip_id"]),
            "frames_used": len(embeddings),
            "skip_reason": "",
            "embedding": mean,
            "normed": (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32),
        }
    return {
        "clip_id": "",
        "frames_used": 0,
        "skip_reason": "; ".join(reasons)[:2000],
        "embedding": np.zeros(0, np.float32),
        "normed": np.zeros(0, np.float32),
    }


@dataclasses.dataclass(frozen=True)
class BankPool:
    """The Ray Data actor pool that embeds the identities (the swap stage's resources, in the build)."""

    size: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 8  # identities per actor call
    max_task_retries: int = 2
    lost_row_passes: int = 1  # passes again over identities whose batch was lost (BuildConfig's)
    stage: str = "swap"  # whose resources these are, for the messages
    resource_wait_s: float = 600.0  # on a cluster: how long to wait for them (BuildConfig.resource_wait_s)

    def demand(self, elastic: bool = False) -> Demand:
        """The pass's reservation, checked before it starts (pipeline/resources.py); `elastic`: a pool
        that starts at one actor (pipeline.dag.pool_strategy)."""
        keys = f"the {self.stage} stage's num_cpus / num_gpus / pool_size"
        size = 1 if elastic else self.size
        total = {"CPU": round(self.num_cpus * size, 6), "GPU": round(self.num_gpus * size, 6)}
        return Demand(
            what=f"the identity-bank pass (stage {self.stage}: {size} x ({self.num_cpus:g} CPU + "
            f"{self.num_gpus:g} GPU))",
            total=total,
            per_actor={"CPU": self.num_cpus, "GPU": self.num_gpus},
            fixes={
                "CPU": f"lower {keys}, or num_cpus={math.ceil(total['CPU'])} (local Ray's CPU count)",
                "GPU": f"run where {total['GPU']:g} GPUs are, or set num_gpus: 0 for the {self.stage} stage in "
                "a --config overlay or a stages=[...] override (the list is replaced whole)",
            },
        )


class IdentityEmbedder:
    """SCRFD + ArcFace loaded once; embeds whole identities. A Ray Data actor (`__call__` on a batch of
    identities) or a plain object on the driver (`embed`)."""

    def __init__(
        self,
        weights_dir: str,
        resolution: int,
        crop_scale: float,
        frames_per_identity: int,
        window_frames: int,
        min_iou: float,
        det_size: int,
        det_thresh: float,
        device: str,
        gpu_share: float = 0.0,
    ) -> None:
        providers = onnx_providers(device, gpu_share)
        self.app = load_face_analysis(
            weights_dir, ["detection", "recognition"], providers, det_size, det_thresh
        )
        self.settings = (resolution, crop_scale, frames_per_identity, window_frames, min_iou)

    def embed(self, segments: pd.DataFrame) -> dict:
        return _embed_identity(segments, self.app, *self.settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = [self.embed(pickle.loads(blob)) for blob in batch["segments"]]
        return {
            "identity": batch["identity"],
            "clip_id": np.array([e["clip_id"] for e in entries]),
            "frames_used": np.array([e["frames_used"] for e in entries], np.int64),
            "skip_reason": np.array([e["skip_reason"] for e in entries]),
            # bytes: a skipped identity has an empty embedding, and Arrow wants one shape per column
            "embedding": np.array([e["embedding"].tobytes() for e in entries], dtype=object),
        }


def _embed_on_ray(jobs: list[tuple[str, pd.DataFrame]], embedder: dict, pool: BankPool) -> dict[str, dict]:
    """{identity: entry} from Ray Data passes over the identities (Ray must be initialised). Identities
    whose batch was lost (its actor died on every try: a lost node, an OOM kill) are embedded again by up
    to `pool.lost_row_passes` more passes on a pool that starts at one actor; any still missing is an error."""
    entries: dict[str, dict] = {}
    left = jobs
    passes = pool.lost_row_passes + 1
    for number in range(1, passes + 1):
        if number > 1:
            log.warning(
                "%d identities lost their batch (its actor died: a lost node, a crash, an OOM kill); "
                "embedding them again, pass %d of %d",
                len(left), number, passes,
            )  # fmt: skip
        entries.update(_embed_pass(left, embedder, pool, elastic=number > 1))
        left = [(identity, segments) for identity, segments in left if identity not in entries]
        if not left:
            return entries
    missing = [identity for identity, _ in left]
    raise RuntimeError(
        f"the identity-bank pass returned no row for {len(missing)} identities in {passes} passes: "
        f"{missing[:5]}; the Ray worker logs have the cause"
    )


def _embed_pass(
    jobs: list[tuple[str, pd.DataFrame]], embedder: dict, pool: BankPool, elastic: bool
) -> dict[str, dict]:
    """One Ray Data pass; a batch whose actor died on every try is dropped (the caller retries it)."""
    import ray

    from pipeline.dag import map_on_actor_pool, pool_strategy

    require(pool.demand(elastic), pool.resource_wait_s)
    items = [{"identity": identity, "segments": pickle.dumps(segments)} for identity, segments in jobs]
    blocks = max(1, -(-len(items) // pool.batch_size))
    ray.data.DataContext.get_current().max_errored_blocks = blocks
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    embedded = map_on_actor_pool(  # a lost actor (node loss, OOM) is replaced, its tasks retried
        dataset,
        IdentityEmbedder,
        pool_strategy(pool.size, elastic),
        pool.max_task_retries,
        fn_constructor_kwargs={**embedder, "gpu_share": pool.num_gpus},
        batch_size=pool.batch_size,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )
    entries = {}
    for row in embedded.iter_rows():
        mean = np.frombuffer(row["embedding"], np.float32).copy()
        norm = max(float(np.linalg.norm(mean)), 1e-12)
        entries[str(row["identity"])] = {
            "clip_id": str(row["clip_id"]),
            "frames_used": int(row["frames_used"]),
            "skip_reason": str(row["skip_reason"]),
            "embedding": mean,
            "normed": (mean / norm).astype(np.float32) if len(mean) else np.zeros(0, np.float32),
        }
    return entries


def build_identity_bank(
    manifest: pd.DataFrame,
    resolution: int,
    crop_scale: float,
    weights_dir: Path,
    out_path: Path | str,
    frames_per_identity: int = 3,
    window_frames: int = 32,
    max_clips_per_identity: int = 3,
    det_size: int = 256,
    det_thresh: float = 0.5,
    min_iou: float = 0.3,
    device: str = "auto",
    pool: BankPool | None = None,
) -> pd.DataFrame:
    """Write `out_path` (identities.parquet, atomically) with one row per identity of the manifest.

    `pool`: embed on a Ray Data actor pool (Ray initialised by the caller); None: on this process.
    Idempotent: rows already in `out_path` that were made with the same ArcFace weights are kept and
    only identities it lacks are computed; when it already covers the manifest it is returned as is."""
    for option, value in (
        ("frames_per_identity", frames_per_identity),
        ("window_frames", window_frames),
        ("max_clips_per_identity", max_clips_per_identity),
    ):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    arcface_path = weight_paths(weights_dir, [ARCFACE])[ARCFACE]
    arcface_id = weights_id(arcface_path)
    wanted = manifest.drop_duplicates("identity")[["identity", "dataset"]]
    existing = pd.DataFrame(columns=BANK_COLUMNS)
    if storage.is_file(out_path):
        existing = load_identity_bank(out_path)
        stale = existing["arcface_weights"] != arcface_id
        if stale.any():
            log.info("identity bank %s was built with other ArcFace weights: rebuilding", out_path)
            existing = existing[~stale]
    todo = wanted[~wanted["identity"].isin(set(existing["identity"]))]
    if todo.empty:
        log.info("identity bank %s covers all %d identities: reusing it", out_path, len(wanted))
        return existing.reset_index(drop=True)

    by_identity = manifest.sort_values("key").groupby(
        "identity", sort=False
    )  # one pass, not one per identity
    jobs = [(str(i), by_identity.get_group(i).head(max_clips_per_identity)) for i in todo["identity"]]
    embedder = {
        "weights_dir": str(weights_dir), "resolution": resolution, "crop_scale": crop_scale,
        "frames_per_identity": frames_per_identity, "window_frames": window_frames, "min_iou": min_iou,
        "det_size": det_size, "det_thresh": det_thresh, "device": device,
    }  # fmt: skip
    if pool is None:
        local = IdentityEmbedder(**embedder)
        entries = {identity: local.embed(segments) for identity, segments in jobs}
    else:
        entries = _embed_on_ray(jobs, embedder, pool)
    rows = []
    for identity, dataset in todo.itertuples(index=False):
        entry = entries[str(identity)]
        if not entry["frames_used"]:
            log.warning("identity %s skipped: %s", identity, entry["skip_reason"])
        rows.append(
            {"identity": str(identity), "dataset": str(dataset), "arcface_weights": arcface_id, **entry}
        )
    added = pd.DataFrame(rows, columns=BANK_COLUMNS)
    bank = pd.concat([existing, added], ignore_index=True) if len(existing) else added
    bank = bank.sort_values("identity").reset_index(drop=True)
    storage.makedirs(storage.parent_of(str(out_path)))
    atomic_write_parquet(out_path, bank)
    usable = int((bank["frames_used"] > 0).sum())
    log.info("identity bank %s: %d identities, %d usable", out_path, len(bank), usable)
    return bank
