"""Hostile VFHQ / CelebV-HQ look-alike downloads: a few good clips laid out as the datasets' official
scripts leave them (tests/lookalike.py), and one clip per kind of damaged file a real download or a
hostile archive can hold.

Every damaged file is made from its format's documented facts, never from our own writer's output:
zip headers packed field by field from the zip specification (APPNOTE 4.3.7 local header, 4.3.12 central
header, 4.3.16 end of central directory; AE-x extra 0x9901 as 7-Zip writes AES members), PNG chunks from
the PNG specification (length, type, data, CRC-32; IHDR, IDAT as a zlib stream, IEND), JSON with the bare
NaN / Infinity literals Python's json accepts, and mp4 display-matrix side data written by the muxer.

Each damaged clip is its own clip (own meta file, own frames, own source video), so one failure row
maps to one cause. `python tests/hostile_corpus.py DIR` builds both corpora under DIR and logs their
size on disk and build time.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import struct
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: lookalike sits beside it

from lookalike import (  # noqa: E402
    FPS,
    STANDARD_BBOX,
    bbox_for_pixels,
    info_entry,
    make_raw_video,
    make_vfhq_clip,
    png,
    render_vfhq_clip,
    vfhq_name,
    write_info,
)

from pipeline.sources.demo import make_identity, render_clip  # noqa: E402

log = logging.getLogger(__name__)

FRAMES_DIR = "frames"  # the second frames tree (zip layout, symlink loops); official layout stays beside it
OFFICIAL_DIR = "extracted_cropped_face_results"
META_SPLIT = "VFHQ-Train"
CLIP_FRAMES = 10  # frames of each damaged VFHQ clip
BIG_MEMBER_BYTES = 2 << 30  # the clip-zip member that inflates to 2 GiB
BIG_META_BYTES = 512 << 20  # the meta_info.zip member that inflates to 512 MiB

# VFHQ damaged clips: case -> (item of the brief, ytid, clip index); names follow lookalike's convention.
VFHQ_CASES: dict[str, tuple[int, str, int]] = {
    "symlink_self": (1, "loop-self", 10),
    "symlink_ancestor": (1, "loop_up", 11),
    "zip_utf8_flag": (2, "zip-utf8", 12),
    "zip_aes": (2, "zip_aes", 13),
    "zip_central_flip": (2, "zip-cdir", 14),
    "png_bomb_first": (3, "bomb_first", 15),
    "box_centre_outside": (8, "box-out", 16),
    "box_huge": (8, "box_huge", 17),
    "fps_nan": (9, "fps-nan", 18),
    "fps_inf": (9, "fps-inf", 19),
    "fps_1e308": (9, "fps-big", 20),
    "fps_1e-300": (9, "fps-tiny", 21),
    "tiny_8px": (14, "tiny-8", 22),
    "tiny_1px": (14, "tiny-1", 23),
    "png_30000": (15, "png-huge", 24),
    "zip_big_member": (16, "zip-big", 25),
    "meta_zip_big_member": (16, "meta-big", 26),
}
# CelebV-HQ damaged entries: case -> (item of the brief, clip id, ytb_id).
CELEBVHQ_CASES: dict[str, tuple[int, str, str]] = {
    "time_nan": (4, "t-nan_0", "t-nan"),
    "time_infinity": (4, "t-inf_0", "t-inf"),
    "attributes_list": (4, "attr-list_0", "attr-list"),
    "attributes_string": (4, "attr-str_0", "attr-str"),
    "attributes_int_value": (4, "attr-int_0", "attr-int"),
    "bbox_outside": (10, "bbox-out_0", "bbox-out"),
    "ytb_id_dotdot": (21, "../x_0", "../x"),
}
ROTATED_CLIP = "rot-phone_0"  # stored landscape, display matrix -90 degrees, bbox as displayed
VFR_CLIP = "vfr-cam_0"  # uneven timestamps, some gaps under 1/avg fps


@dataclass(frozen=True)
class BadClip:
    case: str
    item: int
    clip_id: str
    files: tuple[str, ...]  # file names a failure message may cite instead of the clip id


@dataclass
class Corpus:
    root: Path
    dataset: str
    good: dict[str, int] = field(default_factory=dict)  # clip id -> frames of the clip
    bad: dict[str, BadClip] = field(default_factory=dict)  # case -> clip
    seconds: float = 0.0

    def size_on_disk(self) -> int:
        """Allocated bytes under root, links not followed (zip bombs are small on disk)."""
        total = 0
        for folder, _, files in os.walk(self.root, followlinks=False):
            for name in files:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
        return total


# ---------------------------------------------------------------------------------------------------
# PNG, from the specification


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zero_rows(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A greyscale PNG whose IHDR declares width x height; IDAT is zlib of all-zero rows (filter byte
    0, black pixels), so a few hundred KB on disk declare hundreds of megapixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # colour type 0: grey
    row = 1 + (width * bit_depth + 7) // 8
    packer = zlib.compressobj(9)
    rows_per_chunk = max(1, (8 << 20) // row)
    parts, left = [], height
    while left:
        count = min(rows_per_chunk, left)
        parts.append(packer.compress(bytes(row * count)))
        left -= count
    parts.append(packer.flush())
    header = b"\x89PNG\r\n\x1a\n"
    return header + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------
# Zip, from the specification (APPNOTE.TXT)

DOS_TIME, DOS_DATE = 0, ((2020 - 1980) << 9) | (1 << 5) | 1  # 2020-01-01 00:00
FLAG_ENCRYPTED, FLAG_UTF8 = 0x0001, 0x0800
METHOD_STORED, METHOD_AES = 0, 99
CENTRAL_SIG, LOCAL_SIG, END_SIG = 0x02014B50, 0x04034B50, 0x06054B50
CENTRAL_CRC_AT, CENTRAL_OFFSET_AT, CENTRAL_FIXED = 16, 42, 46  # field offsets in a central header


@dataclass
class ZipMember:
    name: bytes  # raw name bytes as stored
    payload: bytes  # the bytes after the local header (compressed and/or encrypted)
    size: int  # uncompressed size
    crc: int
    method: int = METHOD_STORED
    flags: int = 0
    extra: bytes = b""
    version: int = 20


def stored_member(name: str, data: bytes) -> ZipMember:
    return ZipMember(name.encode("ascii"), data, len(data), zlib.crc32(data))


def aes_member(name: str, data: bytes, seed: int = 0) -> ZipMember:
    """A member as 7-Zip writes it with AES-256 (WinZip AE-2): method 99, encrypted flag, extra field
    0x9901 (vendor version 2, vendor id "AE", strength 3, real method stored), CRC 0; the payload is salt
    (16 bytes), password verifier (2), ciphertext and a 10-byte authentication code."""
    extra = struct.pack("<HHH2sBH", 0x9901, 7, 2, b"AE", 3, METHOD_STORED)
    rng = np.random.default_rng(seed)
    payload = rng.bytes(16 + 2) + rng.bytes(len(data)) + rng.bytes(10)
    return ZipMember(name.encode("ascii"), payload, len(data), 0, METHOD_AES, FLAG_ENCRYPTED, extra, 51)


def zip_bytes(members: list[ZipMember]) -> bytes:
    """Local headers and data, central directory, end record: a zip exactly as the members say."""
    body, central = bytearray(), bytearray()
    for m in members:
        offset = len(body)
        body += struct.pack(
            "<IHHHHHIIIHH", LOCAL_SIG, m.version, m.flags, m.method, DOS_TIME, DOS_DATE,
            m.crc, len(m.payload), m.size, len(m.name), len(m.extra),
        )  # fmt: skip
        body += m.name + m.extra + m.payload
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", CENTRAL_SIG, m.version, m.version, m.flags, m.method, DOS_TIME, DOS_DATE,
            m.crc, len(m.payload), m.size, len(m.name), len(m.extra), 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += m.name + m.extra
    end = struct.pack("<IHHHHIIH", END_SIG, 0, 0, len(members), len(members), len(central), len(body), 0)
    return bytes(body + central + end)


def central_headers(data: bytes) -> list[int]:
    """Offsets of the central directory's file headers, found from the end record."""
    end = data.rindex(struct.pack("<I", END_SIG))
    count, _, start = struct.unpack_from("<HII", data, end + 10)
    offsets, at = [], start
    for _ in range(count):
        if struct.unpack_from("<I", data, at)[0] != CENTRAL_SIG:
            raise ValueError(f"no central header at {at}")
        offsets.append(at)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        at += CENTRAL_FIXED + name_len + extra_len + comment_len
    return offsets


