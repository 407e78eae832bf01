"""`model.animate` prepares its inputs the way training does: face-masked driving video, foreground mask."""

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from parsing_helpers import rigged_parsenet_dir
from skimage import data

from model import animate as animate_module
from model.preprocess import MASK_CHUNK, mask_faces, read_image
from pipeline.video import encode_mp4

FAST = ["resolution=64", "num_inference_steps=1", "guidance_scale=1", "context_frames=3", "context_overlap=0"]


@pytest.fixture(scope="module")
def hair_weights(tmp_path_factory):
    """A ParseNet that labels every pixel `hair`: not face (driving all black), but person (no background)."""
    return rigged_parsenet_dir(tmp_path_factory.mktemp("hair"), "hair")


@pytest.fixture
def inputs_seen(monkeypatch):
    """Record what the sampler receives, then run it (the real pipeline)."""
    seen = {}
    call = animate_module.MegActorPipeline.__call__

    def spy(self, reference, driving, background_mask=None, config=None):
        seen.update(reference=reference, driving=driving, background_mask=background_mask)
        return call(self, reference, driving, background_mask, config)

    monkeypatch.setattr(animate_module.MegActorPipeline, "__call__", spy)
    return seen


def run_cli(tmp_path, tiny_weights, settings):
    image = data.astronaut()
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    driving = tmp_path / "driving.mp4"
    driving.write_bytes(encode_mp4(np.stack([np.roll(image, 6 * i, axis=1)[::4, ::4] for i in range(3)]), 24))
    args = ["--ref", str(ref), "--driving", str(driving), "--weights", str(tiny_weights)]
    return animate_module.main([*args, "--out", str(tmp_path / "out.mp4"), *FAST, *settings])


def test_defaults_run_the_face_mask_and_foreground_stages(
    tmp_path, tiny_weights, hair_weights, inputs_seen, caplog
):
    caplog.set_level("INFO")
    assert run_cli(tmp_path, tiny_weights, [f"face_weights={hair_weights}", "parsing_size=64"]).is_file()
    assert inputs_seen["driving"].shape == (3, 3, 64, 64)
    assert torch.all(inputs_seen["driving"] == -1.0)  # face-mask stage: no face pixel, all black
    mask = inputs_seen["background_mask"]
    assert mask is not None and mask.shape == (1, 64, 64)
    assert torch.all(mask == 0.0)  # foreground stage: every pixel is person, none is background
    assert "foreground backend: parsing" in caplog.text


def test_opting_out_feeds_the_frames_unmasked(tmp_path, tiny_weights, inputs_seen):
    run_cli(tmp_path, tiny_weights, ["face_mask=none", "ref_mask=none"])  # no annotator weights needed
    assert inputs_seen["driving"].std() > 0.1  # the gray astronaut, not a masked-out frame
    assert inputs_seen["background_mask"] is None  # the sampler treats the whole reference as background
    with pytest.raises(ValueError, match="ref_mask"):
        run_cli(tmp_path, tiny_weights, ["ref_mask=densepose"])


def test_a_video_reference_gives_its_first_frame(tmp_path):
    """`--ref clip.mp4` takes the clip's first frame (the reference evaluation protocols use)."""
    import av

    frames = [np.full((48, 64, 3), value, np.uint8) for value in (200, 40, 40)]
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:  # written with PyAV directly, not our encoder
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    image = read_image(path)
    assert image.shape == (48, 64, 3)
    assert abs(float(image.mean()) - 200) < 3
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_chunked_face_masking_equals_one_call(tmp_path):
    """The progress bar's chunks (MASK_CHUNK frames per call) mask exactly as one call over all frames."""
    from pipeline.stages.face_mask import FaceMaskStage, write_tiny_parsenet
    from pipeline.weights import load_weight_specs

    path = tmp_path / load_weight_specs()["parsenet"].path
    path.parent.mkdir(parents=True)
    write_tiny_parsenet(path, 3)  # random weights: a mask that is neither empty nor full
    frames = np.stack([np.roll(data.astronaut(), 9 * i, axis=1)[::8, ::8] for i in range(11)])
    masked = mask_faces(frames, "facexlib", tmp_path, input_size=64)
    whole = FaceMaskStage(str(tmp_path), input_size=64).process({"frames": frames, "face_boxes": ""})
    kept = whole["face_mask"]
    assert len(frames) > MASK_CHUNK and 0 < kept.mean() < 1
    assert np.array_equal(masked, np.where(kept[..., None], frames, 0))


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        animate_module.main(["--help"])
    text = capsys.readouterr().out
    for cls in (animate_module.SamplingConfig, animate_module.AnimateOptions):
        for field in dataclasses.fields(cls):
            assert f"{field.name}=" in text, field.name
