"""Video and frame I/O: decode a frame range, crop around faces, resize, encode H.264 in memory.

Everything here works on uint8 RGB arrays shaped (T, H, W, 3) so stages never see a codec.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BT709, LIMITED_RANGE = 1, 1  # AVCOL_SPC / AVCOL_PRI / AVCOL_TRC_BT709, AVCOL_RANGE_MPEG


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
    """Frame count, fps and size from the container header (no full decode)."""
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
        return VideoInfo(num_frames, fps, stream.codec_context.width, stream.codec_context.height)


FrameTransform = Callable[[np.ndarray], np.ndarray]


def _stack(frames: list[np.ndarray], what: str) -> np.ndarray:
    if not frames:
        raise ValueError(f"{what}: no frames decoded in the requested range")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise ValueError(f"{what}: frames differ in size: {sorted(shapes)}")
    return np.stack(frames)


def iter_video_frames(
    source: str | Path | bytes, start: int = 0, stop: int | None = None, threads: int = 0
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) for the frames [start, stop) of a video, index = round(time x fps).

    Seeks to the keyframe before `start` instead of decoding from the first frame: a clip at minute 5
    of a whole source video (raw CelebV-HQ) costs its own GOPs, not 9,000 frames. Frames are indexed
    by their timestamps, as a time-based cut (ffmpeg -ss / -to) selects them.
    """
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with av.open(handle) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
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
        if start > 0:
            # Half a frame early, so a keyframe exactly at `start` is not skipped by rounding.
            target = origin + int((start - 0.5) / fps / time_base)
            container.seek(max(origin, target), backward=True, any_frame=False, stream=stream)
        last = start - 1
        for frame in container.decode(stream):
            if frame.pts is None:
                raise ValueError("a decoded frame has no timestamp")
            index = round(float((frame.pts - origin) * time_base) * fps)
            if index <= last:
                continue  # before the range, or a repeated timestamp
            if stop is not None and index >= stop:
                return
            last = index
            yield index, frame


def read_video_frames(
    source: str | Path | bytes,
    start: int = 0,
    stop: int | None = None,
    threads: int = 0,
    transform: FrameTransform | None = None,
) -> np.ndarray:
    """Decode frames [start, stop) of a video file or in-memory video as RGB uint8 (T, H, W, 3).

    threads: decoder threads, 0 = as many as the codec likes (1 inside a Ray task: one task per CPU).
    transform: applied to each frame as it is decoded (crop and resize), so a task never holds a whole
    segment at source resolution.
    Raises ValueError when the video ends before `stop` or holds no decodable frame in range.
    """
    frames: list[np.ndarray] = []
    for _, frame in iter_video_frames(source, start, stop, threads):
        image = frame.to_ndarray(format="rgb24")
        frames.append(transform(image) if transform else image)
    if stop is not None and len(frames) < stop - start:
        raise ValueError(f"video ended after {start + len(frames)} frames, expected {stop}")
    return _stack(frames, "video")


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
) -> np.ndarray:
    """Read frames [start, stop) of a folder of images or a zip of images, in name order.

    prefix: for a zip, the folder holding this clip's frames ("" = the top level).
    transform: applied to each frame as it is read (see read_video_frames)."""
    frames: list[np.ndarray] = []

    def add(image: np.ndarray) -> None:
        frames.append(transform(image) if transform else image)

    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            for name in zip_frame_names(archive.namelist(), prefix)[start:stop]:
                add(_decode_image(archive.read(name), f"{source}:{name}"))
    else:
        for path in list_frame_files(source)[start:stop]:
            add(_decode_image(path.read_bytes(), str(path)))
    if not frames:
        raise ValueError(f"{source}: no frames in range [{start}, {stop})")
    if stop is not None and len(frames) < stop - start:
        raise ValueError(f"{source}: {len(frames)} frames in range [{start}, {stop})")
    return _stack(frames, str(source))


def square_crop_box(
    boxes: Sequence[Sequence[float]], frame_width: int, frame_height: int, scale: float
) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) around the union of face boxes (x0, y0, x1, y1), grown by `scale`.

    The square may extend past the frame; `crop_and_resize` pads with black there, so the face
    keeps its place and aspect instead of being squeezed against the border.
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(arr) == 0:
        raise ValueError("no face boxes to crop around")
    x0, y0 = arr[:, 0].min(), arr[:, 1].min()
    x1, y1 = arr[:, 2].max(), arr[:, 3].max()
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"degenerate face box union ({x0}, {y0}, {x1}, {y1})")
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
    """Crop one frame to `box` (padding with black outside the frame) and resize it to resolution²."""
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = frame.shape[:2]
    pad = max(0, -x0, -y0, x1 - width, y1 - height)
    if pad:
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    patch = frame[y0 + pad : y1 + pad, x0 + pad : x1 + pad]
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
