"""Object storage end to end against a real S3 API server (moto, on 127.0.0.1): a demo build and its gaze
subset written to s3://, a build killed mid-run and rerun, and a tiny training run that streams its shards
from S3, checkpoints to S3 and is resumed from there."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import webdataset as wds
from ray_helpers import kill_tree
from s3_helpers import aws_environment, moto_server, object_keys, s3_client

from pipeline import storage
from pipeline.writer import STATS_SUFFIX, committed_keys, read_stats
from train.config import load_train_config
from train.data import DataConfig, TarSamples, list_shards, make_loader

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BUCKET = "megactor-test"
TINY = str(REPO / "configs" / "train" / "tiny.yaml")
# Small demo; the trainer needs face and foreground masks, select needs gaze scores, and the swap
# bucket reads the identity bank the build writes to S3: those four annotators (style would add SDXL).
SMALL = [
    "demo.identities=3", "demo.vfhq_clips=3", "demo.celebvhq_clips=3", "demo.min_frames=20",
    "demo.max_frames=40", "max_frames=24", "min_frames=8", "resolution=128", "samples_per_shard=2",
    "mix={real: 0.6, swap: 0.4, style: 0.0}",
]  # fmt: skip
OVERLAY = """
stages:
  - {name: face_mask, num_cpus: 0.2, pool_size: 1, batch_size: 1,
     options: {model: bisenet, input_size: 128, frame_batch: 16}}
  - {name: foreground, num_cpus: 0.2, pool_size: 1, batch_size: 1,
     options: {backend: parsing, parsing_model: bisenet, input_size: 128, frame_batch: 16}}
  - {name: gaze, num_cpus: 0.2, pool_size: 1, batch_size: 1, options: {input_size: 224, frame_batch: 16}}
  - {name: swap, num_cpus: 0.2, pool_size: 1, batch_size: 1}
