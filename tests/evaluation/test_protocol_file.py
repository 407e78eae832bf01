"""Protocol files (`python -m evaluation protocol make`) and scoring another method's videos on one
(`compare --protocol FILE --pred-dir DIR`); evaluation's messages: per-clip progress, the results line,
skipped clips with their reason, ↑/↓ and units in results.md, labelled grid panels, the squaring warning."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from evaluation.protocol import content_hash, read_benchmark, write_benchmark
from pipeline.video import read_video_frames

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))  # the trainer tests' synthetic shard writer

from shard_helpers import read_code, synthetic_frame, write_synthetic_shards  # noqa: E402

SIZE, FRAMES = 64, 8
KEYS = [f"synthetic__clip{i}__s000" for i in range(30, 34)]  # clip32 is too short (6 frames)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test split of four clips (identities id30-id33) at 64², one of them 6 frames long."""
    out = tmp_path_factory.mktemp("protocol_shards")
    write_synthetic_shards(
        out, samples=4, shards=1, frames=12, size=SIZE, lengths=[12, 12, 6, 12], buckets=("real", "swap"),
        split="test", first=30,
    )  # fmt: skip
    return out


def evaluation_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evaluation", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def protocol_file(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """`protocol make` through the CLI's main (in this process: no second torch import): the file,
    what it printed and what it logged."""
    from evaluation.__main__ import main

    path = tmp_path_factory.mktemp("protocol") / "bench.json"
    handler, logger, stdout = Collected(), logging.getLogger("evaluation.protocol"), io.StringIO()
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(stdout):
            code = main([
                "protocol", "make", "--shards", str(shards), "--split", "test", "--out", str(path),
                "--num-clips", "4", "--num-frames", str(FRAMES), "--resolution", str(SIZE), "--backend", "dlib",
            ])  # fmt: skip
    finally:
        logger.removeHandler(handler)
    assert code == 0
    return path, stdout.getvalue(), "\n".join(handler.lines)


def test_protocol_make_writes_clips_frames_pairs_and_hash(protocol_file) -> None:
    path, printed, logged = protocol_file
    data = json.loads(path.read_text())
    usable = [KEYS[0], KEYS[1], KEYS[3]]
    assert [c["key"] for c in data["clips"]] == usable
    for clip in data["clips"]:  # stride 1 by default: every frame from the clip's first; reference = first
        assert clip["frames"] == list(range(FRAMES)) and clip["reference_frame"] == 0
    identity = {c["key"]: c["identity"] for c in data["clips"]}
    assert identity == {KEYS[0]: "id30", KEYS[1]: "id31", KEYS[3]: "id33"}
    pairs = data["cross_pairs"]
    assert sorted(p["driving_clip"] for p in pairs) == usable
    assert all(p["reference_clip"] != p["driving_clip"] for p in pairs)
    assert all(
        identity[p["reference_clip"]] == p["reference_identity"] != p["driving_identity"] for p in pairs
    )
    metrics = data["metrics"]
    assert metrics["distribution"]["name"] == "stylegan-v" and metrics["distribution"]["fvd_frames"] == 16
    assert metrics["resolution"] == SIZE and metrics["backend"] == "dlib" and "fvd" in metrics["names"]
    stored = data.pop("hash")
    assert stored == content_hash(data) and stored in printed
    # --num-clips 4 gives 3: the short clip and the reason are named.
    assert data["excluded"] == {KEYS[2]: f"6 frames; {FRAMES} frames at stride 1 need {FRAMES}"}
    assert f"clip {KEYS[2]} skipped: 6 frames" in logged
    assert "asked for 4 clips, the 'test' split has 3 usable" in logged


def test_protocol_file_round_trips_as_yaml_and_refuses_an_edit(protocol_file, tmp_path: Path) -> None:
    benchmark = read_benchmark(protocol_file[0])
    yaml_path = tmp_path / "bench.yaml"
    write_benchmark(benchmark, yaml_path)
    again = read_benchmark(yaml_path)
    assert again == benchmark and again.hash == benchmark.hash
    edited = json.loads(protocol_file[0].read_text())
    edited["clips"][0]["frames"] = list(range(1, FRAMES + 1))
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="the file was edited"):
        read_benchmark(tmp_path / "edited.json")


def write_pyav_mp4(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """Another method's output: a plain PyAV H.264 writer (not the project's encoder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


