"""Build configuration: YAML files -> typed dataclasses, with `key=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "data"
DATASETS = ("demo", "vfhq", "celebvhq")
BUCKETS = ("real", "swap", "style")
CHAINS = ("all", "common", "none")  # see BuildConfig.chain_stages


@dataclass
class VideoConfig:
    """H.264 settings of every video written to the shards."""

    crf: int = 18
    preset: str = "veryfast"
    gop: int = 16  # a short GOP keeps the trainer's random access cheap
    threads: int = 1  # encoder, decoder and OpenCV threads per task: Ray runs one task per CPU


@dataclass
class VfhqConfig:
    """Where VFHQ's files are, relative to ROOT (or absolute). Empty = found under ROOT (the default):
    meta files in `meta_info/` (split subfolders included) or `meta_info*.zip`, frames in any layout."""

    meta_dir: str = ""  # the folder of Clip+...txt files, or a zip of them
    frames_dir: str = ""  # the folder to search for frame folders and zips (default: ROOT)
    search_depth: int = 4  # folder levels searched below frames_dir for clip folders and zips
    # A meta txt holds a few thousand ~100-byte rows: anything bigger (on disk or as a zip member) is a
    # damaged or wrong file, refused before it is read into memory.
    meta_max_bytes: int = 16 * 2**20


@dataclass
class CelebvhqConfig:
    """Where CelebV-HQ's files are, relative to ROOT (or absolute). Empty = found under ROOT."""

    info_file: str = ""  # celebvhq_info.json (default: ROOT/celebvhq_info.json, else one level down)
    videos_dir: str = ""  # cut clips <clip_id>.mp4 / <clip_id>_<k>.mp4 (default: processed/ or videos/)
    raw_dir: str = ""  # whole source videos <ytb_id>.mp4 (default: raw/)
    # A raw clip's official crop narrower than this (pixels) is a bad bbox, not a face worth upscaling.
    min_crop_pixels: int = 32


@dataclass
class SplitConfig:
    """Held-out splits, drawn per identity (VFHQ-Test clips are test; see pipeline/splits.py)."""

    val: float = 0.05
    test: float = 0.05
    seed: int = 0  # independent of the bucket seed: re-mixing must not move identities between splits


@dataclass
class DemoConfig:
    """The generated look-alike dataset (both formats) used by `make shards` and the tests."""

    identities: int = 6
    vfhq_clips: int = 6
    celebvhq_clips: int = 6
    min_frames: int = 36
    max_frames: int = 90
    seed: int = 0
    # Each clip's colours rotated by a hue drawn from [-clip_hue_shift, clip_hue_shift] (OpenCV units,
    # 90 = the whole circle): the same person filmed in another light, so a clip's colours come only
    # from its own frames (the learning check's data). 0: a person looks the same in every clip.
    clip_hue_shift: int = 0
    motion: float = 1.0  # head rotation, translation and zoom, times each part's own amplitude

    def __post_init__(self) -> None:
        if not self.motion >= 0:
            raise ValueError(f"demo.motion: expected >= 0, got {self.motion}")
        if not 0 <= self.clip_hue_shift <= 90:
            raise ValueError(
                f"demo.clip_hue_shift: expected 0..90 (OpenCV hue units), got {self.clip_hue_shift}"
            )


