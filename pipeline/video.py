"""Video and frame I/O: decode a frame range, crop around faces, resize, encode H.264 in memory.

Everything here works on uint8 RGB arrays shaped (T, H, W, 3) so stages never see a codec.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BT709, LIMITED_RANGE = 1, 1  # AVCOL_SPC / AVCOL_PRI / AVCOL_TRC_BT709, AVCOL_RANGE_MPEG
# Frames above this many pixels are refused before decoding (config: max_frame_pixels). 8192² holds
# any 8K source; one decoded frame of that size is 200 MB of RGB.
MAX_FRAME_PIXELS = 8192 * 8192
# An image file holds at most 8 bytes per pixel (16-bit RGBA stored uncompressed) plus its metadata
# chunks: a frame file or zip member larger than that is not the frame it claims to be.
MAX_BYTES_PER_PIXEL = 8
FRAME_FILE_MARGIN = 4 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC, which share the range).
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ClipError(ValueError):
    """A clip that cannot give a good sample; `reason` becomes the failure row's error code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EncodeSettings:
    """libx264 settings for the shard videos.

    crf 18 is visually lossless for faces; a short GOP keeps random access cheap for the trainer,
    which decodes only the frames a sample needs.
    """

    crf: int = 18
    preset: str = "veryfast"
    gop: int = 16
    threads: int = 1  # one Ray task per CPU: more threads only contend


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, fps and displayed size (rotation applied) from the container header and the first
    frame; no full decode."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        num_frames = stream.frames
        if num_frames <= 0 and stream.duration and stream.time_base and fps:
            num_frames = round(float(stream.duration * stream.time_base) * fps)
        if num_frames <= 0:
            raise ValueError(f"{path}: container does not say how many frames it holds")
        width, height = stream.codec_context.width, stream.codec_context.height
        # The display matrix travels on the decoded frames; one frame tells the rotation.
        first = next(container.decode(stream), None)
        if first is not None and quarter_turns(first.rotation, str(path)) % 2:
            width, height = height, width
        return VideoInfo(num_frames, fps, width, height)


def quarter_turns(rotation: float, what: str) -> int:
    """The counter-clockwise quarter turns a display matrix asks for (PyAV's VideoFrame.rotation)."""
    turns = round(rotation / 90)
    if abs(rotation - 90 * turns) > 1:
        raise ClipError(
            "unsupported_rotation", f"{what}: display rotation {rotation:g}° is not a quarter turn"
        )
    return turns % 4


def displayed(image: np.ndarray, turns: int) -> np.ndarray:
    """A decoded frame as players show it: rotated counter-clockwise by `turns` quarter turns."""
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


FrameTransform = Callable[[np.ndarray], np.ndarray]


def _stack(frames: list[np.ndarray], what: str) -> np.ndarray:
    if not frames:
        raise ValueError(f"{what}: no frames decoded in the requested range")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise ValueError(f"{what}: frames differ in size: {sorted(shapes)}")
    return np.stack(frames)


