"""DrivenEncoder: a light conv stack that turns each masked grayscale driving frame into 4 latent-size maps."""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv2d:
    # k3 s1 keeps the size, k4 s2 halves it exactly (pad 1), so 512 -> 64 after three halvings.
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2 if stride == 1 else 1)


class DrivenEncoder(nn.Module):
    """Per-frame encoder of the driving video (REFERENCE.md §2), 8x downsampling like the VAE.

    Input frames are grayscale replicated to 3 channels in [-1, 1]; the output has `out_channels` maps
    that fill the last 4 of the denoiser's 13 input channels. With `ada=True`, a branch reads the
    reference image and modulates the 128-channel feature as x * (1 + scale) + shift; its last layer is
    zero so the branch starts as the identity.
    """

    def __init__(self, out_channels: int = 4, ada: bool = False, ada_dim: int = 512) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, 3, 3, 1), nn.SiLU(), _conv(3, 16, 4, 2), nn.SiLU(),
            _conv(16, 16, 3, 1), nn.SiLU(), _conv(16, 32, 4, 2), nn.SiLU(),
            _conv(32, 32, 3, 1), nn.SiLU(), _conv(32, 64, 4, 2), nn.SiLU(),
            _conv(64, 64, 3, 1), nn.SiLU(), _conv(64, 128, 3, 1), nn.SiLU(),
        )  # fmt: skip
        self.out = nn.Conv2d(128, out_channels, 1)
        self.ada = AdaBranch(feature_channels=128, dim=ada_dim) if ada else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        if self.ada is not None:
            self.ada.zero_last()

    def forward(self, frames: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """frames (B, F, 3, H, W), reference (B, 3, H, W) when ada -> (B, F, out_channels, H/8, W/8)."""
        batch, num_frames = frames.shape[:2]
        x = self.body(frames.flatten(0, 1))  # (B*F, 128, H/8, W/8)
        if self.ada is not None:
            if reference is None:
                raise ValueError("DrivenEncoder(ada=True) needs the reference image, got None")
            scale, shift = self.ada(reference).repeat_interleave(num_frames, dim=0).chunk(2, dim=1)
            x = x * (1 + scale[..., None, None]) + shift[..., None, None]
        x = self.out(x)
        return x.unflatten(0, (batch, num_frames))


class AdaBranch(nn.Module):
    """Reference image -> conv pyramid -> `dim`-d vector -> MLP -> (scale, shift) for the driving feature."""

    def __init__(self, feature_channels: int = 128, dim: int = 512) -> None:
        super().__init__()
        widths = (3, 32, 64, 128, 256, dim)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [_conv(cin, cout, 4, 2), nn.SiLU()]
        self.pyramid = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 2 * feature_channels))

    def zero_last(self) -> None:
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """reference (B, 3, H, W) -> (B, 2 * feature_channels) = cat(scale, shift)."""
        return self.mlp(self.pyramid(reference))