"""


def pipeline_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [PYTHON, "-m", "pipeline", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def s3_samples(shards_uri: str) -> list[dict]:
    """Every sample of the committed shards under a prefix, streamed as the trainer reads them."""
    urls = [storage.join(shards_uri, s["shard"]) for s in read_stats(shards_uri)]
    return list(wds.DataPipeline(wds.SimpleShardList(sorted(urls)), TarSamples(wds.reraise_exception)))


def uncommitted(bucket: str, prefix: str) -> list[str]:
    """Objects in a shard prefix whose commit marker is missing (pyarrow's empty `dir/` markers aside)."""
    keys = [k for k in object_keys(bucket, prefix) if not k.endswith("/")]
    committed = {k[: -len(STATS_SUFFIX)] for k in keys if k.endswith(STATS_SUFFIX)}
    return [k for k in keys if k.split(".", 1)[0] not in committed]


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A fresh moto S3 server and bucket; yields s3://BUCKET. The AWS env is set for the module."""
    with moto_server() as endpoint, aws_environment(endpoint):
        s3_client().create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def s3_demo(s3: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The small annotated demo built to s3://BUCKET/demo, and its gaze subset (`select`)."""
    base = tmp_path_factory.mktemp("s3demo")
    overlay = base / "overlay.yaml"
    overlay.write_text(OVERLAY)
    out = f"{s3}/demo"
    build = pipeline_cli(
        "build", "--no-progress", "--dataset", "demo", "--root", str(base / "data"), "--out", out,
        "--config", str(overlay), *SMALL, timeout=900,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    select = pipeline_cli("select", "--out", out, "--min-frames", "4")
    assert select.returncode == 0, select.stderr[-4000:]
    return out


def test_demo_build_to_s3_matches_a_local_build_and_select_writes_the_subset(
    s3_demo: str, tmp_path: Path
) -> None:
    keys = object_keys(BUCKET, "demo/")
    names = (
        "build.json",
        "manifest.parquet",
        "index.parquet",
        "failures.parquet",
        ".build.lock",
        "identities.parquet",
    )
    for name in names:
        assert f"demo/{name}" in keys, name
    assert not uncommitted(BUCKET, "demo/shards/")
    assert not [k for k in keys if "/." in k and not k.endswith(".build.lock")], "a temp object is visible"

    index = storage.read_parquet(f"{s3_demo}/index.parquet")
    samples = s3_samples(f"{s3_demo}/shards")
    assert (
        sorted(s["__key__"] for s in samples)
        == sorted(index["key"])
        == sorted(committed_keys(f"{s3_demo}/shards"))
    )
    assert all({"real.mp4", "face.npz", "fg.npz", "gaze.npy", "json"} <= set(s) for s in samples), (
        "annotators ran"
    )
    # The swap bucket's sources came from the identity bank on S3.
    swapped = [s for s in samples if json.loads(s["json"])["bucket"] == "swap"]
    assert swapped and all("swap.mp4" in s for s in swapped)
    assert len(storage.read_parquet(f"{s3_demo}/identities.parquet")) >= 2

    # The same recipe built to a local folder plans and writes the same samples.
    local = tmp_path / "out"
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(OVERLAY)
    result = pipeline_cli(
        "build", "--no-progress", "--dataset", "demo", "--root", str(tmp_path / "data"), "--out", str(local),
        "--config", str(overlay), *SMALL, "stages=[]",  # keys do not depend on the annotators
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(pd.read_parquet(local / "index.parquet")["key"]) == sorted(index["key"])

    # The gaze subset: its own committed shards on S3, select.json written last, stats reads it all.
    selection = json.loads(storage.read_bytes(f"{s3_demo}/gaze/select.json"))
    assert selection["selected"] >= 1 and selection["shards"] >= 1
    subset = s3_samples(f"{s3_demo}/gaze/shards")
    assert sorted(s["__key__"] for s in subset) == selection["keys"]
    assert not uncommitted(BUCKET, "demo/gaze/shards/")
    again = pipeline_cli("select", "--out", s3_demo, "--min-frames", "4")
    assert again.returncode == 0 and "up to date" in again.stderr
    stats = pipeline_cli("stats", s3_demo)
    assert stats.returncode == 0, stats.stderr[-3000:]
    assert (
        f"{len(index)} samples" in stats.stdout and f"gaze subset: {selection['selected']} of" in stats.stdout
    )


def test_report_runs_the_notebook_on_the_build_in_s3(s3_demo: str) -> None:
    """`python -m pipeline report --out s3://...`: the notebook reads index, stats and sample tars from
    the bucket (its kernel inherits the AWS environment) and the HTML lands beside the build."""
    result = pipeline_cli("report", "--out", s3_demo)
    assert result.returncode == 0, result.stderr[-3000:]
    html = storage.read_text(f"{s3_demo}/shard_stats.html")
    assert html.count("data:image/png") >= 5  # buckets, splits, gaze, the 2x2 panel, the sample frames
    assert "Traceback" not in html and "real" in html


def test_a_build_killed_mid_run_on_s3_reruns_to_every_sample_exactly_once(s3: str, tmp_path: Path) -> None:
    out, prefix = f"{s3}/killed", "killed/shards/"
    args = ["--dataset", "demo", "--root", str(tmp_path / "demo"), "--out", out]
    # No annotators, one sample per shard and one CPU: many small commits, so the kill lands mid-run.
    slow = [*SMALL, "stages=[]", "samples_per_shard=1", "num_cpus=1"]
    process = subprocess.Popen(
        [PYTHON, "-m", "pipeline", "build", "--no-progress", *args, *slow],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not [
        k for k in object_keys(BUCKET, prefix) if k.endswith(STATS_SUFFIX)
    ]:
        assert process.poll() is None, "the build ended before it could be killed"
        time.sleep(0.2)
    kill_tree(process)  # the whole job at once, as a scheduler does
    manifest_keys = set(storage.read_parquet(f"{out}/manifest.parquet")["key"])
    committed = committed_keys(f"{out}/shards")
    assert 0 < len(committed) < len(manifest_keys), "the kill should land part-way"

    # A shard whose tar and index part made it but whose marker did not (killed between the two PUTs).
    orphan = "shard-0123456789abcdef"
    storage.put_bytes(f"{out}/shards/{orphan}.tar", b"a tar whose marker was never written")
    storage.put_bytes(f"{out}/shards/{orphan}.index.parquet", b"its index part")
    data = DataConfig(root=out, split="train")
    assert all(orphan not in url for url in list_shards(data)), "a reader listed an uncommitted shard"
    assert orphan not in {s["shard"] for s in read_stats(f"{out}/shards")}

    rerun = pipeline_cli("build", "--no-progress", *args, *slow)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"already built {len(committed)}" in rerun.stderr
    assert not uncommitted(BUCKET, prefix), "the rerun left objects without a marker"
    samples = s3_samples(f"{out}/shards")
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(manifest_keys)  # every sample, each exactly once
    assert sorted(storage.read_parquet(f"{out}/index.parquet")["key"]) == sorted(keys)


def read_step_log(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def registered_steps(bucket: str, prefix: str) -> list[int]:
    key = f"{prefix}/checkpoint_manager_snapshot.json"
    if key not in object_keys(bucket, key):
        return []
    body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return [r["metrics"]["step"] for r in json.loads(body)["checkpoint_results"]]


def test_training_streams_shards_from_s3_checkpoints_there_and_resumes(s3_demo: str, s3: str) -> None:
    storage_path = f"{s3}/train"
    overrides = [
        f"data.root={s3_demo}", f"storage_path={storage_path}", "name=s3run", "checkpoint_every=2",
        "data.steps_per_epoch=3", "validation.every=4", "validation.loss_every=0", "validation.split=train",
        "progress=false",
    ]  # fmt: skip
    command = [PYTHON, "jobs/stage1.py", "--config", TINY, *overrides]
    first = subprocess.run([*command, "max_steps=2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert registered_steps(BUCKET, "train/s3run") == [2]
    # A relaunch with more steps resumes from the step-2 checkpoint on S3 (mid-epoch: 3 steps per epoch).
    second = subprocess.run([*command, "max_steps=4"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert registered_steps(BUCKET, "train/s3run") == [2, 4]

    run = f"{storage_path}/s3run"
    log = read_step_log(f"{run}/steps.jsonl")
    starts = [line for line in log if line.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, 2], "the relaunch did not resume from the S3 checkpoint"
    steps = [line for line in log if "keys" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]  # continued, none repeated
    # The data position continued: the stream read from S3 gives the same batches for those steps.
    config = load_train_config("stage1", [TINY], overrides)
    expected = {}
    for epoch in range(2):
        for position, batch in enumerate(
            make_loader(config.data, seed=config.seed, epoch=epoch, rank=0, world_size=1)
        ):
            expected[epoch * 3 + position + 1] = list(batch["key"])
    assert all(line["keys"] == expected[line["step"]] for line in steps)

    objects = object_keys(BUCKET, "train/s3run/")
    assert any(
        k.startswith("train/s3run/checkpoint_0000004/") and k.endswith("model.safetensors") for k in objects
    )
    assert any("/tensorboard/events.out.tfevents" in k for k in objects), objects
    assert "train/s3run/validation/step_0000004.mp4" in objects, objects


def test_stage_2_starts_from_the_stage_1_checkpoint_on_s3(s3: str, tmp_path: Path) -> None:
    """init_from=<run name> under an s3:// storage_path: the latest checkpoint's model, downloaded."""
    from safetensors.torch import load_file

    from train.ray_train import build_model, prepare

    if not registered_steps(BUCKET, "train/s3run"):
        pytest.skip("needs the training run of the test above")
    config = load_train_config("stage2", [TINY], [f"storage_path={s3}/train", "model.init_from=s3run"])
    config = prepare(config)
    assert config.model.init_from == f"{s3}/train/s3run/checkpoint_0000004/model"
    model = build_model(config)
    storage.download_tree(config.model.init_from, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    shared = [name for name in saved if name in state]
    assert shared and all(torch.equal(state[name], saved[name]) for name in shared)
