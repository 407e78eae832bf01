"""The evaluation backbones (LPIPS's AlexNet, FID's Inception, FVD's I3D): loaded from WEIGHTS_DIR by the
manifest's names, with tiny random-weight writers in the same on-disk formats for tests.

- lpips_alexnet: torchvision's alexnet-owt state dict (torch.save); LPIPS reads `features.*` only.
- fid_inception: pytorch-fid's pt_inception-2015-12-05 state dict (torchvision Inception3 names, 1008
  classes); read into torchvision's Inception3 with pytorch-fid's pooling (InceptionFeatures).
- fvd_i3d: StyleGAN-V's TorchScript I3D, called as i3d(videos, rescale=False, resize=False,
  return_features=True) on [N,3,T,224,224] in [-1,1] -> [N,400].
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.weights import MissingWeights, check_weights, file_id, load_weight_specs, register_tiny_writer

LPIPS_ALEXNET, FID_INCEPTION, FVD_I3D = "lpips_alexnet", "fid_inception", "fvd_i3d"
I3D_FEATURES = 400
TINY_PREFIX = "tiny-"  # weights ids of tiny files (recorded in metrics.json)


def weights_path(weights_dir: str | Path, name: str) -> Path:
    """The named file under weights_dir; MissingWeights naming it (and where to get it) when absent."""
    problems = check_weights(Path(weights_dir), [name], verify_hash=False)
    if problems:
        raise MissingWeights("; ".join(problems))
    return Path(weights_dir) / load_weight_specs()[name].path


def weights_tag(path: Path) -> str:
    """What metrics.json records for a weights file: the sha256 prefix (a tiny file has its own hash)."""
    return file_id(path)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------
# LPIPS (AlexNet trunk from WEIGHTS_DIR, linear heads from the lpips wheel)


def load_lpips(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """lpips.LPIPS('alex') whose trunk is the alexnet-owt file: LPIPS's slices hold torchvision's
    `features` layers under their own indices, so `features.{i}.*` maps onto the slice holding layer i."""
    import lpips

    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)  # heads from the wheel
    state = _load_state(path)
    slices = [getattr(model.net, f"slice{k}") for k in range(1, 6)]
    loaded = 0
    for key, tensor in state.items():
        if not key.startswith("features."):
            continue
        _, index, param = key.split(".")
        owner = next((s for s in slices if index in s._modules), None)
        if owner is None:
            continue  # features after the last ReLU LPIPS taps (the final max pool has no weights)
        getattr(owner._modules[index], param).data.copy_(tensor)
        loaded += 1
    if loaded != 10:  # five conv layers, weight + bias
        raise ValueError(f"{path}: expected AlexNet's 5 conv layers (features.*), loaded {loaded} tensors")
    return model.to(device).eval()


@register_tiny_writer(LPIPS_ALEXNET)
def write_tiny_alexnet(dest: Path, seed: int) -> None:
    """torchvision AlexNet's `features.*` tensors with random values (the classifier is not read)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = torchvision.models.alexnet(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, dest)


# ---------------------------------------------------------------------------------------------
# FID Inception


def _fid_pool(block: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give an Inception block pytorch-fid's pooling branch. The TF graph the FID weights come from
    averages without counting padding and uses a max pool in the last block, where torchvision's blocks
    count padding: the block's pool branch is recomputed with `pool` (same weights, one 1x1 conv more)."""
    inner = block._forward

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = inner(x)
        outputs[-1] = block.branch_pool(pool(x))
        return outputs

    block._forward = forward


def _avg_no_pad(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_same(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionFeatures(nn.Module):
    """pytorch-fid's FID Inception-v3: pool3 features (2048) of images resized to 299 (bilinear) and
    scaled to [-1, 1]; torchvision's Inception3 with pytorch-fid's pooling in the A, C and E blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.inception_v3(
            weights=None, aux_logits=False, init_weights=False, num_classes=1008, transform_input=False
        )
        for name in (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7b",
        ):
            _fid_pool(getattr(self.net, name), _avg_no_pad)
        _fid_pool(self.net.Mixed_7c, _max_same)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) float in [0, 1] -> (N, 2048)."""
        x = nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        net = self.net
        for name in (
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
            "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool",
        ):  # fmt: skip
            x = getattr(net, name)(x)
        return torch.flatten(x, 1)


def load_inception(path: Path, device: torch.device | str = "cpu") -> InceptionFeatures:
    model = InceptionFeatures()
    state = {k: v for k, v in _load_state(path).items() if not k.startswith("AuxLogits.")}
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not an FID Inception state dict (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return model.to(device).eval()


@register_tiny_writer(FID_INCEPTION)
def write_tiny_inception(dest: Path, seed: int) -> None:
    """A random Inception-v3 (1008 classes) state dict in pytorch-fid's key layout (full size, ~95 MB:
    the architecture is what the loader checks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionFeatures()
        for module in model.modules():  # init_weights=False leaves torch's defaults: scale them down
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.05)
    torch.save(model.net.state_dict(), dest)


# ---------------------------------------------------------------------------------------------
# FVD I3D (TorchScript)


def load_i3d(path: Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001 - TorchScript raises several types for a damaged file
        raise ValueError(f"{path}: not a TorchScript I3D ({type(exc).__name__}: {exc})") from exc
    return model.eval()


class _TinyI3D(nn.Module):
    """The I3D call interface with a random 3D conv: [N,3,T,H,W] in [-1,1] -> [N,400]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 16, kernel_size=(3, 16, 16), stride=(2, 16, 16))
        self.head = nn.Linear(16, I3D_FEATURES)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        if resize:
            n, c, t, h, w = x.shape
            x = nn.functional.interpolate(x, size=(t, 224, 224), mode="trilinear", align_corners=False)
        h = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        return self.head(h)


@register_tiny_writer(FVD_I3D)
def write_tiny_i3d(dest: Path, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scripted = torch.jit.script(_TinyI3D().eval())
    scripted.save(str(dest))
