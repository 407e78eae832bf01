"""Background tokens: the reference image with its foreground blacked out, through a frozen CLIP image encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModelWithProjection

# OpenAI CLIP preprocessing statistics (CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def black_out_foreground(image: torch.Tensor, background_mask: torch.Tensor) -> torch.Tensor:
    """image (B, 3, H, W) in [-1, 1], background_mask (B, 1, H, W) with 1 = background -> black foreground."""
    return image * background_mask + (-1.0) * (1 - background_mask)


class BackgroundEncoder(nn.Module):
    """CLIP tokens [B, 1 + patches, projection_dim] as the cross-attention context of both UNets.

    tokens = visual_projection(post_layernorm(last_hidden_state)): every token (CLS and patches) goes
    through the same final norm and projection CLIP uses for its pooled embedding, so patch tokens live in
    the 768-d space SD1.5 cross-attention expects. No trainable projector (the authors have none).
    """

    def __init__(self, clip: CLIPVisionModelWithProjection) -> None:
        super().__init__()
        self.clip = clip
        self.image_size = int(clip.config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // int(self.clip.config.patch_size)) ** 2 + 1

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], square -> CLIP pixel values (B, 3, S, S)."""
        size = (self.image_size, self.image_size)
        image = F.interpolate(image.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        image = ((image + 1) / 2).clamp(0, 1)
        return ((image - self.mean) / self.std).to(self.clip.dtype)

    def forward(self, image: torch.Tensor, background_mask: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) in [-1, 1], background_mask (B, 1, H, W) -> tokens (B, 1 + patches, D)."""
        pixels = self.preprocess(black_out_foreground(image, background_mask))
        hidden = self.clip.vision_model(pixel_values=pixels).last_hidden_state  # (B, T, hidden)
        return self.clip.visual_projection(self.clip.vision_model.post_layernorm(hidden))  # (B, T, D)
