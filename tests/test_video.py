from __future__ import annotations

import io
import zipfile
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.video import (
    EncodeSettings,
    centre_square_box,
    crop_and_resize,
    encode_mp4,
    probe_video,
    read_image_frames,
    read_video_frames,
    square_crop_box,
)


def smooth_frames(count: int, size: int = 64) -> np.ndarray:
    """Frames with a gradient and a moving disc: compressible, and each frame differs."""
    ys, xs = np.mgrid[0:size, 0:size]
    frames = np.empty((count, size, size, 3), np.uint8)
    for t in range(count):
        frames[t, ..., 0] = (xs * 4) % 256
        frames[t, ..., 1] = (ys * 4) % 256
        frames[t, ..., 2] = 0
        cv2.circle(frames[t], (8 + t, size // 2), 6, (255, 255, 255), -1)
    return frames


def test_square_crop_box_covers_the_union_grown_by_scale() -> None:
    box = square_crop_box([[10, 20, 30, 40], [20, 30, 50, 50]], 200, 200, scale=2.0)
    x0, y0, x1, y1 = box
    assert x1 - x0 == y1 - y0 == 80  # union is 40 x 30 -> side 40 * 2
    assert (x0 + x1) / 2 == pytest.approx(30) and (y0 + y1) / 2 == pytest.approx(35)


def test_square_crop_box_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="no face boxes"):
        square_crop_box([], 10, 10, 1.5)


def test_crop_pads_outside_the_frame_and_keeps_the_face_in_place() -> None:
    frames = np.zeros((1, 100, 100, 3), np.uint8)
    frames[0, 0:20, 0:20] = 255  # a white "face" in the corner
    out = crop_and_resize(frames, (-20, -20, 40, 40), 60)  # square reaching past the top-left
    assert out.shape == (1, 60, 60, 3)
    assert out[0, 5, 5].max() == 0  # padding is black
    assert out[0, 30, 30].min() == 255  # the face sits where the box puts it


def test_centre_square_box() -> None:
    assert centre_square_box(200, 100) == (50, 0, 150, 100)


def test_encode_decode_round_trip(tmp_path: Path) -> None:
    frames = smooth_frames(20)
    data = encode_mp4(frames, 25.0)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (20, 64, 64) and info.fps == pytest.approx(25.0)
    decoded = read_video_frames(path)
    assert decoded.shape == frames.shape
    mse = np.mean((decoded.astype(float) - frames) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30  # PSNR: crf 18 is near lossless
    part = read_video_frames(data, 5, 12)
    assert part.shape[0] == 7 and np.array_equal(part, decoded[5:12])


def test_reading_past_the_end_is_an_error() -> None:
    with pytest.raises(ValueError, match="ended after 20 frames"):
        read_video_frames(encode_mp4(smooth_frames(20), 25.0), 10, 30)


def test_encode_rejects_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even sizes"):
        encode_mp4(np.zeros((2, 63, 64, 3), np.uint8), 25.0)


def test_frame_folder_and_zip_read_the_same(tmp_path: Path) -> None:
    frames = smooth_frames(6)
    folder = tmp_path / "clip"
    folder.mkdir()
    with zipfile.ZipFile(tmp_path / "clip.zip", "w") as archive:
        for t, frame in enumerate(frames):
            png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()
            (folder / f"{t:08d}.png").write_bytes(png)
            archive.writestr(f"clip/{t:08d}.png", png)
            archive.writestr(f"other/{t:08d}.png", png[:-1])  # a second clip in the same zip
    assert np.array_equal(read_image_frames(folder), frames)  # PNG is lossless
    assert np.array_equal(read_image_frames(tmp_path / "clip.zip", 2, 5, prefix="clip/"), frames[2:5])


def test_video_range_read_seeks_and_transforms(tmp_path: Path) -> None:
    frames = smooth_frames(60)
    data = encode_mp4(frames, 25.0, EncodeSettings(gop=8))
    full = read_video_frames(data)
    part = read_video_frames(data, 37, 45, transform=lambda f: f[:10, :12])
    assert part.shape == (8, 10, 12, 3)
    assert np.array_equal(part, full[37:45, :10, :12])


def test_unreadable_frame_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "00000000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a decodable image"):
        read_image_frames(tmp_path)


def test_encoded_video_is_tagged_bt709_and_round_trips_saturated_colours() -> None:
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    frames[:, :, :21], frames[:, :, 21:42], frames[:, :, 42:] = [220, 30, 40], [30, 200, 60], [40, 60, 210]
    data = encode_mp4(frames, 25.0, EncodeSettings(crf=8))
    with av.open(io.BytesIO(data)) as container:
        context = container.streams.video[0].codec_context
        tags = (context.colorspace, context.color_primaries, context.color_trc, context.color_range)
    assert tags == (1, 1, 1, 1)  # BT.709 matrix, primaries and transfer; limited (MPEG) range
    decoded = read_video_frames(data).astype(int)
    for column in (10, 31, 52):  # the middle of each colour band
        assert np.abs(decoded[:, 8:56, column] - frames[:, 8:56, column]).mean() < 4
