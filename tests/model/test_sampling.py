import cv2
import numpy as np
import pytest
import torch
from skimage import data

from model.animate import main as animate
from model.loading import load_megactor
from model.preprocess import prepare_driving
from model.sampling import MegActorPipeline, SamplingConfig, context_windows
from pipeline.video import encode_mp4, probe_video, read_video_frames

FAST = dict(num_inference_steps=3, context_frames=4, context_overlap=2, progress=False)


def test_context_windows_cover_every_frame_with_overlap():
    assert context_windows(10, 16, 8) == [range(10)]
    assert context_windows(24, 16, 8) == [range(0, 16), range(8, 24)]
    assert context_windows(30, 16, 8) == [range(0, 16), range(8, 24), range(14, 30)]
    with pytest.raises(ValueError):
        context_windows(30, 8, 8)


def test_sampling_is_seeded_and_deterministic(tiny_weights):
    pipe = MegActorPipeline(load_megactor(tiny_weights))
    gen = torch.Generator().manual_seed(0)
    reference, driving = (
        torch.rand(3, 64, 64, generator=gen) * 2 - 1,
        torch.rand(7, 3, 64, 64, generator=gen) * 2 - 1,
    )
    runs = [pipe(reference, driving, config=SamplingConfig(seed=s, eta=0.5, **FAST)) for s in (1, 1, 2)]
    assert runs[0].shape == (7, 3, 64, 64) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_driving_preprocessing_is_square_gray_and_scaled():
    frames = np.zeros((2, 40, 60, 3), np.uint8)
    frames[..., 0] = 255  # pure red
    driving = prepare_driving(frames, 32)
    assert driving.shape == (2, 3, 32, 32)
    assert torch.equal(driving[:, 0], driving[:, 2])
    assert abs(driving.mean().item() - (76 / 127.5 - 1)) < 0.02  # BT.601 luma of red is 76


def test_cli_writes_a_playable_video_of_the_right_length(tiny_weights, tmp_path):
    image = data.astronaut()  # a real face, bundled with scikit-image
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    frames = np.stack([np.roll(image, 6 * i, axis=1)[::4, ::4] for i in range(9)])
    driving = tmp_path / "driving.mp4"
    driving.write_bytes(encode_mp4(frames, 24))
    out = tmp_path / "out" / "anim.mp4"
    args = ["--ref", str(ref), "--driving", str(driving), "--weights", str(tiny_weights), "--out", str(out)]
    # the inputs as given: the default face-mask / foreground stages are tested in test_animate_inputs.py
    settings = ["resolution=64", "max_frames=7", "face_mask=none", "ref_mask=none"]
    animate([*args, *settings, *[f"{k}={v}" for k, v in FAST.items()]])
    info = probe_video(out)
    assert (info.num_frames, info.width, info.height, info.fps) == (7, 64, 64, 24)
    assert read_video_frames(out).shape == (7, 64, 64, 3)
    with pytest.raises(ValueError, match="unknown settings"):
        animate([*args, "colour=blue"])