def flip_central_bytes(data: bytes) -> bytes:
    """Flip two bytes of the second member's CRC and one byte of the fourth member's local-header offset
    in the central directory: the zip still opens, reading those members fails."""
    out = bytearray(data)
    headers = central_headers(data)
    for at in (headers[1] + CENTRAL_CRC_AT, headers[1] + CENTRAL_CRC_AT + 2, headers[3] + CENTRAL_OFFSET_AT):
        out[at] ^= 0x5A
    return bytes(out)


# ---------------------------------------------------------------------------------------------------
# VFHQ


def _frame_pngs(ytid: str, clip: int, count: int, cropped: bool) -> tuple[str, list[bytes]]:
    spec = render_vfhq_clip(ytid, clip, count, identity=clip % 7)
    return spec.name, [png(f) for f in spec.extracted(cropped=cropped)]


def _frame_names(count: int) -> list[str]:
    return [f"{k:08d}.png" for k in range(1, count + 1)]


def _meta_path(root: Path, name: str) -> Path:
    return root / "meta_info" / META_SPLIT / f"{name}.txt"


def _edit_meta(root: Path, name: str, edit) -> None:
    path = _meta_path(root, name)
    path.write_text(edit(path.read_text()))


def _set_fps(value: str):
    return lambda text: "\n".join(
        f"FPS: {value}" if line.startswith("FPS:") else line for line in text.splitlines()
    )


