"""Shard-set statistics: pure functions over an output folder's index, failures, stats and build.json,
shared by `python -m pipeline stats` (text) and notebooks/shard_stats.ipynb (plots)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.config import BUCKETS
from pipeline.contract import LABEL_KINDS
from pipeline.select import SCORE_COLUMNS, SUBSET_DIR, read_selection, stage2_span
from pipeline.splits import SPLITS
from pipeline.writer import read_stats

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)


@dataclass
class ShardSet:
    """Everything the statistics read from one output folder."""

    out: str  # a folder or a URI (s3://bucket/prefix)
    index: pd.DataFrame
    failures: pd.DataFrame
    build: dict[str, Any]
    shard_stats: list[dict[str, Any]]
    selection: dict[str, Any] | None = None
    subset_stats: list[dict[str, Any]] = field(default_factory=list)


def load(out: str | Path) -> ShardSet:
    out = str(out)
    if not storage.is_file(storage.join(out, "index.parquet")):
        raise FileNotFoundError(f"no {storage.join(out, 'index.parquet')}: build the shards first")

    def parquet(name: str) -> pd.DataFrame:
        path = storage.join(out, name)
        return storage.read_parquet(path) if storage.is_file(path) else pd.DataFrame()

    build_json = storage.join(out, "build.json")
    return ShardSet(
        out=out,
        index=parquet("index.parquet"),
        failures=parquet("failures.parquet"),
        build=json.loads(storage.read_bytes(build_json)) if storage.is_file(build_json) else {},
        shard_stats=read_stats(storage.join(out, "shards")),
        selection=read_selection(out),
        subset_stats=read_stats(storage.join(out, SUBSET_DIR, "shards")),
    )


def target_mix(data: ShardSet) -> dict[str, float]:
    mix = data.build.get("recipe", {}).get("mix") or {}
    return {b: float(mix.get(b, float("nan"))) for b in BUCKETS}


def bucket_shares(data: ShardSet) -> pd.DataFrame:
    """Rows: buckets; columns: clips, frames, clip_share, frame_share, target."""
    index = data.index
    frame = pd.DataFrame(index=list(BUCKETS), columns=["clips", "frames"], data=0)
    if len(index):
        clips = index.drop_duplicates(["dataset", "clip_id"])["bucket"].value_counts()
        frames = index.groupby("bucket")["num_frames"].sum()
        frame["clips"] = [int(clips.get(b, 0)) for b in BUCKETS]
        frame["frames"] = [int(frames.get(b, 0)) for b in BUCKETS]
    frame["clip_share"] = frame["clips"] / max(int(frame["clips"].sum()), 1)
    frame["frame_share"] = frame["frames"] / max(int(frame["frames"].sum()), 1)
    frame["target"] = pd.Series(target_mix(data))
    return frame


def gaze_scores(data: ShardSet, score: str = "robust") -> pd.Series:
    """Finite gaze scores of the samples (empty when the gaze stage did not run)."""
    column = SCORE_COLUMNS[score]
    if column not in data.index.columns:
        return pd.Series(dtype=float)
    values = pd.to_numeric(data.index[column], errors="coerce")
    return values[np.isfinite(values)].reset_index(drop=True)


def score_quantiles(data: ShardSet, score: str = "robust") -> dict[float, float]:
    values = gaze_scores(data, score)
    return {q: float(values.quantile(q)) for q in QUANTILES} if len(values) else {}


def subset_threshold(data: ShardSet, score: str = "robust") -> float | None:
    """The threshold the gaze subset was cut at, when it was cut on this score."""
    if data.selection and data.selection.get("score") == score:
        return float(data.selection["threshold"])
    return None


def clip_lengths(data: ShardSet) -> pd.Series:
    """Frames per clip (the clip's samples summed)."""
    if not len(data.index):
        return pd.Series(dtype=int)
    return data.index.groupby(["dataset", "clip_id"])["num_frames"].sum().reset_index(drop=True)


def failure_counts(data: ShardSet) -> pd.Series:
    """Failed clips by 'stage/error' (empty when nothing failed)."""
    failures = data.failures
    if not len(failures):
        return pd.Series(dtype=int)
    labels = failures["stage"].astype(str) + "/" + failures["error"].astype(str)
    return labels.value_counts().sort_index()


def shard_sizes(stats: list[dict[str, Any]]) -> pd.Series:
    """Bytes per shard, by shard name."""
    return pd.Series({s["shard"]: int(s["bytes"]) for s in stats}, dtype="int64").sort_index()


def fg_backends(data: ShardSet) -> pd.Series:
    """Samples per foreground backend ('none' where the foreground stage did not run)."""
    if not len(data.index) or "fg_backend" not in data.index.columns:
        return pd.Series(dtype=int)
    return data.index["fg_backend"].fillna("none").replace("", "none").value_counts().sort_index()


def split_counts(data: ShardSet) -> pd.DataFrame:
    """Rows: train / val / test; columns: samples, clips, identities, frames, shards."""
    frame = pd.DataFrame(
        index=list(SPLITS), columns=["samples", "clips", "identities", "frames", "shards"], data=0
    )
    index = data.index
    if len(index):
        split = index["split"] if "split" in index.columns else pd.Series("train", index=index.index)
        grouped = index.assign(split=split).groupby("split")

        def distinct(columns: list[str]) -> pd.Series:
            return grouped.apply(lambda g: len(g.drop_duplicates(columns))).reindex(SPLITS, fill_value=0)

        frame["samples"] = grouped.size().reindex(SPLITS, fill_value=0)
        frame["clips"] = distinct(["dataset", "clip_id"])
        frame["identities"] = distinct(["dataset", "identity"])
        frame["frames"] = grouped["num_frames"].sum().reindex(SPLITS, fill_value=0)
    shards = pd.Series([s.get("split", "train") for s in data.shard_stats], dtype=object).value_counts()
    frame["shards"] = [int(shards.get(name, 0)) for name in SPLITS]
    return frame.astype(int)


def identities_in_several_splits(data: ShardSet) -> list[str]:
    """(dataset/identity) found in more than one split: must stay empty."""
    if not len(data.index) or "split" not in data.index.columns:
        return []
    per = data.index.groupby(["dataset", "identity"])["split"].nunique()
    return [f"{d}/{i}" for (d, i), n in per.items() if n > 1]


def label_counts(data: ShardSet, kind: str) -> pd.Series:
    """Clips per attribute name of one label kind (appearance / action / emotion), most frequent first."""
    if kind not in data.index.columns or not len(data.index):
        return pd.Series(dtype=int)
    clips = data.index.drop_duplicates(["dataset", "clip_id"])[kind].fillna("")
    names = clips[clips != ""].str.split(",").explode()
    return names.value_counts()


def stage2_usable(data: ShardSet, span: int | None = None) -> tuple[int, int]:
    """(train samples at least stage 2's span long, train samples): what the gaze subset can draw on."""
    span = stage2_span() if span is None else span
    index = data.index
    if not len(index):
        return 0, 0
    train = index[index["split"] == "train"] if "split" in index.columns else index
    return int((train["num_frames"] >= span).sum()), len(train)


def report(data: ShardSet) -> str:
    """The statistics as text: what `python -m pipeline stats` prints."""
    lines = [f"shard set {data.out}: {len(data.index)} samples"]
    shares = bucket_shares(data)
    lines.append("buckets        clips  share  frames  share  target")
    for bucket, row in shares.iterrows():
        lines.append(
            f"  {bucket:<10} {int(row['clips']):>7} {100 * row['clip_share']:5.1f}% {int(row['frames']):>7}"
            f" {100 * row['frame_share']:5.1f}% {100 * row['target']:5.1f}%"
        )
    splits = split_counts(data)
    lines.append("splits       samples  clips  identities  frames  shards")
    for split, row in splits.iterrows():
        lines.append(
            f"  {split:<10} {row['samples']:>7} {row['clips']:>6} {row['identities']:>11} {row['frames']:>7}"
            f" {row['shards']:>7}"
        )
    shared = identities_in_several_splits(data)
    if shared:
        lines.append(f"  WARNING: {len(shared)} identities in several splits: {', '.join(shared[:5])}")
    for kind in LABEL_KINDS:
        counts = label_counts(data, kind)
        if len(counts):
            lines.append(f"{kind} (clips): " + ", ".join(f"{name} {n}" for name, n in counts.head(8).items()))
    for score in SCORE_COLUMNS:
        quantiles = score_quantiles(data, score)
        if quantiles:
            text = ", ".join(f"q{int(100 * q)} {v:.3g}" for q, v in quantiles.items())
            lines.append(f"gaze {SCORE_COLUMNS[score]} ({len(gaze_scores(data, score))} scored): {text}")
        else:
            lines.append(f"gaze {SCORE_COLUMNS[score]}: no scores")
    if data.selection:
        sel = data.selection
        lines.append(
            f"gaze subset: {sel['selected']} of {sel['samples_total']} samples ({sel['frames_selected']} frames),"
            f" {sel['column']} {sel['rule']} {sel['value']:g}, threshold {sel['threshold']:.4g},"
            f" {len(data.subset_stats)} shards"
        )
        if "min_frames" in sel:
            lines.append(
                f"  ranked: {sel['split']} samples of >= {sel['min_frames']} frames; not eligible:"
                f" {sel['samples_too_short']} shorter, {sel['samples_other_splits']} in other splits"
            )
    else:
        lines.append("gaze subset: none (run python -m pipeline select)")
    span = stage2_span()
    usable, train = stage2_usable(data, span)
    lines.append(f"stage-2 usable train samples (>= {span} frames): {usable} of {train}")
    lengths = clip_lengths(data)
    if len(lengths):
        lines.append(
            f"clip length (frames): {len(lengths)} clips, min {lengths.min()}, median {lengths.median():g},"
            f" max {lengths.max()}"
        )
    failures = failure_counts(data)
    lines.append(f"failures: {int(failures.sum())}" if len(failures) else "failures: none")
    lines += [f"  {label}: {count}" for label, count in failures.items()]
    sizes = shard_sizes(data.shard_stats)
    if len(sizes):
        lines.append(
            f"shards: {len(sizes)}, {sizes.sum() / 2**20:.2f} MiB, size min {sizes.min() / 2**10:.1f} KiB,"
            f" median {sizes.median() / 2**10:.1f} KiB, max {sizes.max() / 2**10:.1f} KiB"
        )
    else:
        lines.append("shards: none")
    backends = fg_backends(data)
    lines.append("fg backend: " + (", ".join(f"{k} {v}" for k, v in backends.items()) or "none"))
    return "\n".join(lines)
