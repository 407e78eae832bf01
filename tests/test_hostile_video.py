"""Damaged and odd frames and videos: each becomes a clip failure (ClipError with a reason, a failure
row in the DAG) or, where the file is valid but unusual (rotated, variable frame rate), a right sample.
Bad files are built here from the formats' documented facts (PNG chunks, zip headers, mp4 side data)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from lookalike import make_vfhq_clip

from pipeline.config import BuildConfig, VfhqConfig
from pipeline.dag import _decode_step
from pipeline.segment import decode_segment
from pipeline.sources.vfhq import scan_vfhq
from pipeline.video import (
    ClipError,
    crop_and_resize_frame,
    probe_video,
    read_image_frames,
    read_video_frames,
    square_crop_box,
)

REPO = Path(__file__).resolve().parent.parent
MEMORY_LIMIT_MB = 500


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 over type and data (PNG spec §5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, rows: int = 4) -> bytes:
    """An 8-bit RGB PNG whose IHDR declares width x height, holding only its first `rows` rows of
    zeros (a header is all a reader needs to be fooled into allocating the whole image)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes((1 + 3 * width) * rows), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


def frame_folder(folder: Path, frames: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(frames, 1):
        (folder / f"{k:08d}.png").write_bytes(data)
    return folder


def image_row(
    source: Path, width: int, height: int, stop: int, boxes: list | None = None, kind="frames"
) -> dict:
    """A manifest row (pipeline/manifest.py's fields) over frames [0, stop) of a folder or zip."""
    return {
        "key": source.name, "source": str(source), "source_kind": kind, "frame_start": 0, "frame_stop": stop,
        "width": width, "height": height, "face_boxes": json.dumps(boxes) if boxes else "",
        "member_prefix": "", "fixed_crop": "",
    }  # fmt: skip


def run_measured(code: str) -> dict:
    """Run `code` in a fresh interpreter (repo on the path); it sets RESULT. Returns RESULT plus the
    child's peak RSS (`maxrss_mb`: VmHWM, which, unlike ru_maxrss, is not inherited from pytest).

    The code should import only pipeline.segment / pipeline.video (~105 MB): pipeline.dag pulls in Ray
    and the stages (~800 MB), which would hide what the decode step itself takes."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import json as _json, re as _re
        _peak = _re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())
        print(_json.dumps({**RESULT, "maxrss_mb": int(_peak.group(1)) / 1024}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# Frame headers: decompression bombs and frames larger than the clip


def test_bomb_first_frame_is_a_scan_failure_naming_file_and_size(tmp_path: Path) -> None:
    bad = make_vfhq_clip(tmp_path, "bomb", 0, 4)
    good = make_vfhq_clip(tmp_path, "good", 1, 4)
    first = tmp_path / "extracted_cropped_face_results" / "bomb" / bad / "00000001.png"
    first.write_bytes(png_declaring(13400, 13400))  # PIL: DecompressionBombError (> 2 x 89.5 M pixels)
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert [r.clip_id for r in result.records] == [good]
    (failure,) = result.failures
    assert (failure.clip_id, failure.error) == (bad, "unreadable_frames")
    assert str(first) in failure.message and "13400x13400" in failure.message


def test_first_frame_larger_than_the_meta_source_is_refused(tmp_path: Path) -> None:
    # 2000x2000 is far under PIL's bomb limit, but larger than the 256x192 source the meta file gives.
    name = make_vfhq_clip(tmp_path, "big", 0, 4)
    first = tmp_path / "extracted_cropped_face_results" / "big" / name / "00000001.png"
    first.write_bytes(png_declaring(2000, 2000))
    result = scan_vfhq(tmp_path, VfhqConfig())
    assert result.records == []
    (failure,) = result.failures
    assert failure.error == "unreadable_frames" and "2000x2000" in failure.message
    assert "source frame of its meta file" in failure.message


def test_frame_of_another_size_is_refused_before_decoding(tmp_path: Path) -> None:
    good = png(np.full((48, 64, 3), 90, np.uint8))
    folder = frame_folder(tmp_path / "clip", [good, png_declaring(640, 480), good])
    with pytest.raises(
        ClipError, match="00000002.png: declares 640x480, the clip's frames are 64x48"
    ) as info:
        read_image_frames(folder, size=(64, 48))
    assert info.value.reason == "frame_size_mismatch"


def test_huge_declared_frame_fails_the_clip_in_little_memory(tmp_path: Path) -> None:
    good = png(np.full((96, 128, 3), 90, np.uint8))
    folder = frame_folder(tmp_path / "clip", [good, png_declaring(30000, 30000)])
    result = run_measured(f"""
        import json
        from pipeline.rows import guarded
        from pipeline.segment import decode_segment
        step = guarded("decode", lambda row: decode_segment(row, 512, 1.8, threads=1))
        row = {image_row(folder, 128, 96, 2)!r}
        out = step(row)
        RESULT = {{k: str(out[k]) for k in ("error_stage", "error", "message")}}
    """)
    assert (result["error_stage"], result["error"]) == ("decode", "frame_too_large")
    assert "00000002.png" in result["message"] and "30000x30000" in result["message"]
    assert result["maxrss_mb"] < MEMORY_LIMIT_MB


# ---------------------------------------------------------------------------------------------------
# Zip members: the declared size is checked before reading, and the read is bounded


def zip_with_lying_size(path: Path, member: str, data: bytes, declared: int) -> None:
    """A stored zip whose member's uncompressed size (local header offset 22, central directory
    offset 24, APPNOTE 4.3.7 / 4.3.12) says `declared` instead of len(data)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(member, data)
    raw = bytearray(path.read_bytes())
    local = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    raw[local + 22 : local + 26] = struct.pack("<I", declared)
    raw[central + 24 : central + 28] = struct.pack("<I", declared)
    path.write_bytes(bytes(raw))


