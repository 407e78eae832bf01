"""Training configuration: configs/train/<stage>.yaml -> typed dataclasses, key=value overrides on top.

Layers, later wins: configs/train/<stage>.yaml <- each --config overlay (e.g. tiny.yaml) <- key=value
overrides (dotted for sections: `data.batch_size=2 optim.lr=2e-5 model.config.gradient_checkpointing=true`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.config import MegActorConfig
from pipeline.config import deep_merge, from_dict, parse_overrides, read_yaml
from train.data import DataConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"
STAGES = ("stage1", "stage2")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("bf16", "fp32")
GRAD_COMPRESSIONS = ("none", "bf16")


@dataclass
class ModelSection:
    """Where the model comes from."""

    profile: str = "full"  # full: real weights from weights_dir / $WEIGHTS_DIR; tiny: random tiny weights
    weights_dir: str | None = None
    # Stage 2 starts from stage 1: a run name under storage_path (its latest checkpoint), a Ray Train
    # checkpoint folder, or a MegActor checkpoint folder (config.json + model.safetensors). None: start
    # from the pretrained components (stage 1).
    init_from: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # MegActorConfig fields (model/config.py)


@dataclass
class OptimConfig:
    """AdamW with the authors' values by default (REFERENCE.md §2)."""

    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear warm-up, then constant (the authors use a constant rate)
    # Min-SNR loss weighting (Hang et al. 2023) with this gamma, e.g. 5.0; None = plain MSE (authors).
    snr_gamma: float | None = None
    # AdamW's implementation: auto = the fused kernel when every parameter is on a GPU, foreach (one
    # kernel per op over all tensors) elsewhere; true = fused (torch raises where it has none); false = foreach.
    fused: Literal["auto", True, False] = "auto"

    def __post_init__(self) -> None:
        if not (self.fused == "auto" or isinstance(self.fused, bool)):
            raise ValueError(f"optim.fused: expected auto, true or false, got {self.fused!r}")


@dataclass
class DDPConfig:
    """DistributedDataParallel (strategy=ddp). Gradients always live in DDP's reduction buckets
    (gradient_as_bucket_view): no second gradient-sized copy per GPU."""

    # bf16: gradients are all-reduced in bfloat16 (half the traffic, ~3 significant digits) and averaged
    # back into fp32; none: fp32 all-reduce.
    grad_compression: str = "none"

    def __post_init__(self) -> None:
        if self.grad_compression not in GRAD_COMPRESSIONS:
            raise ValueError(
                f"ddp.grad_compression: expected one of {GRAD_COMPRESSIONS}, got {self.grad_compression!r}"
            )


@dataclass
class FSDPConfig:
    """FSDP2 (strategy=fsdp)."""

    # With mixed_precision=bf16: gather the sharded weights in bf16 for forward and backward (half the
    # all-gather traffic and unsharded-weight memory) and reduce-scatter gradients in fp32; the sharded
    # weights and AdamW states stay fp32. No effect with mixed_precision=fp32.
    bf16_params: bool = False


@dataclass
class ValidationConfig:
    """Held-out validation: a loss with fixed noise and timesteps every `loss_every` steps, and a short video
    rank 0 renders every `every` steps with the sampling pipeline, both on held-out clips."""

    every: int = 2000  # video; 0 = never
    loss_every: int = 500  # 0 = never
    split: str = "val"  # the shards' split the held-out clips come from
    shards: str | None = None  # relative to data.root (or absolute); None: data.shards
    samples: int = 2  # held-out clips in the fixed validation batch (the video animates the first)
    loss_repeats: int = 4  # fixed noise draws per loss evaluation
    num_inference_steps: int = 25
    guidance_scale: float = 4.5
    seed: int = 0
    # Reconstruction metrics (PSNR, SSIM, L1: evaluation/pixel.py) of the first eval_clips held-out clips,
    # sampled with eval_steps DDIM steps, logged as val/<metric> next to the loss; 0 = never.
    eval_every: int = 0
    eval_clips: int = 2
    eval_steps: int = 4
    # Conditioning diagnostics (train/diagnostics.py) every loss_every steps, logged as val/cond/*: the
    # held-out loss with each condition intact, swapped between clips or removed, on the first
    # cond_samples held-out clips with timesteps spread over [cond_t_min, cond_t_max].
    conditioning: bool = True
    cond_samples: int = 4
    cond_t_min: int = 100
    cond_t_max: int = 900

    def __post_init__(self) -> None:
        if self.cond_samples < 1:
            raise ValueError(f"validation.cond_samples: expected >= 1, got {self.cond_samples}")
        if not 0 <= self.cond_t_min <= self.cond_t_max:
            raise ValueError(
                f"validation.cond_t_min / cond_t_max: expected 0 <= min <= max, got {self.cond_t_min}, "
                f"{self.cond_t_max}"
            )