@dataclass
class StageConfig:
    """One annotator in the DAG and the resources it gets (see pipeline/stages/base.py)."""

    name: str
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 1
    pool_size: int = 1
    # Retries of a batch whose actor died (segfault, CUDA or host OOM): Ray Data's default retries it
    # forever; after these the batch's clips become failure rows (`task_failed`) and the run goes on.
    max_task_retries: int = 2
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildConfig:
    dataset: str = "demo"
    root: str = ""
    out: str = ""
    resolution: int = 512
    max_frames: int = 240  # long enough for a stage-2 sample: 16 frames at stride 12 span 181
    min_frames: int = 16
    crop_scale: float = 1.8  # square side = scale x the union of the clip's face boxes
    min_face_px: int = 64  # a face crop with a shorter side (source pixels) fails as too_small
    # Frames declaring more pixels fail as frame_too_large before decoding (8192²: any 8K source).
    max_frame_pixels: int = 8192 * 8192
    mix: dict[str, float] = field(default_factory=lambda: {"real": 0.5, "swap": 0.4, "style": 0.1})
    seed: int = 0
    samples_per_shard: int = 64
    max_failure_fraction: float = 0.1  # above it the run exits non-zero (its shards stay committed)
    # Passes again over the rows whose batch was lost (its actor died: a node lost mid-build, a crash, an
    # OOM kill, each already retried max_task_retries times) before they become task_failed rows. A lost
    # node burns a batch's retries in seconds, before Ray declares the node dead; a new pass sizes its
    # pools to what is left. A clip that kills its actor every time costs one more round of retries.
    lost_row_passes: int = 1
    num_cpus: int | None = None  # local Ray only; None = every core
    task_num_cpus: float = 1.0  # CPUs each decode / encode / write task reserves
    # On a cluster (RAY_ADDRESS): seconds a Ray pass waits for the CPUs / GPUs it asks for to appear (an
    # autoscaler adding nodes) before it stops with an error. Locally a shortfall is an error at once.
    resource_wait_s: float = 600.0
    profile: str = "full"  # full: real weights under weights_dir / $WEIGHTS_DIR; tiny: random, generated
    weights_dir: str | None = None  # tiny: defaults to ~/.cache/megactor/tiny_weights
    video: VideoConfig = field(default_factory=VideoConfig)
    vfhq: VfhqConfig = field(default_factory=VfhqConfig)
    celebvhq: CelebvhqConfig = field(default_factory=CelebvhqConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    stages: list[StageConfig] = field(default_factory=list)
    # Which annotators share one actor, so frames are not copied through the object store between them
    # (pipeline/dag.py plan_pools): all = every stage (swap / stylise run only on their bucket's rows
    # inside it); common = the all-bucket annotators (swap / stylise keep own pools and see every row);
    # none = one pool per stage, every row through every pool (the plan before chaining).
    chain_stages: str = "all"

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.resolution <= 0 or self.resolution % 16:
            raise ValueError(f"resolution must be a positive multiple of 16, got {self.resolution}")
        if not 0 < self.min_frames <= self.max_frames:
            raise ValueError(f"need 0 < min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if set(self.mix) != set(BUCKETS):
            raise ValueError(f"mix must name exactly {BUCKETS}, got {sorted(self.mix)}")
        if any(v < 0 for v in self.mix.values()) or abs(sum(self.mix.values()) - 1.0) > 1e-6:
            raise ValueError(f"mix shares must be >= 0 and sum to 1, got {self.mix}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.lost_row_passes < 0:
            raise ValueError(f"lost_row_passes must be >= 0, got {self.lost_row_passes}")
        if self.task_num_cpus <= 0:
            raise ValueError(f"task_num_cpus must be > 0, got {self.task_num_cpus}")
        if self.resource_wait_s < 0:
            raise ValueError(f"resource_wait_s must be >= 0, got {self.resource_wait_s}")
        if self.profile not in ("tiny", "full"):
            raise ValueError(f"profile must be 'tiny' or 'full', got {self.profile!r}")
        if self.splits.val < 0 or self.splits.test < 0 or self.splits.val + self.splits.test >= 1:
            raise ValueError(f"splits: need val, test >= 0 and val + test < 1, got {self.splits}")
        if any(stage.max_task_retries < 0 for stage in self.stages):
            raise ValueError(
                "stages[].max_task_retries must be >= 0 (a crashing clip must not be retried forever)"
            )
        if self.chain_stages not in CHAINS:
            raise ValueError(f"chain_stages must be one of {CHAINS}, got {self.chain_stages!r}")
        if self.vfhq.meta_max_bytes < 1 or self.celebvhq.min_crop_pixels < 2:
            raise ValueError("vfhq.meta_max_bytes must be >= 1 and celebvhq.min_crop_pixels >= 2")
        if self.crop_scale < 1.0:
            raise ValueError(f"crop_scale must be >= 1, got {self.crop_scale}")
        if self.min_face_px < 1 or self.max_frame_pixels < 1:
            raise ValueError(
                f"min_face_px and max_frame_pixels must be >= 1, got {self.min_face_px}, {self.max_frame_pixels}"
            )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn a YAML value into the dataclass field's type, recursing into nested dataclasses."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {k: _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def did_you_mean(unknown: list[str], known: set[str]) -> str:
    """' (did you mean ...?)' naming the closest known key of each misspelt one; '' when none is close."""
    guesses = {}
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        if close:
            guesses[key] = close[0]
    if not guesses:
        return ""
    return " (did you mean " + ", ".join(f"{v!r} for {k!r}" for k, v in guesses.items()) + "?)"


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {unknown}{did_you_mean(unknown, names)}; known: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "mix":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=1 mix={real: 1, swap: 0, style: 0}` -> nested dict; values are parsed as YAML."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return result


def read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_build_config(
    dataset: str,
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    **fields: Any,
) -> BuildConfig:
    """Layers, later wins: configs/data/defaults.yaml <- configs/data/<dataset>.yaml <- `config_path`
    (an overlay such as cluster-8gpu.yaml) <- explicit fields <- key=value overrides. Lists (stages)
    are replaced whole, mappings merged key by key."""
    data: dict[str, Any] = {}
    for path in (CONFIG_DIR / "defaults.yaml", CONFIG_DIR / f"{dataset}.yaml"):
        if path.exists():
            data = deep_merge(data, read_yaml(path))
    if config_path:
        if not Path(config_path).exists():
            raise FileNotFoundError(f"config file {config_path} does not exist")
        data = deep_merge(data, read_yaml(Path(config_path)))
    data = deep_merge(data, {"dataset": dataset})
    data = deep_merge(data, {k: v for k, v in fields.items() if v is not None})
    data = deep_merge(data, parse_overrides(overrides or []))
    config = from_dict(BuildConfig, data)
    config.validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