def _set_boxes(x0: float, y0: float, w: float, h: float):
    """Every frame row's box (fields 3-6) replaced; the landmarks stay."""

    def edit(text: str) -> str:
        lines = []
        for line in text.splitlines():
            parts = line.split()
            if parts and parts[0].isdigit():
                parts[2:6] = [f"{v:g}" for v in (x0, y0, w, h)]
                line = " ".join(parts)
            lines.append(line)
        return "\n".join(lines) + "\n"

    return edit


def _official_clip(root: Path, ytid: str, clip: int) -> tuple[str, Path]:
    name = make_vfhq_clip(root, ytid, clip, CLIP_FRAMES, identity=clip % 7)
    return name, root / OFFICIAL_DIR / ytid / name


def _custom_clip(root: Path, ytid: str, clip: int, size: int, box: tuple[float, ...], crop: str) -> str:
    """A clip with a hand-written meta file (source W=H=`size` unless the crop says otherwise) and
    flat grey-gradient frames of `size` px in `<clip>/` under the frames tree."""
    start = 100 * clip + 7
    end = start + CLIP_FRAMES + 1
    name = vfhq_name(ytid, clip, start, end)
    source = 1280 if size == 330 else size  # the box-outside case: a 330-px crop of a 1280x720 source
    height = 720 if size == 330 else size
    lines = [f"Video: {ytid}", f"H: {height}", f"W: {source}", f"FPS: {FPS:g}", ""]
    lines += ["FRAME INDEX PID BBOX (x0 y0 w h) FACIAL LANDMARKS (x1 y1 ... x5 y5)", ""]
    x0, y0, w, h = box
    marks = " ".join(f"{x0 + w / 2:g} {y0 + h / 2:g}" for _ in range(5))
    lines += [f"{i} 0 {x0:g} {y0:g} {w:g} {h:g} {marks}" for i in range(start, end)]
    lines.append(f"CROP: {crop}")
    path = _meta_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    folder = root / FRAMES_DIR / name
    folder.mkdir(parents=True)
    ramp = np.linspace(40, 200, size, dtype=np.uint8)
    for k, frame_name in enumerate(_frame_names(CLIP_FRAMES)):
        frame = np.broadcast_to(ramp[None, :, None], (size, size, 3)).copy()
        frame[..., 1] = (frame[..., 1].astype(int) + 7 * k) % 256
        (folder / frame_name).write_bytes(png(frame))
    return name


def _zip_clip(root: Path, ytid: str, clip: int, members) -> tuple[str, Path]:
    """Meta file only from lookalike; the frames zip `<clip>.zip` under frames/ from `members`."""
    name, frames = _frame_pngs(ytid, clip, CLIP_FRAMES, cropped=False)
    assert make_vfhq_clip(root, ytid, clip, CLIP_FRAMES, identity=clip % 7, layout="none") == name
    path = root / FRAMES_DIR / f"{name}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(members(dict(zip(_frame_names(CLIP_FRAMES), frames, strict=True))))
    return name, path


