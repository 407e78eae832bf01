"""The MegActor model configuration: one dataclass, overridable from the command line with key=value."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Which module names each training stage trains (fnmatch patterns over MegActor.named_parameters()).
# Stage 1: ReferenceNet + the whole denoiser (conv_in and motion modules included) + DrivenEncoder.
# Stage 2: only the AnimateDiff motion modules of the denoiser.
DEFAULT_TRAINABLE: dict[str, list[str]] = {
    "stage1": ["reference_net.*", "denoiser.*", "driven_encoder.*"],
    "stage2": ["denoiser.*motion_modules.*"],
}


@dataclass
class MegActorConfig:
    """Everything that shapes the model, its noise schedule and its training-time behaviour.

    Component architectures (UNet, VAE, CLIP, motion adapter) are not here: they are read from the
    diffusers / transformers config.json of each component folder, so the same code builds the tiny and
    the full-size model.
    """

    # Which denoiser self-attentions also attend to the ReferenceNet's tokens: "midup" (the authors'
    # choice: mid block + up blocks) or "full" (every spatial self-attention).
    reference_blocks: str = "midup"
    # Per-sample probability of training without reference attention, so the model learns the
    # unconditional branch that classifier-free guidance needs at sampling time.
    reference_dropout: float = 0.1
    driven_ada: bool = False  # the optional reference-conditioned scale/shift in the DrivenEncoder
    gradient_checkpointing: bool = False
    # With gradient_checkpointing, also checkpoint the AnimateDiff motion modules (diffusers checkpoints
    # only the resnets and spatial transformers of UNetMotionModel). False = diffusers' behaviour alone.
    checkpoint_motion_modules: bool = True
    # With gradient_checkpointing, checkpoint only these units (fnmatch patterns over module-list paths
    # such as "denoiser.up_blocks.3.motion_modules" or "reference_net.*.attentions"; see
    # model.checkpointing.checkpoint_units). Empty = the whole-model mode above.
    checkpoint_modules: list[str] = field(default_factory=list)
    # The per-GPU memory (GB) the checkpoint_modules list was chosen for (benchmarks/step_flops.py
    # --budget-gb): a record for whoever reruns the choice on another GPU; 0 = not chosen from a budget.
    checkpoint_budget_gb: float = 0.0
    # Noise schedule: the authors' betas with the zero-terminal-SNR rescale and "trailing" spacing, so
    # the sampler starts from pure noise at t = 999. v-prediction, not the authors' epsilon: at t = 999
    # an epsilon model's x0 estimate divides by sqrt(alpha_bar) ~ 0 (ill-conditioned: docs/model.md),
    # a v model's x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v stays well-posed at every step.
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    timestep_spacing: str = "trailing"
    # With zero terminal SNR, alpha_bar(999) = 0; a floor of 2**-24 (what diffusers' Euler scheduler
    # uses) keeps an epsilon model's first DDIM step finite (finite, not accurate: use v_prediction).
    terminal_alpha_bar: float = 2.0**-24
    noise_offset: float = 0.1  # added per (sample, channel), shared across frames and pixels
    trainable: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_TRAINABLE.items()}
    )

    def __post_init__(self) -> None:
        if self.reference_blocks not in ("midup", "full"):
            raise ValueError(f"reference_blocks: expected 'midup' or 'full', got {self.reference_blocks!r}")
        if not 0.0 <= self.reference_dropout <= 1.0:
            raise ValueError(
                f"reference_dropout: expected a probability in [0, 1], got {self.reference_dropout}"
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type: expected 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        if isinstance(self.checkpoint_modules, str) or not all(
            isinstance(x, str) for x in self.checkpoint_modules
        ):
            raise ValueError(
                f"checkpoint_modules: expected a list of unit paths / patterns, got {self.checkpoint_modules!r}"
            )
        if self.checkpoint_budget_gb < 0:
            raise ValueError(f"checkpoint_budget_gb: expected >= 0, got {self.checkpoint_budget_gb}")
        if self.timestep_spacing not in ("trailing", "leading", "linspace"):
            raise ValueError(
                f"timestep_spacing: expected 'trailing', 'leading' or 'linspace', got {self.timestep_spacing!r}"
            )

    @property
    def samples_terminal_step(self) -> bool:
        """True when DDIM's first sampling step is t = T-1, where zero-terminal-SNR alpha_bar is ~0."""
        return self.rescale_betas_zero_snr and self.timestep_spacing in ("trailing", "linspace")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MegActorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MegActorConfig fields {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MegActorConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def apply_overrides(obj: Any, overrides: list[str]) -> Any:
    """Return a copy of a dataclass with `key=value` strings applied; values parse as JSON, else as text."""
    hints = typing.get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"override {item!r}: expected key=value with key one of {sorted(hints)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        changes[key] = value
    return dataclasses.replace(obj, **changes)
