"""Reference attention as diffusers attention processors.

The ReferenceNet's self-attention processors *write* their input (the transformer block's norm1 output)
into a shared `ReferenceBank`; the denoiser's matching self-attention processors *read* it and attend
over their own tokens plus the bank's, the bank repeated for every frame. Blocks are matched by module
path ("up_blocks.1.attentions.0.transformer_blocks.0.attn1"), which is the same in the UNet2D ReferenceNet
and in the UNetMotionModel denoiser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin

SELF_ATTENTION_SUFFIX = ".attn1.processor"


class ReferenceBank:
    """Tokens written by the ReferenceNet for one forward pass, plus who may read them.

    `keep` (B,) bool says per sample whether the denoiser sees the reference (False = reference dropout
    or the unconditional branch of classifier-free guidance). The bank is cleared at the start of every
    forward pass, not after it: gradient checkpointing re-runs the readers during backward.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}
        self.keep: torch.Tensor | None = None
        self.enabled = True

    def clear(self) -> None:
        self.tokens = {}
        self.keep = None


class ReferenceWriteProcessor(AttnProcessor2_0):
    """ReferenceNet side: store the self-attention input, then attend as usual."""

    def __init__(self, bank: ReferenceBank, name: str) -> None:
        super().__init__()
        self.bank = bank
        self.name = name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.bank.tokens[self.name] = hidden_states  # (B, N, C)
        return super().__call__(attn, hidden_states, *args, **kwargs)


class ReferenceReadProcessor(AttnProcessor2_0):
    """Denoiser side: keys and values over cat([own tokens, reference tokens]); plain attention when off."""

    def __init__(self, bank: ReferenceBank, name: str) -> None:
        super().__init__()
        self.bank = bank
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        reference = self.bank.tokens.get(self.name)
        if not self.bank.enabled or reference is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if hidden_states.ndim != 3 or attention_mask is not None or attn.group_norm is not None:
            raise ValueError(
                f"{self.name}: reference attention expects plain (B*F, N, C) self-attention input"
            )
        batch_frames, _, channels = hidden_states.shape  # (B*F, N, C)
        batch = reference.shape[0]
        if reference.shape[-1] != channels or batch_frames % batch:
            raise ValueError(
                f"{self.name}: denoiser tokens {tuple(hidden_states.shape)} do not match reference tokens "
                f"{tuple(reference.shape)} (expected same channels and B*F divisible by B)"
            )
        num_frames = batch_frames // batch
        reference = reference.to(hidden_states.dtype).repeat_interleave(num_frames, dim=0)  # (B*F, M, C)
        context = torch.cat([hidden_states, reference], dim=1)  # (B*F, N+M, C)

        mask = None
        keep = self.bank.keep
        if keep is not None and not bool(keep.all()):
            # Dropped samples see only their own tokens: the reference keys are masked out.
            own = torch.ones(batch_frames, hidden_states.shape[1], dtype=torch.bool, device=keep.device)
            ref = keep.repeat_interleave(num_frames)[:, None].expand(-1, reference.shape[1])
            mask = torch.cat([own, ref], dim=1)[:, None, None, :]  # (B*F, 1, 1, N+M)

        heads = attn.heads
        query = attn.to_q(hidden_states).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B*F, h, N, d)
        key = attn.to_k(context).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B*F, h, N+M, d)
        value = attn.to_v(context).unflatten(-1, (heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # (B*F, N, C)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def self_attention_names(unet: ModelMixin) -> list[str]:
    """Processor keys of the spatial self-attentions (motion-module attentions excluded)."""
    return [
        name
        for name in unet.attn_processors
        if name.endswith(SELF_ATTENTION_SUFFIX) and ".motion_modules." not in name
    ]


def select_reference_layers(unet: ModelMixin, blocks: str) -> list[str]:
    """The self-attentions that take part: "midup" = mid block + up blocks, "full" = all of them."""
    names = self_attention_names(unet)
    if blocks == "full":
        return names
    if blocks == "midup":
        return [n for n in names if n.startswith(("mid_block.", "up_blocks."))]
    raise ValueError(f"reference blocks: expected 'midup' or 'full', got {blocks!r}")


def install_reference_attention(
    reference_net: ModelMixin, denoiser: ModelMixin, blocks: str, bank: ReferenceBank
) -> list[str]:
    """Install writers in the ReferenceNet and readers in the denoiser; return the matched layer keys.

    Raises ValueError naming both sides when a selected denoiser layer has no ReferenceNet counterpart.
    """
    wanted = select_reference_layers(denoiser, blocks)
    available = set(self_attention_names(reference_net))
    missing = [name for name in wanted if name not in available]
    if not wanted or missing:
        raise ValueError(
            f"reference attention ({blocks}): denoiser layers {missing or wanted} have no match among the "
            f"ReferenceNet's self-attentions {sorted(available)}"
        )
    reference_net.set_attn_processor(
        {
            name: ReferenceWriteProcessor(bank, name) if name in wanted else proc
            for name, proc in reference_net.attn_processors.items()
        }
    )
    denoiser.set_attn_processor(
        {
            name: ReferenceReadProcessor(bank, name) if name in wanted else proc
            for name, proc in denoiser.attn_processors.items()
        }
    )
    return wanted