def _big_member_zip(root: Path, ytid: str, clip: int, big_bytes: int) -> tuple[str, Path]:
    """`<clip>.zip` whose 4th frame member inflates to `big_bytes` of zeros (deflated, zip64)."""
    name, frames = _frame_pngs(ytid, clip, CLIP_FRAMES, cropped=False)
    assert make_vfhq_clip(root, ytid, clip, CLIP_FRAMES, identity=clip % 7, layout="none") == name
    path = root / FRAMES_DIR / f"{name}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for frame_name, data in zip(_frame_names(CLIP_FRAMES), frames, strict=True):
            if frame_name != "00000004.png":
                archive.writestr(frame_name, data)
                continue
            with archive.open(frame_name, "w", force_zip64=True) as member:
                left = big_bytes
                while left:
                    member.write(chunk[: min(len(chunk), left)])
                    left -= min(len(chunk), left)
    return name, path


def _big_meta_member(root: Path, ytid: str, clip: int, big_bytes: int) -> tuple[str, Path]:
    """A good clip whose only meta file is a member of ROOT/meta_info.zip holding the real meta text
    with `big_bytes` of blanks before its CROP line (deflated: a few hundred KB)."""
    name, _ = _official_clip(root, ytid, clip)
    plain = _meta_path(root, name)
    text = plain.read_text()
    plain.unlink()
    head, crop = text.rstrip("\n").rsplit("\n", 1)
    path = root / "meta_info.zip"
    chunk = b" " * (16 << 20)
    member_name = f"meta_info/{META_SPLIT}/{name}.txt"
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open(member_name, "w", force_zip64=True) as member,
    ):
        member.write(head.encode() + b"\n")
        left = big_bytes
        while left:
            member.write(chunk[: min(len(chunk), left)])
            left -= min(len(chunk), left)
        member.write(b"\n" + crop.encode() + b"\n")
    return name, path


def _damage_vfhq(root: Path, case: str, ytid: str, clip: int, big_member: int, big_meta: int) -> BadClip:
    item = VFHQ_CASES[case][0]
    if case in ("symlink_self", "symlink_ancestor", "png_bomb_first", "png_30000") or case.startswith("fps_"):
        name, folder = _official_clip(root, ytid, clip)
        files: tuple[str, ...] = ()
        if case == "symlink_self":
            (folder / "00000003.png").unlink()
            os.symlink("00000003.png", folder / "00000003.png")  # ELOOP on open
            files = ("00000003.png",)
        elif case == "symlink_ancestor":
            (folder / "00000003.png").unlink()
            os.symlink("../..", folder / "00000003.png")  # a frame name that is the frames tree itself
            files = ("00000003.png",)
        elif case == "png_bomb_first":
            (folder / "00000001.png").write_bytes(png_of_zero_rows(13400, 13400))
            files = ("00000001.png",)
        elif case == "png_30000":
            (folder / "00000005.png").write_bytes(png_of_zero_rows(30000, 30000, bit_depth=1))
            files = ("00000005.png",)
        else:
            _edit_meta(root, name, _set_fps(case.removeprefix("fps_").replace("nan", "NaN")))
            files = (f"{name}.txt",)
        return BadClip(case, item, name, files)
    if case == "zip_utf8_flag":

        def utf8_names(frames: dict[str, bytes]) -> bytes:
            members = [stored_member(n, d) for n, d in frames.items()]
            members[2].name = b"00000003\xff\xfe.png"  # not UTF-8, though bit 11 says so
            members[2].flags |= FLAG_UTF8
            return zip_bytes(members)

        name, path = _zip_clip(root, ytid, clip, utf8_names)
    elif case == "zip_aes":
        name, path = _zip_clip(
            root, ytid, clip,
            lambda frames: zip_bytes(
                [aes_member(n, d) if n == "00000003.png" else stored_member(n, d) for n, d in frames.items()]
            ),
        )  # fmt: skip
    elif case == "zip_central_flip":
        name, path = _zip_clip(
            root, ytid, clip,
            lambda frames: flip_central_bytes(zip_bytes([stored_member(n, d) for n, d in frames.items()])),
        )  # fmt: skip
    elif case == "zip_big_member":
        name, path = _big_member_zip(root, ytid, clip, big_member)
    elif case == "meta_zip_big_member":
        name, path = _big_meta_member(root, ytid, clip, big_meta)
    elif case == "box_centre_outside":  # centre (350, 310) of a 330-px crop
        name = _custom_clip(root, ytid, clip, 330, (150, 110, 400, 400), "0 0 330 330")
        return BadClip(case, item, name, (f"{name}.txt",))
    elif case == "box_huge":
        name = make_vfhq_clip(
            root, ytid, clip, CLIP_FRAMES, identity=clip % 7, layout="folder", out_folder=FRAMES_DIR
        )
        _edit_meta(root, name, _set_boxes(-26000, 30, 26100, 50))
        return BadClip(case, item, name, (f"{name}.txt",))
    elif case in ("tiny_8px", "tiny_1px"):
        size = 8 if case == "tiny_8px" else 1
        name = _custom_clip(root, ytid, clip, size, (0, 0, size, size), f"0 0 {size} {size}")
        return BadClip(case, item, name, ())
    else:
        raise ValueError(case)
    return BadClip(case, item, name, (path.name,))


