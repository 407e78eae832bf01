"""Stylisation stage on the tiny SDXL-Turbo folder: loading, outputs, seeding, bucket gating, failures."""

import json
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from transformers import CLIPTokenizer

from pipeline.rows import rows_to_batch
from pipeline.stages.stylise import DEFAULT_PROMPT, StyliseStage, clip_seed
from pipeline.weights import MissingWeights, ensure_tiny_weights, load_weight_specs

R = 64  # frame side in these tests (the demo uses 256, real data 512)
FAST = {"size": 64, "steps": 2, "strength": 0.5}  # 1 denoising step, as in the sdxl-turbo img2img example


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    return ensure_tiny_weights(tmp_path_factory.mktemp("weights"), ["sdxl_turbo"])


@pytest.fixture(scope="module")
def stage(weights_dir):
    return StyliseStage(str(weights_dir), frame_batch=2, **FAST)


def face_frames(count: int) -> np.ndarray:
    """A real face (skimage astronaut), resized to R, shifted a little per frame."""
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float()
    image = torch.nn.functional.interpolate(image, size=(R, R), mode="bilinear", antialias=True)
    base = image[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return np.stack([np.roll(base, shift, axis=1) for shift in range(count)])


def make_row(bucket: str, clip_id: str = "clipA", frames: np.ndarray | None = None) -> dict:
    frames = face_frames(5) if frames is None else frames
    return {
        "key": f"demo__{clip_id}__s000",
        "clip_id": clip_id,
        "dataset": "demo",
        "identity": "id0",
        "bucket": bucket,
        "frames": frames,
        "face_boxes": "",
        "error_stage": "",
        "error": "",
        "message": "",
        "timings": "{}",
        "annotations": "[]",
        "weights": "",
        # What the swap stage (earlier in the DAG) leaves on rows it skips.
        "driving_frames": np.zeros((0, 1, 1, 3), np.uint8),
        "swap_source_identity": "",
    }


class UnetCalls:
    """Counts forward passes of the pipeline's UNet (a real forward hook, no mock)."""

    def __init__(self, stage):
        self.count = 0
        self.handle = stage.pipe.unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_tiny_folder_loads_like_sdxl_turbo(weights_dir):
    folder = weights_dir / load_weight_specs()["sdxl_turbo"].path
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    for part in ("unet", "vae"):
        assert (folder / part / "diffusion_pytorch_model.safetensors").is_file()
    for part in ("text_encoder", "text_encoder_2"):
        assert (folder / part / "model.safetensors").is_file()
    for part in ("tokenizer", "tokenizer_2"):
        assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / part).iterdir()}

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, local_files_only=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden
    proj = pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == proj + 6 * unet.addition_time_embed_dim
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer_2.pad_token == "!"
    assert len(pipe.tokenizer(DEFAULT_PROMPT).input_ids) <= pipe.tokenizer.model_max_length


def test_outputs_shapes_dtypes_and_fields(stage):
    row = make_row("style")
    out = stage.process(dict(row))
    driving = out["driving_frames"]
    assert driving.shape == row["frames"].shape and driving.dtype == np.uint8
    assert not np.array_equal(driving, row["frames"])  # the diffusion really ran
    assert out["style_prompt"] == DEFAULT_PROMPT
    assert isinstance(out["style_seed"], int) and out["style_seed"] == clip_seed(0, "clipA")
    assert json.loads(out["weights"]) == {"sdxl_turbo": "tiny"}


