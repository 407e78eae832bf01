"""A tiny random-weight SDXL-Turbo folder in the real diffusers layout, for the `tiny` profile.

The folder holds what stabilityai/sdxl-turbo ships (model_index.json naming StableDiffusionXLPipeline,
unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), every model in
safetensors, so `StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, local_files_only=True)` reads
it exactly as it reads the real one. Sizes are tiny but keep SDXL's wiring:

- UNet cross-attention width = text_encoder hidden size + text_encoder_2 hidden size (768 + 1280 in SDXL);
- `text_time` added conditioning: projection_class_embeddings_input_dim = text_encoder_2 projection_dim
  + 6 x addition_time_embed_dim (1280 + 6 x 256 = 2816 in SDXL: original size, crop corner, target size);
- four VAE levels, so the latent is 1/8 of the image side as in SDXL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.weights import register_tiny_writer

TINY_MARKER = "megactor_tiny.json"  # marks a generated folder; diffusers ignores unknown files

TEXT_HIDDEN = 32  # text_encoder (CLIP ViT-L/14 text model in SDXL: 768)
TEXT2_HIDDEN = 32  # text_encoder_2 (OpenCLIP bigG: 1280)
TEXT2_PROJECTION = 32  # text_encoder_2 projection_dim (1280), the pooled embedding width
TIME_EMBED = 8  # UNet addition_time_embed_dim (256)
MAX_TOKENS = 77  # CLIP context length; the pipelines pad every prompt to it


def _tokenizer_files(folder: Path, pad_token: str, words: list[str]) -> None:
    """vocab.json + merges.txt in CLIP's BPE format, covering printable ASCII so any prompt tokenizes."""
    folder.mkdir(parents=True)
    chars = [chr(code) for code in range(33, 127)]
    vocab: dict[str, int] = {}
    for piece in [*chars, *(c + "</w>" for c in chars)]:
        vocab[piece] = len(vocab)
    # Merges built from `words` (pairs left to right), so common words become few tokens as with the
    # real BPE and the default prompt fits the 77-token context untruncated.
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "do_lower_case": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def _vocab_size(folder: Path) -> int:
    return len(json.loads((folder / "vocab.json").read_text()))


def _text_config(vocab_size: int, hidden: int, projection: int, act: str, eos_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state, so at least two layers
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=act,
        bos_token_id=eos_id - 1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


@register_tiny_writer("sdxl_turbo")
def write_tiny_sdxl_turbo(dest: Path, seed: int) -> None:
    """Write a random-weight SDXL-Turbo diffusers folder at `dest`."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    dest.mkdir(parents=True)
    from pipeline.stages.stylise import DEFAULT_PROMPT  # lazy: stylise imports this module

    # The tiny tokenizers' merges come from the default prompt's words; other text falls back to letters.
    words = sorted(set(re.findall(r"[a-z]+", DEFAULT_PROMPT.lower())))
    _tokenizer_files(dest / "tokenizer", pad_token="<|endoftext|>", words=words)
    _tokenizer_files(
        dest / "tokenizer_2", pad_token="!", words=words
    )  # SDXL's second tokenizer pads with "!"
    vocab_size = _vocab_size(dest / "tokenizer")
    eos_id = vocab_size - 1

    text_encoder = CLIPTextModel(_text_config(vocab_size, TEXT_HIDDEN, TEXT_HIDDEN, "quick_gelu", eos_id))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(vocab_size, TEXT2_HIDDEN, TEXT2_PROJECTION, "gelu", eos_id)
    )
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=TEXT_HIDDEN + TEXT2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TEXT2_PROJECTION + 6 * TIME_EMBED,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=256,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
        force_upcast=True,
    )
    # As sdxl-turbo ships it: Euler ancestral, SD's scaled-linear betas, trailing timestep spacing.
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    text_encoder.save_pretrained(dest / "text_encoder", safe_serialization=True)
    text_encoder_2.save_pretrained(dest / "text_encoder_2", safe_serialization=True)
    unet.save_pretrained(dest / "unet", safe_serialization=True)
    vae.save_pretrained(dest / "vae", safe_serialization=True)
    scheduler.save_pretrained(dest / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.24.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (dest / "model_index.json").write_text(json.dumps(model_index, indent=2))
    (dest / TINY_MARKER).write_text(json.dumps({"profile": "tiny", "seed": seed}))