def build_vfhq(
    root: Path, hostile: bool = True, big_member: int = BIG_MEMBER_BYTES, big_meta: int = BIG_META_BYTES
) -> Corpus:
    """Good clips (official extracted-frames layout, both row conventions, a clip zip); with `hostile`,
    one damaged clip per VFHQ_CASES entry and two symlink loops in the frames tree."""
    started = time.perf_counter()
    corpus = Corpus(root, "vfhq")
    corpus.good[make_vfhq_clip(root, "good-off_1", 0, 16, identity=0)] = 16
    corpus.good[make_vfhq_clip(root, "good_off-2", 1, 14, identity=1, rows_from_start=False)] = 14
    corpus.good[make_vfhq_clip(root, "good-zip", 2, 14, identity=2, layout="zip", out_folder=FRAMES_DIR)] = 14
    if hostile:
        frames = root / FRAMES_DIR
        os.symlink("x", frames / "x")  # a link to itself
        os.symlink("..", frames / "up")  # a folder link back to ROOT: a walk that follows it loops
        for case, (_, ytid, clip) in VFHQ_CASES.items():
            corpus.bad[case] = _damage_vfhq(root, case, ytid, clip, big_member, big_meta)
    corpus.seconds = time.perf_counter() - started
    return corpus


# ---------------------------------------------------------------------------------------------------
# CelebV-HQ

PORTRAIT = (192, 256)  # w, h of the phone video as displayed
ROTATED_BBOX = bbox_for_pixels(64, 192, 32, 160, *PORTRAIT)  # a 128-px square of the displayed frame
VFR_FRAMES = 30


def write_mp4(path: Path, frames: np.ndarray, pts_ms: list[int] | None = None, rotation: int = 0) -> None:
    """H.264 mp4 of RGB frames: at FPS, or at the given millisecond timestamps (variable frame rate);
    `rotation` sets the display matrix (counter-clockwise degrees, as ffprobe reports it)."""
    buffer = io.BytesIO()
    height, width = frames.shape[1:3]
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        if rotation:
            stream.set_display_rotation(rotation)
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if pts_ms is not None:
                picture.pts, picture.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def vfr_timestamps(count: int) -> list[int]:
    """Milliseconds: steps of 18 ms and 51 ms (mean 40 ms, 25 fps), two in three under 1/fps apart."""
    steps = [18 if i % 3 == 0 else 51 for i in range(count - 1)]
    return [0, *np.cumsum(steps).tolist()]


def _rotated_clip(root: Path, hostile: bool) -> dict:
    """A portrait phone video: stored landscape with a -90 degree display matrix (hostile), or stored
    as displayed (clean); the bbox is in displayed coordinates either way."""
    shown, _, _ = render_clip(make_identity(4), 30, PORTRAIT, 48, 0.4, seed=4)
    path = root / "raw" / "rot-phone.mp4"
    if hostile:
        write_mp4(
            path, np.rot90(shown, k=1, axes=(1, 2)), rotation=-90
        )  # displayed = stored turned clockwise
    else:
        write_mp4(path, shown)
    return info_entry("rot-phone", 0.0, 1.2, ROTATED_BBOX, flags=4)