def iter_video_frames(
    source: str | Path | bytes,
    start: int = 0,
    stop: int | None = None,
    threads: int = 0,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) for the frames [start, stop) of a video, in the order they are shown.

    Seeks to the keyframe before `start` instead of decoding from the first frame: a clip at minute 5
    of a whole source video (raw CelebV-HQ) costs its own GOPs, not 9,000 frames. As a time-based cut
    (ffmpeg -ss) does, the first frame at or after `start / fps` is frame `start` and the frames after
    it are counted, so a variable-frame-rate video loses no frame to timestamps closer than 1 / fps.
    """
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with av.open(handle) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        check_frame_size((width, height), "the video stream", None, max_pixels)
        if threads == 1:
            stream.codec_context.thread_count = 1
        else:
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        time_base = stream.time_base
        origin = stream.start_time or 0
        if fps <= 0 or time_base is None:
            raise ValueError("the video stream has no frame rate or time base")
        # Half a frame early, so a frame exactly at `start` is not skipped by rounding.
        first_time = (start - 0.5) / fps
        if start > 0:
            target = origin + int(first_time / time_base)
            container.seek(max(origin, target), backward=True, any_frame=False, stream=stream)
        index: int | None = None
        for frame in container.decode(stream):
            if index is None:
                if frame.pts is None:
                    raise ValueError("a decoded frame has no timestamp")
                if float((frame.pts - origin) * time_base) < first_time:
                    continue  # before the range
                index = start
            else:
                index += 1
            if stop is not None and index >= stop:
                return
            yield index, frame


def read_video_frames(
    source: str | Path | bytes,
    start: int = 0,
    stop: int | None = None,
    threads: int = 0,
    transform: FrameTransform | None = None,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> np.ndarray:
    """Decode frames [start, stop) of a video file or in-memory video as RGB uint8 (T, H, W, 3).

    threads: decoder threads, 0 = as many as the codec likes (1 inside a Ray task: one task per CPU).
    transform: applied to each frame as it is decoded (crop and resize), so a task never holds a whole
    segment at source resolution.
    Frames come as displayed: the stream's display matrix (a phone video's rotation) is applied.
    Raises ValueError when the video ends before `stop` or holds no decodable frame in range.
    """
    frames: list[np.ndarray] = []
    what = "<bytes>" if isinstance(source, bytes) else str(source)
    for _, frame in iter_video_frames(source, start, stop, threads, max_pixels):
        image = displayed(frame.to_ndarray(format="rgb24"), quarter_turns(frame.rotation, what))
        frames.append(transform(image) if transform else image)
    if stop is not None and len(frames) < stop - start:
        raise ValueError(f"video ended after {start + len(frames)} frames, expected {stop}")
    return _stack(frames, "video")


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("the header is truncated")
    return data


def _jpeg_size(handle: BinaryIO) -> tuple[int, int]:
    """Width and height of the first SOF segment, skipping the segments before it (APPn, DQT, ...)."""
    while True:
        if _read_exact(handle, 1) != b"\xff":
            raise ValueError("a JPEG segment does not start with a marker")
        marker = _read_exact(handle, 1)[0]
        while marker == 0xFF:  # fill bytes before a marker
            marker = _read_exact(handle, 1)[0]
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # markers without a length
        if marker in (0xD9, 0xDA):
            raise ValueError("the JPEG has no frame header (SOF) before its image data")
        (length,) = struct.unpack(">H", _read_exact(handle, 2))
        if length < 2:
            raise ValueError(f"JPEG segment length {length} is invalid")
        if marker in JPEG_SOF:
            _, height, width = struct.unpack(">BHH", _read_exact(handle, 5))
            return width, height
        _read_exact(handle, length - 2)


def image_header_size(handle: BinaryIO, name: str) -> tuple[int, int]:
    """(width, height) a PNG (IHDR) or JPEG (SOF) declares, read from the header without decoding."""
    try:
        start = _read_exact(handle, 2)
        if start == b"\xff\xd8":
            return _jpeg_size(handle)
        head = start + _read_exact(handle, 22)
        if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
            raise ValueError("neither a PNG nor a JPEG")
    except ValueError as exc:
        raise ValueError(f"{name}: not a decodable image ({exc})") from exc
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def check_frame_size(
    size: tuple[int, int], name: str, expected: tuple[int, int] | None, max_pixels: int
) -> None:
    """Refuse a frame whose declared size is empty, over `max_pixels` or not the clip's size."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ClipError("bad_frame", f"{name}: declares an empty {width}x{height} image")
    if width * height > max_pixels:
        raise ClipError(
            "frame_too_large",
            f"{name}: declares {width}x{height} ({width * height:,} pixels), over the limit of "
            f"{max_pixels:,} pixels; raise max_frame_pixels if such frames are real",
        )
    if expected is not None and (width, height) != tuple(expected):
        raise ClipError(
            "frame_size_mismatch",
            f"{name}: declares {width}x{height}, the clip's frames are {expected[0]}x{expected[1]}",
        )