def test_zip_member_declaring_two_gigabytes_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "clip.zip"
    zip_with_lying_size(path, "00000001.png", png(np.zeros((48, 64, 3), np.uint8)), 2_000_000_000)
    with pytest.raises(ClipError, match=r"clip.zip:00000001.png: 2,000,000,000 bytes") as info:
        read_image_frames(path, size=(64, 48))
    assert info.value.reason == "frame_too_large"


def test_zip_member_larger_than_a_frame_fails_in_little_memory(tmp_path: Path) -> None:
    # A real, honestly declared 600 MB member (a valid PNG header, then zeros) deflated to ~600 KB.
    path = tmp_path / "clip.zip"
    frame = png(np.zeros((48, 64, 3), np.uint8))
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("00000001.png", "w", force_zip64=True) as member,
    ):
        member.write(frame)
        block = bytes(1 << 24)
        for _ in range(36):
            member.write(block)
    result = run_measured(f"""
        import json
        from pathlib import Path
        from pipeline.video import read_image_frames
        try:
            read_image_frames(Path({str(path)!r}), size=(64, 48))
            RESULT = {{"reason": "none"}}
        except Exception as exc:
            RESULT = {{"reason": getattr(exc, "reason", type(exc).__name__), "message": str(exc)}}
    """)
    assert result["reason"] == "frame_too_large" and "00000001.png" in result["message"]
    assert result["maxrss_mb"] < MEMORY_LIMIT_MB


# ---------------------------------------------------------------------------------------------------
# Face boxes outside the frame, crops larger than the frame, tiny crops


def test_face_mostly_outside_the_frame_fails_the_clip() -> None:
    # A VFHQ row `150 110 400 400` (x0 y0 w h) in a 330-px crop: a quarter of the box is inside.
    with pytest.raises(ClipError, match="outside the 330x330 frame") as info:
        square_crop_box([[150, 110, 550, 510]], 330, 330, 1.8)
    assert info.value.reason == "face_outside"


def test_a_face_near_the_border_keeps_its_small_pad() -> None:
    # Padded past the left border so the face stays centred (as before), also when the square is as
    # large as the frame; a face partly outside (here 20 %) is still a sample.
    assert square_crop_box([[5, 100, 45, 140]], 330, 330, 1.8) == (-11, 84, 61, 156)
    assert square_crop_box([[100, 100, 300, 300]], 330, 330, 1.8) == (35, 35, 365, 365)
    assert square_crop_box([[-10, 100, 40, 150]], 330, 330, 1.8) == (-30, 80, 60, 170)


def test_crop_pads_only_the_patch_and_matches_a_padded_frame() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (90, 120, 3), np.uint8)
    box = (-11, 30, 61, 102)
    pad = 12
    reference = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    patch = reference[box[1] + pad : box[3] + pad, box[0] + pad : box[2] + pad]
    expected = cv2.resize(patch, (64, 64), interpolation=cv2.INTER_AREA)
    assert np.array_equal(crop_and_resize_frame(frame, box, 64), expected)


def test_crop_box_far_outside_the_frame_is_refused() -> None:
    frame = np.zeros((50, 60, 3), np.uint8)
    with pytest.raises(ValueError, match="not a crop of the 60x50 frame"):
        crop_and_resize_frame(frame, (-26000, -25000, 1000, 2000), 32)


