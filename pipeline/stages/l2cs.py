"""L2CS-Net (Abdelrahman et al. 2022) on torchvision's ResNet50, loading the released gaze360 weights.

The released `L2CSNet_gaze360.pkl` is the state_dict of the authors' `L2CS(nn.Module)`, which builds
ResNet50's layers itself, so its backbone keys sit at the top level (`conv1.*`, `bn1.*`, `layer1.*` ..
`layer4.*`), followed by two 90-bin heads and a vestigial `fc_finetune` Linear(2048 + 3, 3) that
forward never uses. This module takes the same layers from `torchvision.models.resnet50(weights=None)`
(random init, never a download) under the same names, so the file loads with strict=True.

The head named `fc_yaw_gaze` is the one the authors train and read as *pitch* (their training and
inference code take the first output as pitch); we keep their names and their reading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from pipeline.weights import MissingWeights, register_tiny_writer

WEIGHTS_NAME = "l2cs_gaze360"
NUM_BINS = 90
BIN_DEGREES = 4.0  # gaze360: 90 bins of 4 degrees over [-180, 180)
OFFSET_DEGREES = 180.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class L2CSWeightsError(ValueError):
    """A weights file that is not an L2CS ResNet50 state_dict (names the file and the key mismatch)."""


class L2CS(nn.Module):
    """ResNet50 trunk + average pool -> two 90-bin gaze heads; forward returns (pitch, yaw) logits."""

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        super().__init__()
        trunk = torchvision.models.resnet50(weights=None)
        # Same attribute names and order as the authors' model, so state_dict keys match one to one;
        # torchvision's own classifier (`fc`) is not kept.
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            trunk.layer1,
            trunk.layer2,
            trunk.layer3,
            trunk.layer4,
        )
        self.avgpool = trunk.avgpool
        features = trunk.fc.in_features  # 2048
        self.fc_yaw_gaze = nn.Linear(features, num_bins)  # read as pitch (see module docstring)
        self.fc_pitch_gaze = nn.Linear(features, num_bins)  # read as yaw
        self.fc_finetune = nn.Linear(features + 3, 3)  # vestigial, kept for the released key layout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, S/4, S/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, S/32, S/32)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 2048)
        return self.fc_yaw_gaze(x), self.fc_pitch_gaze(x)  # (B, 90) pitch logits, (B, 90) yaw logits


def load_l2cs(path: Path, device: torch.device | str = "cpu") -> L2CS:
    """Build the model and load a state_dict file strictly (weights_only unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeights(f"L2CS weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip error means the same thing to the user
        raise L2CSWeightsError(f"cannot read L2CS weights {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise L2CSWeightsError(f"{path} does not hold a state_dict of tensors (got {type(state).__name__})")
    with torch.device("meta"):  # shapes only: the file supplies every tensor (assign=True below)
        model = L2CS()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise L2CSWeightsError(
            f"{path} does not match the L2CS ResNet50 layout: "
            f"{len(missing)} missing keys {_preview(missing)}, {len(unexpected)} unexpected keys {_preview(unexpected)}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise L2CSWeightsError(f"{path}: {len(wrong)} tensors have the wrong shape: {_preview(wrong)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def decode_gaze360(logits: torch.Tensor) -> torch.Tensor:
    """(N, 90) bin logits -> (N,) angle in radians: Σ softmax·idx·4 − 180 degrees."""
    idx = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    probs = torch.softmax(logits.float(), dim=-1)
    degrees = (probs * idx).sum(dim=-1) * BIN_DEGREES - OFFSET_DEGREES
    return torch.deg2rad(degrees)


def normalise(
    crops: np.ndarray, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 RGB crops (N, S, S, 3) -> ImageNet-normalised (N, 3, S, S) tensor on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


@register_tiny_writer(WEIGHTS_NAME)
def write_tiny_l2cs(dest: Path, seed: int) -> None:
    """A random-weight L2CS ResNet50 state_dict in the released layout (full size: ~95 MB)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        state = L2CS().state_dict()
    torch.save(state, dest)