def frame_byte_limit(size: tuple[int, int]) -> int:
    """The most bytes an image file of this size can hold (see MAX_BYTES_PER_PIXEL)."""
    return size[0] * size[1] * MAX_BYTES_PER_PIXEL + FRAME_FILE_MARGIN


def list_frame_files(folder: Path) -> list[Path]:
    """Image files of a frame folder in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def zip_frame_names(names: Sequence[str], prefix: str = "") -> list[str]:
    """The image entries directly inside `prefix` (a folder in the zip, "" = the top), in name order:
    one clip's frames in a zip that may hold several clips."""
    depth = prefix.count("/")
    return sorted(
        n
        for n in names
        if n.startswith(prefix) and n.count("/") == depth and n.lower().endswith(IMAGE_SUFFIXES)
    )


def _read_frame_file(
    handle: BinaryIO, stored_size: int, name: str, expected: tuple[int, int] | None, max_pixels: int
) -> tuple[bytes, tuple[int, int]]:
    """The bytes of one image file and its declared size, checked before anything large is read:
    the header's size against the clip's and the limit, the file's stored size (a zip member's
    declared file_size, a file's st_size) against what such an image can hold, and the read itself
    bounded, so a lying header cannot allocate more."""
    size = image_header_size(handle, name)
    check_frame_size(size, name, expected, max_pixels)
    limit = frame_byte_limit(size)
    if stored_size > limit:
        raise ClipError(
            "frame_too_large",
            f"{name}: {stored_size:,} bytes, more than a {size[0]}x{size[1]} image holds ({limit:,})",
        )
    handle.seek(0)
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise ClipError("frame_too_large", f"{name}: holds more than the {limit:,} bytes it declared")
    return data, size