def test_huge_face_box_row_fails_fast_in_little_memory(tmp_path: Path) -> None:
    # A VFHQ row `-26000 30 26100 50` on 330-px frames, 20 of them.
    folder = frame_folder(tmp_path / "clip", [png(np.full((330, 330, 3), 120, np.uint8))] * 20)
    boxes = [[-26000, 30, 100, 80]] * 20
    result = run_measured(f"""
        import json, time
        from pipeline.rows import guarded
        from pipeline.segment import decode_segment
        step = guarded("decode", lambda row: decode_segment(row, 512, 1.8, threads=1))
        row = {image_row(folder, 330, 330, 20, boxes)!r}
        started = time.perf_counter()
        out = step(row)
        RESULT = {{"error": out["error"], "message": out["message"], "seconds": time.perf_counter() - started}}
    """)
    assert result["error"] == "face_outside" and str(folder) in result["message"]
    assert result["maxrss_mb"] < MEMORY_LIMIT_MB and result["seconds"] < 5


def test_tiny_source_is_too_small_not_upscaled(tmp_path: Path) -> None:
    folder = frame_folder(tmp_path / "clip", [png(np.full((1, 1, 3), 200, np.uint8))] * 3)
    row = _decode_step(BuildConfig(resolution=64))(image_row(folder, 1, 1, 3))
    assert (row["error_stage"], row["error"]) == ("decode", "too_small")
    assert str(folder) in row["message"] and "min_face_px 64" in row["message"]


def test_min_face_px_is_the_limit(tmp_path: Path) -> None:
    folder = frame_folder(tmp_path / "clip", [png(np.full((40, 40, 3), 200, np.uint8))] * 2)
    assert decode_segment(image_row(folder, 40, 40, 2), 32, 1.8, min_face_px=40)["frames"].shape == (
        2,
        32,
        32,
        3,
    )
    with pytest.raises(ClipError, match="under min_face_px 41"):
        decode_segment(image_row(folder, 40, 40, 2), 32, 1.8, min_face_px=41)


# ---------------------------------------------------------------------------------------------------
# Videos: display rotation, variable frame rate


def encode_h264(frames: list[np.ndarray], setup=None, pts_ms: list[int] | None = None) -> bytes:
    """An mp4 of RGB frames; `setup(stream)` before encoding; `pts_ms`: explicit timestamps in ms."""
    buffer = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if setup:
            setup(stream)
        for k, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def portrait_picture() -> np.ndarray:
    """32 wide, 64 tall: red top-left quarter, blue bottom half, grey elsewhere."""
    image = np.full((64, 32, 3), 128, np.uint8)
    image[:16, :16] = (255, 0, 0)
    image[32:] = (0, 0, 255)
    return image


def test_rotated_phone_video_is_decoded_as_displayed(tmp_path: Path) -> None:
    shown = portrait_picture()
    # The display matrix rotates the coded picture 90° clockwise (-90 counter-clockwise) for display,
    # so the coded picture is the shown one turned 90° counter-clockwise: 64 wide, 32 tall.
    coded = np.ascontiguousarray(np.rot90(shown, 1))
    path = tmp_path / "phone.mp4"
    path.write_bytes(encode_h264([coded] * 5, setup=lambda s: s.set_display_rotation(-90)))
    info = probe_video(path)
    assert (info.width, info.height) == (32, 64)
    frames = read_video_frames(path)
    assert frames.shape == (5, 64, 32, 3)
    assert np.abs(frames[0].astype(int) - shown).mean() < 6


def test_unrotated_video_is_unchanged(tmp_path: Path) -> None:
    shown = portrait_picture()
    path = tmp_path / "plain.mp4"
    path.write_bytes(encode_h264([shown] * 3))
    assert (probe_video(path).width, probe_video(path).height) == (32, 64)
    assert np.abs(read_video_frames(path)[0].astype(int) - shown).mean() < 6


def numbered_frames(count: int) -> list[np.ndarray]:
    """Frames whose grey level says their number (k * 2)."""
    return [np.full((32, 32, 3), 2 * k, np.uint8) for k in range(count)]


def test_variable_frame_rate_video_loses_no_frame() -> None:
    # 100 frames, gaps alternating 10 ms and 70 ms: average 40 ms (25 fps), but a 10 ms gap puts two
    # frames on one round(t x fps).
    pts = [0]
    for k in range(99):
        pts.append(pts[-1] + (10 if k % 2 == 0 else 70))
    data = encode_h264(numbered_frames(100), pts_ms=pts)
    frames = read_video_frames(data, 0, 100)
    levels = frames[:, 16, 16, 0].astype(int)
    assert len(frames) == 100 and np.abs(levels - 2 * np.arange(100)).max() <= 3
    part = read_video_frames(data, 10, 20)
    assert np.array_equal(part, frames[10:20])
