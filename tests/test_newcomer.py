"""What a new user meets first: messages that state the fix, quiet progress, the Makefile's small things."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from lookalike import REPO, STANDARD_BBOX, info_entry, make_vfhq_clip, write_info

from pipeline import __main__ as cli
from pipeline.config import load_build_config
from pipeline.logs import ProgressLines
from pipeline.report import weights_note
from pipeline.resources import shortfall_message, shortfalls
from pipeline.weights import MissingWeights, load_weight_specs, require_weights
from train.config import load_train_config


@pytest.fixture(autouse=True)
def _keep_ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's logging setup quiets Ray's C++ lines through the environment: undone after each test."""
    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "info")


def run_build(caplog: pytest.LogCaptureFixture, *args: str) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli.main(["build", "--no-progress", *args])
    return code, caplog.text


def test_unknown_keys_say_which_key_was_meant() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'resolution' for 'resolutoin'"):
        load_build_config("demo", overrides=["resolutoin=64"])
    with pytest.raises(ValueError, match=r"did you mean 'batch_size' for 'batch_sise'"):
        load_train_config("stage1", overrides=["data.batch_sise=2"])
    with pytest.raises(ValueError) as info:  # nothing close: no guess, the known keys as before
        load_build_config("demo", overrides=["zzzz=1"])
    assert "did you mean" not in str(info.value) and "known:" in str(info.value)


def test_missing_weights_are_grouped_by_entry_with_the_whole_fetch_command(tmp_path: Path) -> None:
    specs = load_weight_specs()
    with pytest.raises(MissingWeights) as info:
        require_weights(tmp_path, ["sdxl_turbo", "parsenet"])
    message = str(info.value)
    files = int(message.split()[0])  # "N weights file(s) missing or wrong"
    assert f"sdxl_turbo ({files - 1} files)" in message  # every file but parsenet's is sdxl_turbo's
    assert message.count("`weights fetch --for sdxl_turbo`") == 1  # the entry's hint once, not per file
    command = f"python -m pipeline weights fetch --for build --weights-dir {tmp_path}"
    assert command in message
    restricted = [name for name in ("sdxl_turbo", "parsenet") if specs[name].restricted]
    assert restricted and all(f"--accept-licence {name}" in message for name in restricted)


def test_a_missing_root_names_root_before_any_weights_and_leaves_no_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    code, text = run_build(
        caplog, "--dataset", "vfhq", "--root", str(tmp_path / "nowhere"), "--out", str(out),
        f"weights_dir={tmp_path / 'no-weights'}",
    )  # fmt: skip
    assert code == 2 and "ROOT=" in text and "nowhere" in text
    assert "weights" not in text.lower().replace("weights_dir", "")
    assert not out.exists()


def test_a_failed_build_leaves_no_lock_only_output_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, out = tmp_path / "vfhq", tmp_path / "out"
    make_vfhq_clip(root, "abc", 0, 4, layout="none")
    code, text = run_build(
        caplog, "--dataset", "vfhq", "--root", str(root), "--out", str(out),
        f"weights_dir={tmp_path / 'no-weights'}",
    )  # fmt: skip
    assert code == 2 and "weights file(s) missing" in text
    assert not out.exists()


@pytest.mark.parametrize("dataset", ["vfhq", "celebvhq"])
def test_a_demo_build_on_a_real_download_names_the_dataset(
    dataset: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "download"
    if dataset == "vfhq":
        make_vfhq_clip(root, "abc", 0, 4, layout="none")  # meta_info/VFHQ-Train/Clip+...txt
    else:
        write_info(root, {"x_0": info_entry("x", 0.0, 1.0, STANDARD_BBOX)})  # celebvhq_info.json
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code, text = run_build(caplog, "--root", str(root), "--out", str(tmp_path / "out"))  # DATASET: demo
    assert code == 2 and f"DATASET={dataset}" in text
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no demo written into it


def test_progress_in_a_file_is_a_line_at_most_every_minute(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        quiet = ProgressLines(total=500, desc="shards", unit="sample")
        for _ in range(500):
            quiet.update()
        assert not caplog.records  # all within the first minute
        ticking = ProgressLines(total=3, desc="shards", unit="sample", every_s=0.0)
        ticking.update()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["shards: 1/3 sample"]


def test_the_report_says_when_annotations_come_from_random_weights(tmp_path: Path) -> None:
    def build_json(profile: str, stages: list[str]) -> Path:
        out = tmp_path / profile
        out.mkdir()
        config = {"profile": profile, "stages": [{"name": name} for name in stages]}
        (out / "build.json").write_text(json.dumps({"config": config}))
        return out

    tiny = weights_note(build_json("tiny", ["face_mask", "gaze"]))
    assert "RANDOM WEIGHTS" in tiny and "face_mask" in tiny and "profile=full" in tiny
    assert "real weights" in weights_note(build_json("full", ["face_mask"]))
    assert "unknown" in weights_note(tmp_path / "nothing")
    notebook = (REPO / "notebooks" / "shard_stats.ipynb").read_text()
    assert "weights_note(OUT)" in notebook  # the notebook (make report / make notebook) prints it


def test_a_shortfall_names_the_numbers_and_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from train.preflight import PreflightError, check_inputs, training_demand

    config = load_train_config("stage1", overrides=["num_workers=8", "use_gpu=true", "cpus_per_worker=4"])
    demand = training_demand(config, [{"CPU": 2.0}])
    message = shortfall_message(demand, shortfalls(demand, [{"CPU": 2.0}]))
    assert "GPU: need 8, cluster has 0" in message and "CPU: need 32, cluster has 2" in message
    assert "num_workers=1 use_gpu=false" in message
    on_gpus = training_demand(config, [{"CPU": 64.0, "GPU": 2.0}])
    assert "num_workers=2" in shortfall_message(on_gpus, shortfalls(on_gpus, [{"CPU": 64.0, "GPU": 2.0}]))

    config.data.root = str(tmp_path / "nowhere")
    with pytest.raises(PreflightError, match="data.root=.*nowhere does not exist"):
        check_inputs(config)
    shards = tmp_path / "shards"
    shards.mkdir()
    config.data.root = str(tmp_path)
    with tarfile.open(shards / "shard-a.tar", "w"):
        pass  # an empty tar without its stats marker: written but never committed
    with pytest.raises(PreflightError, match="no committed shards"):
        check_inputs(config)
    stats = {"shard": "shard-a.tar", "split": "train", "samples": 0, "keys": []}  # the commit marker
    (shards / "shard-a.stats.json").write_text(json.dumps(stats))
    monkeypatch.delenv("WEIGHTS_DIR", raising=False)
    config.model.profile, config.model.weights_dir = "full", None
    with pytest.raises(PreflightError, match="model.weights_dir=<folder>"):
        check_inputs(config)
    config.model.profile = "tiny"
    check_inputs(config)  # committed train shards, tiny weights: nothing missing


def make(*args: str) -> str:
    """`make -n` as a user's shell runs it: not as a sub-make of `make test` (MAKELEVEL would be 1)."""
    command = ["make", "-n", *args, f"BIN={Path(sys.executable).parent}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, env=env).stdout


def test_make_fetches_the_evaluation_assets_once_per_run_and_opens_the_notebook() -> None:
    assert make("train-demo").count("evaluation.assets") == 1  # not again in its shards and ray-up
    assert "default_url=/lab/tree/notebooks/shard_stats.ipynb" in make("notebook")