@pytest.mark.slow
def test_compare_protocol_scores_another_methods_videos(protocol_file, tmp_path: Path) -> None:
    """clip30: the ground truth shifted 2 px right (scored); clip31: 4 frames (too short); clip33: no
    video; one cross video. Both commands' outputs: the protocol hash in metrics.json, per-clip errors,
    the frames scored are the protocol's frames, progress lines and the results line."""
    path = protocol_file[0]
    truth = np.stack([synthetic_frame(t, SIZE) for t in range(FRAMES)])
    shifted = np.roll(truth, 2, axis=2)
    pred_dir = tmp_path / "method"
    write_pyav_mp4(pred_dir / f"{KEYS[0]}.mp4", shifted)
    write_pyav_mp4(pred_dir / f"{KEYS[1]}.mp4", truth[:4])
    pairs = json.loads(path.read_text())["cross_pairs"]
    write_pyav_mp4(pred_dir / "cross" / f"{pairs[0]['driving_clip']}.mp4", truth)
    out = tmp_path / "scores"
    result = evaluation_cli(
        "compare", "--protocol", str(path), "--pred-dir", str(pred_dir), "--weights-dir", str(tmp_path / "none"),
        "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"results: {out / 'results.md'}"
    total = 3 + len(pairs)
    assert f"clip 1/{total} self:{KEYS[0]}: done" in result.stderr
    assert f"clip 2/{total} self:{KEYS[1]}: error" in result.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["protocol_file"]["hash"] == read_benchmark(path).hash
    assert summary["self"]["backend"] == "dlib"  # the protocol file's backend
    errors = summary["self"]["errors"]
    assert errors[f"self:{KEYS[1]}"] == f"{KEYS[1]}.mp4: 4 frames, the protocol scores {FRAMES}"
    assert errors[f"self:{KEYS[3]}"].startswith(f"no prediction {pred_dir / (KEYS[3] + '.mp4')}")
    assert summary["self"]["clips"] == 1 and len(summary["cross"]["errors"]) == len(pairs) - 1
    frames = pd.read_parquet(out / "frames.parquet")
    own = frames[frames["setting"] == "self"]
    assert len(own) == FRAMES and (own["clip"] == f"self:{KEYS[0]}").all()
    # The frames scored are the protocol's: PSNR per frame as computed by hand against the clip's frames t.
    decoded = read_video_frames(pred_dir / f"{KEYS[0]}.mp4")
    assert [read_code(f) for f in np.roll(decoded, -2, axis=2)] == list(range(FRAMES))
    by_hand = [psnr(decoded[t], truth[t]) for t in range(FRAMES)]
    assert np.allclose(own["psnr"], by_hand, atol=1.0), (own["psnr"].tolist(), by_hand)
    assert not np.allclose(
        own["psnr"], [psnr(decoded[t], truth[(t + 1) % FRAMES]) for t in range(FRAMES)], atol=1.0
    )
    assert summary["self"]["metrics"]["psnr"] == pytest.approx(np.mean(by_hand), abs=1.0)
    crossed = pd.read_parquet(out / "pairs.parquet")
    assert crossed["driving_clip"].tolist() == [pairs[0]["driving_clip"]]
    results = (out / "results.md").read_text()
    assert (
        "psnr [dB] ↑" in results
        and "l1 [1 (RGB in [0,1])] ↓" in results
        and read_benchmark(path).hash in results
    )
    assert f"self:{KEYS[3]} not scored: no prediction" in results


def test_results_table_gives_direction_and_unit_per_metric(tmp_path: Path) -> None:
    from evaluation.outputs import markdown_table
    from evaluation.scoring import Evaluator

    evaluator = Evaluator(tmp_path, "insightface", "cpu")  # empty weights: pixel metrics only
    target = np.full((2, 16, 16, 3), 100, np.uint8)
    table = markdown_table({"self": evaluator.summarise([evaluator.score_clip(target + 10, target)])})
    header = table.splitlines()[0]
    for cell in ("psnr [dB] ↑", "ssim [1] ↑", "l1 [1 (RGB in [0,1])] ↓", "psnr_frames [dB] ↑"):
        assert cell in header, header


def test_grid_panels_are_labelled(tmp_path: Path) -> None:
    """Four flat grey panels: after labelling, each panel's top-left corner holds bright and dark text
    pixels, its lower half stays flat."""
    from evaluation.run import write_grid

    panels = [np.full((1 if i == 0 else 3, SIZE, SIZE, 3), 128, np.uint8) for i in range(4)]
    write_grid(tmp_path / "grid.mp4", panels)
    grid = read_video_frames(tmp_path / "grid.mp4")
    assert grid.shape == (3, SIZE, 4 * SIZE, 3)
    for i in range(4):
        panel = grid[1, :, i * SIZE : (i + 1) * SIZE].astype(int)
        corner = panel[: SIZE // 4, : SIZE // 2]
        assert corner.max() > 200 and corner.min() < 60, i
        assert np.abs(panel[SIZE // 2 :] - 128).max() < 10, i


def test_compare_warns_when_it_squares_a_non_square_target(
    carphone: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from evaluation.compare import compare_videos
    from pipeline.video import encode_mp4

    pred, target = tmp_path / "pred.mp4", tmp_path / "target.mp4"
    target.write_bytes(encode_mp4(carphone[:3], 8.0))  # 176x144
    square = np.stack([np.ascontiguousarray(f[:, 16:160]) for f in carphone[:3]])  # 144x144
    pred.write_bytes(encode_mp4(square, 8.0))
    with caplog.at_level(logging.WARNING, logger="evaluation.frames"):
        compare_videos(pred, target, tmp_path / "out", weights_dir=tmp_path / "none", device="cpu")
    assert any("176x144, squared to 144x144" in r.getMessage() for r in caplog.records), caplog.text
    assert (tmp_path / "out" / "results.md").is_file()


def test_run_takes_every_source_frame_by_default() -> None:
    from evaluation.run import RunOptions

    assert RunOptions().stride == 1