def test_black_clip_without_a_face_is_stylised(stage):
    frames = np.zeros((3, R, R, 3), np.uint8)
    out = stage.process(make_row("style", frames=frames))
    assert out["driving_frames"].shape == frames.shape and out["driving_frames"].dtype == np.uint8


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_same_seed_same_output_and_other_clip_other_seed(stage, weights_dir):
    frames = face_frames(3)
    first = stage.process(make_row("style", "clipA", frames))
    again = stage.process(make_row("style", "clipA", frames))
    np.testing.assert_array_equal(first["driving_frames"], again["driving_frames"])
    # Another actor with another frame_batch: the same noise, so equal up to float batching (1 level).
    other_batch = StyliseStage(str(weights_dir), frame_batch=3, **FAST).process(
        make_row("style", "clipA", frames)
    )
    assert max_abs_diff(other_batch["driving_frames"], first["driving_frames"]) <= 1
    other = stage.process(make_row("style", "clipB", frames))
    assert other["style_seed"] != first["style_seed"]
    assert max_abs_diff(other["driving_frames"], first["driving_frames"]) > 10
    assert clip_seed(1, "clipA") != clip_seed(0, "clipA") and clip_seed(0, "clipA") == clip_seed(0, "clipA")


def test_every_frame_of_a_clip_gets_the_same_noise(stage):
    # Identical input frames: identical noise <=> identical output. frame_batch=2 puts frames 0 and 1 in
    # one pipeline call (bit-identical) and frame 2 in the next (equal up to float batching, 1 level).
    frames = np.repeat(face_frames(1), 3, axis=0)
    driving = stage.process(make_row("style", frames=frames))["driving_frames"]
    np.testing.assert_array_equal(driving[1], driving[0])
    assert max_abs_diff(driving[2], driving[0]) <= 1
    # The check can fail: one shared generator (noise differing per frame) gives clearly different frames.
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    shared = stage.pipe(
        image=images,
        prompt_embeds=stage.prompt_embeds.repeat(3, 1, 1),
        pooled_prompt_embeds=stage.pooled_embeds.repeat(3, 1),
        strength=0.5,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    shared = (shared * 255).round().astype(np.uint8)
    assert max_abs_diff(shared[0], shared[1]) > 10


def test_only_the_style_bucket_pays_for_sdxl(stage):
    swap = make_row("swap", "clipS")
    swapped = np.full_like(swap["frames"], 7)
    swap.update(driving_frames=swapped, swap_source_identity="id3")  # as the swap stage leaves it
    real = make_row("real", "clipR")
    with UnetCalls(stage) as calls:
        out = stage(rows_to_batch([real, swap]))
    assert calls.count == 0
    assert out["driving_frames"][0].shape[0] == 0 and list(out["style_seed"]) == [-1, -1]
    np.testing.assert_array_equal(out["driving_frames"][1], swapped)
    assert all("stylise" not in json.loads(a) for a in out["annotations"])

    with UnetCalls(stage) as calls:
        out = stage(rows_to_batch([real, make_row("style", "clipY"), swap]))
    assert calls.count == 3  # 5 frames in batches of 2 -> 3 pipeline calls of 1 denoising step
    assert [json.loads(a) for a in out["annotations"]] == [[], ["stylise"], []]
    assert out["driving_frames"][1].shape == (5, R, R, 3) and out["style_seed"][1] == clip_seed(0, "clipY")


def test_failure_inside_the_stage_becomes_a_failure_row(stage):
    bad = make_row("style", "clipBad", frames=np.zeros((2, R, R), np.uint8))  # no colour axis
    out = stage(rows_to_batch([bad, make_row("real", "clipR")]))
    assert list(out["error_stage"]) == ["stylise", ""]
    assert "uint8 [T,R,R,3]" in out["message"][0]


def test_missing_and_corrupt_folders_give_clear_errors(weights_dir, tmp_path):
    with pytest.raises(MissingWeights, match="model_index.json"):
        StyliseStage(str(tmp_path / "empty"), **FAST)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(weights_dir, corrupt)
    unet_file = corrupt / "sdxl-turbo" / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.write_bytes(unet_file.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="could not load the SDXL pipeline"):
        StyliseStage(str(corrupt), **FAST)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 1, "strength": 0.5}, "steps \\* strength"),
        ({"size": 100}, "size"),
        ({"strength": 0.0}, "strength"),
        ({"dtype": "int8"}, "dtype"),
        ({"frame_batch": 0}, "frame_batch"),
    ],
)
def test_bad_options_are_named(weights_dir, options, message):
    with pytest.raises(ValueError, match=message):
        StyliseStage(str(weights_dir), **{**FAST, **options})