def _vfr_clip(root: Path, hostile: bool) -> dict:
    frames, _, _ = render_clip(make_identity(5), VFR_FRAMES, (256, 192), 56, 0.6, seed=5)
    path = root / "raw" / "vfr-cam.mp4"
    write_mp4(path, frames, vfr_timestamps(VFR_FRAMES) if hostile else None)
    return info_entry("vfr-cam", 0.0, VFR_FRAMES / FPS, STANDARD_BBOX, flags=5)


def _bad_entry(root: Path, case: str, ytb_id: str, identity: int) -> dict:
    """One info entry damaged as `case` says, with its own (good) source video in place."""
    if case == "ytb_id_dotdot":
        make_raw_video(root / "raw" / "tmp", "x", 30, identity)  # lands as ROOT/x.mp4 = raw/../x.mp4
        (root / "raw" / "tmp" / "raw" / "x.mp4").rename(root / "x.mp4")
        shutil.rmtree(root / "raw" / "tmp")
    else:
        make_raw_video(root, ytb_id, 30, identity)
    entry = info_entry(ytb_id, 0.0, 1.0, STANDARD_BBOX)
    if case == "time_nan":
        entry["duration"]["start_sec"] = float("nan")
    elif case == "time_infinity":
        entry["duration"]["end_sec"] = float("inf")
    elif case == "attributes_list":
        entry["attributes"] = entry["attributes"]["appearance"]
    elif case == "attributes_string":
        entry["attributes"] = "happy"
    elif case == "attributes_int_value":
        entry["attributes"] = {"appearance": 1, "action": 0, "emotion": 3}
    elif case == "bbox_outside":
        entry["bbox"] = {"top": -0.5, "bottom": 0.01, "left": 0.3, "right": 0.7}
    return entry


def build_celebvhq(root: Path, hostile: bool = True) -> Corpus:
    """celebvhq_info.json + raw/<ytb_id>.mp4: good clips, a rotated phone video and a variable-frame-rate
    video (stored plainly when not `hostile`), and with `hostile` one entry per CELEBVHQ_CASES case."""
    started = time.perf_counter()
    corpus = Corpus(root, "celebvhq")
    make_raw_video(root, "good-a", 60, identity=0)
    make_raw_video(root, "good_b", 30, identity=1)
    entries = {
        "good-a_0": info_entry("good-a", 0.2, 1.0, STANDARD_BBOX, emotion="happy", flags=0),
        "good-a_1": info_entry("good-a", 1.2, 2.0, STANDARD_BBOX, emotion="sadness", flags=1),
        "good_b_0": info_entry("good_b", 0.0, 0.8, STANDARD_BBOX, emotion="neutral", flags=2),
        ROTATED_CLIP: _rotated_clip(root, hostile),
        VFR_CLIP: _vfr_clip(root, hostile),
    }
    corpus.good = {"good-a_0": 20, "good-a_1": 20, "good_b_0": 20, ROTATED_CLIP: 30, VFR_CLIP: VFR_FRAMES}
    if hostile:
        for n, (case, (item, clip_id, ytb_id)) in enumerate(CELEBVHQ_CASES.items()):
            entries[clip_id] = _bad_entry(root, case, ytb_id, identity=10 + n)
            video = "x.mp4" if case == "ytb_id_dotdot" else f"{ytb_id}.mp4"
            corpus.bad[case] = BadClip(case, item, clip_id, (video,))
    write_info(root, entries)
    if hostile:  # json.dumps writes float nan / inf as the bare literals NaN / Infinity
        text = (root / "celebvhq_info.json").read_text()
        assert '"start_sec": NaN' in text and '"end_sec": Infinity' in text
    corpus.seconds = time.perf_counter() - started
    return corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the hostile VFHQ and CelebV-HQ look-alikes")
    parser.add_argument("dir", type=Path, help="an empty or missing folder")
    parser.add_argument("--clean", action="store_true", help="only the good clips")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for build in (build_vfhq, build_celebvhq):
        corpus = build(args.dir / build.__name__.removeprefix("build_"), hostile=not args.clean)
        log.info(
            "%s: %d good and %d damaged clips, %.1f MB on disk, built in %.1f s",
            corpus.dataset, len(corpus.good), len(corpus.bad), corpus.size_on_disk() / 1e6, corpus.seconds,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