@dataclass
class EMAConfig:
    """Exponential moving average of the trainable weights (train/ema.py): validated and exported."""

    enabled: bool = False
    decay: float = 0.9999  # the ceiling; early steps use a lower decay (see warmup)
    # diffusers' warm-up: decay = 1 - (1 + step) ** -power, so the average is not dominated by the starting
    # weights; without it decay = min(decay, (1 + step) / (10 + step)).
    warmup: bool = True
    power: float = 2 / 3
    update_after_step: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay: expected 0 < decay < 1, got {self.decay}")
        if self.update_after_step < 0:
            raise ValueError(f"ema.update_after_step: expected >= 0, got {self.update_after_step}")


@dataclass
class TrainConfig:
    stage: str = "stage1"
    name: str = "stage1"  # the Ray Train run: relaunching with the same storage_path + name resumes
    storage_path: str = "out/train"  # local folder, NFS path or s3:// shared by every node
    seed: int = 0
    max_steps: int = 100_000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # Steps between exports of model/ (the plain MegActor folder model.animate and stage 2 read) inside a
    # checkpoint; 0: with every checkpoint. The last step always exports.
    export_every: int = 0
    # dtype of the AdamW moments in a checkpoint's state/ (training keeps them fp32): bf16 halves the
    # largest part of a save; a resume then restarts them rounded within 0.4 %, which the first moment
    # forgets within dozens of steps and the second within thousands. fp32: a resume restores every bit.
    checkpoint_moments: str = "bf16"
    log_every: int = 10
    mixed_precision: str = "bf16"  # autocast dtype of the UNets; weights and optimiser stay fp32
    strategy: str = "ddp"  # ddp, or fsdp to shard parameters, gradients and optimiser states
    num_workers: int = 1  # Ray Train workers: one per GPU
    use_gpu: bool = True
    cpus_per_worker: float = 4.0  # the DataLoader processes of a worker run on these
    max_failures: int = 3  # restarts of the worker group from the latest checkpoint
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def validate(self) -> None:
        choices = {"stage": STAGES, "strategy": STRATEGIES, "mixed_precision": PRECISIONS,
                   "checkpoint_moments": PRECISIONS}  # fmt: skip
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: expected one of {allowed}, got {getattr(self, key)!r}")
        for key in ("max_steps", "checkpoint_every", "num_workers", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)}")
        self._validate_export_every()
        if self.validation.samples < 1 or self.validation.loss_repeats < 1:
            raise ValueError("validation.samples and validation.loss_repeats: expected >= 1")
        if self.data.steps_per_epoch < 1 or self.data.batch_size < 1:
            raise ValueError("data.steps_per_epoch and data.batch_size: expected >= 1")
        if self.model.profile not in ("tiny", "full"):
            raise ValueError(f"model.profile: expected 'tiny' or 'full', got {self.model.profile!r}")
        self.megactor_config()  # unknown or invalid model fields fail here, before any worker starts

    def _validate_export_every(self) -> None:
        """Exports fall on checkpoints, and the newest one must outlive Ray's pruning of older
        checkpoints until the next export is written."""
        every, ckpt, keep = self.export_every, self.checkpoint_every, self.keep_checkpoints
        if every < 0:
            raise ValueError(f"export_every: expected >= 0 (0: with every checkpoint), got {every}")
        if every and every % ckpt:
            raise ValueError(
                f"export_every: {every} is not a multiple of checkpoint_every ({ckpt}): exports are "
                "written with checkpoints; pick a multiple, or 0 for every checkpoint"
            )
        if every > keep * ckpt:
            raise ValueError(
                f"export_every: {every} steps is more than keep_checkpoints x checkpoint_every "
                f"({keep} x {ckpt}): the newest model/ would be deleted before the next is written; "
                f"lower export_every or raise keep_checkpoints to {-(-every // ckpt)}"
            )

    def megactor_config(self) -> MegActorConfig:
        return MegActorConfig.from_dict(self.model.config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        config = from_dict(cls, data)
        config.validate()
        return config


def load_train_config(
    stage: str, overlays: list[str | Path] | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """configs/train/<stage>.yaml, then each overlay file, then key=value overrides."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    data = read_yaml(CONFIG_DIR / f"{stage}.yaml")
    for overlay in overlays or []:
        if not Path(overlay).is_file():
            raise FileNotFoundError(f"config overlay {overlay} does not exist")
        data = deep_merge(data, read_yaml(Path(overlay)))
    data = deep_merge(data, parse_overrides(overrides or []))
    data["stage"] = stage
    return TrainConfig.from_dict(data)