def _decode_image(data: bytes, name: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{name}: not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image_frames(
    source: Path,
    start: int = 0,
    stop: int | None = None,
    prefix: str = "",
    transform: FrameTransform | None = None,
    size: tuple[int, int] | None = None,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> np.ndarray:
    """Read frames [start, stop) of a folder of images or a zip of images, in name order.

    prefix: for a zip, the folder holding this clip's frames ("" = the top level).
    transform: applied to each frame as it is read (see read_video_frames).
    size: the clip's (width, height); None = the first frame's. Each file's header is checked
    against it and `max_pixels` before the file is read whole or decoded (ClipError)."""
    frames: list[np.ndarray] = []

    def add(handle: BinaryIO, stored_size: int, name: str) -> None:
        nonlocal size
        data, size = _read_frame_file(handle, stored_size, name, size, max_pixels)
        image = _decode_image(data, name)
        frames.append(transform(image) if transform else image)

    def read_one(open_file: Callable[[], BinaryIO], stored_size: Callable[[], int], name: str) -> None:
        # A damaged file (a looping link, a bad CRC, a member zipfile cannot inflate) fails the clip
        # with the file named; the transform's own errors (face checks) keep their codes.
        try:
            handle = open_file()
        except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
            raise ClipError("unreadable_frames", f"{name}: {exc}") from exc
        with handle:
            try:
                add(handle, stored_size(), name)
            except ClipError:
                raise
            except (OSError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
                raise ClipError("unreadable_frames", f"{name}: {exc}") from exc
            except ValueError as exc:
                raise ClipError("bad_frame", str(exc) if name in str(exc) else f"{name}: {exc}") from exc

    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            for name in zip_frame_names(archive.namelist(), prefix)[start:stop]:
                info = archive.getinfo(name)
                read_one(
                    functools.partial(archive.open, info),
                    lambda info=info: info.file_size,
                    f"{source}:{name}",
                )
    else:
        for path in list_frame_files(source)[start:stop]:
            read_one(functools.partial(path.open, "rb"), lambda path=path: path.stat().st_size, str(path))
    if not frames:
        raise ValueError(f"{source}: no frames in range [{start}, {stop})")
    if stop is not None and len(frames) < stop - start:
        raise ValueError(f"{source}: {len(frames)} frames in range [{start}, {stop})")
    return _stack(frames, str(source))


def face_inside_fraction(box: Sequence[float], frame_width: int, frame_height: int) -> float:
    """The part of a box's area that lies inside the frame."""
    x0, y0, x1, y1 = box
    inside_w = max(0.0, min(x1, frame_width) - max(x0, 0.0))
    inside_h = max(0.0, min(y1, frame_height) - max(y0, 0.0))
    return inside_w * inside_h / ((x1 - x0) * (y1 - y0))


def square_crop_box(
    boxes: Sequence[Sequence[float]], frame_width: int, frame_height: int, scale: float
) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) around the union of face boxes (x0, y0, x1, y1), grown by `scale`.

    The square may extend past the frame; `crop_and_resize` pads with black there, so a face near the
    border keeps its place and aspect instead of being squeezed against it. Its side is at most the
    frame's larger side. Raises ClipError (face_outside) when under half of the union lies inside the
    frame: the crop would be mostly padding (and with it, the union's centre lies inside the frame).
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(arr) == 0:
        raise ValueError("no face boxes to crop around")
    x0, y0 = arr[:, 0].min(), arr[:, 1].min()
    x1, y1 = arr[:, 2].max(), arr[:, 3].max()
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"degenerate face box union ({x0}, {y0}, {x1}, {y1})")
    inside = face_inside_fraction((x0, y0, x1, y1), frame_width, frame_height)
    if inside < 0.5:
        raise ClipError(
            "face_outside",
            f"face box union ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies {1 - inside:.0%} outside the "
            f"{frame_width}x{frame_height} frame",
        )
    side = max(x1 - x0, y1 - y0) * scale
    side = min(side, max(frame_width, frame_height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    side_px = max(1, round(side))
    return left, top, left + side_px, top + side_px


def centre_square_box(frame_width: int, frame_height: int) -> tuple[int, int, int, int]:
    """The largest centred square of a frame."""
    side = min(frame_width, frame_height)
    left, top = (frame_width - side) // 2, (frame_height - side) // 2
    return left, top, left + side, top + side


def crop_and_resize_frame(frame: np.ndarray, box: Sequence[int], resolution: int) -> np.ndarray:
    """Crop one frame to `box` (padding with black outside the frame) and resize it to resolution².

    Only the crop is padded, by what lies outside the frame; a box that misses the frame or is more
    than twice its larger side (a crop no face box gives) is refused rather than allocated."""
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = frame.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if ix1 <= ix0 or iy1 <= iy0 or max(x1 - x0, y1 - y0) > 2 * max(width, height):
        raise ValueError(f"crop box {(x0, y0, x1, y1)} is not a crop of the {width}x{height} frame")
    patch = frame[iy0:iy1, ix0:ix1]
    if (ix0, iy0, ix1, iy1) != (x0, y0, x1, y1):
        padded = np.zeros((y1 - y0, x1 - x0, *frame.shape[2:]), frame.dtype)
        padded[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = patch
        patch = padded
    interpolation = cv2.INTER_AREA if x1 - x0 > resolution else cv2.INTER_LINEAR
    return cv2.resize(patch, (resolution, resolution), interpolation=interpolation)


def crop_and_resize(frames: np.ndarray, box: Sequence[int], resolution: int) -> np.ndarray:
    """Crop every frame to `box` (padding with black outside the frame) and resize to resolution²."""
    out = np.empty((len(frames), resolution, resolution, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = crop_and_resize_frame(frame, box, resolution)
    return out


def encode_mp4(frames: np.ndarray, fps: float, settings: EncodeSettings | None = None) -> bytes:
    """Encode RGB uint8 (T, H, W, 3) frames as an H.264 mp4 in memory."""
    settings = settings or EncodeSettings()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {width}x{height}")
    buffer = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        # Tagged BT.709, limited range, and converted with that matrix: untagged H.264 is read as
        # BT.601 by some readers and BT.709 by others, which shifts hues between them.
        context = stream.codec_context
        context.colorspace, context.color_primaries, context.color_trc = BT709, BT709, BT709
        context.color_range = LIMITED_RANGE
        stream.options = {
            "crf": str(settings.crf),
            "preset": settings.preset,
            "g": str(settings.gop),
            "threads": str(settings.threads),
        }
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG"
            )
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


class IndexedVideo:
    """A video demuxed once (packets, keyframes, presentation order) that decodes any set of its frames.

    Reading frames jumps to the keyframe at or before the first frame it needs and decodes forward from
    there, jumping again only when the next needed frame lies beyond the next keyframe; only the frames
    asked for are converted to RGB. Our shard videos are constant-fps H.264 with closed GOPs (libx264's
    default), so decoding from a keyframe gives exactly the frames a full decode gives.
    """

    def __init__(self, source: str | Path | bytes, threads: int = 1) -> None:
        handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        self._container = av.open(handle)
        if not self._container.streams.video:
            self._container.close()
            raise ValueError(f"{'<bytes>' if isinstance(source, bytes) else source}: no video stream")
        stream = self._container.streams.video[0]
        self._codec = stream.codec_context
        if threads == 1:
            self._codec.thread_count = 1
        else:
            self._codec.thread_type = "AUTO"
            self._codec.thread_count = threads
        # Packets in decode order; the end-of-stream flush packet carries no data.
        self._packets = [p for p in self._container.demux(stream) if p.size and p.pts is not None]
        order = sorted(p.pts for p in self._packets)
        self._index_of_pts = {pts: i for i, pts in enumerate(order)}
        # For every frame (presentation index), the decode position of the last keyframe at or before it.
        keyframes = [(p.pts, pos) for pos, p in enumerate(self._packets) if p.is_keyframe]
        if not keyframes or keyframes[0][1] != 0:
            self._container.close()
            raise ValueError("video does not start with a keyframe")
        self._keyframe_of = []
        current = 0
        for pts in order:
            while current + 1 < len(keyframes) and keyframes[current + 1][0] <= pts:
                current += 1
            self._keyframe_of.append(keyframes[current][1])

    @property
    def num_frames(self) -> int:
        return len(self._packets)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """RGB uint8 (len(indices), H, W, 3) of the frames at `indices` (any order, repeats allowed)."""
        wanted = sorted(set(int(i) for i in indices))
        if not wanted:
            raise ValueError("no frame indices given")
        if wanted[0] < 0 or wanted[-1] >= self.num_frames:
            raise ValueError(
                f"frame indices {wanted[0]}..{wanted[-1]} outside a video of {self.num_frames} frames"
            )
        wanted_set, got = set(wanted), {}
        position = None  # next packet (decode order) to feed; None = decoder not started
        for target in wanted:
            if target in got:
                continue
            keyframe = self._keyframe_of[target]
            if position is None or keyframe > position:
                self._codec.flush_buffers()  # a jump: the decoder restarts at the keyframe
                position = keyframe
            while target not in got:
                if position < len(self._packets):
                    frames = self._codec.decode(self._packets[position])
                    position += 1
                else:
                    frames = self._codec.decode(None)  # drain the frames the decoder still holds
                    if not frames:
                        raise ValueError(
                            f"frame {target} was not decoded (video of {self.num_frames} frames)"
                        )
                for frame in frames:
                    index = self._index_of_pts.get(frame.pts)
                    if index in wanted_set and index not in got:
                        got[index] = frame.to_ndarray(format="rgb24")
            if position >= len(self._packets):
                position = None  # drained: a later frame needs a restart (flush) first
        return np.stack([got[int(i)] for i in indices])

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> IndexedVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_frames_at(source: str | Path | bytes, indices: Sequence[int], threads: int = 1) -> np.ndarray:
    """Decode only the frames at `indices` (presentation order, 0-based) as RGB uint8 (N, H, W, 3).

    Equal to `read_video_frames(source)[indices]`, without decoding the GOPs no index falls in.
    """
    with IndexedVideo(source, threads) as video:
        return video.read(indices)
