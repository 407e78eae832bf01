"""The latent-cache pass: committed like the shards, resumable after a kill, bf16 within its rounding."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from shard_helpers import write_synthetic_shards

from pipeline import storage
from pipeline.__main__ import EXIT_OK, EXIT_USAGE, main
from pipeline.latents import LATENT_DIR, LATENT_MEMBER, latent_paths, load_vae, run_latents
from pipeline.writer import STATS_SUFFIX


class Killed(BaseException):
    """Stands for the process dying mid-shard (raised from inside the real VAE's forward)."""


@pytest.fixture(scope="module")
def weights(tiny_model_weights: Path) -> Path:
    return tiny_model_weights


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two committed shards of two short clips each."""
    return write_synthetic_shards(tmp_path_factory.mktemp("out"), samples=4, shards=2, frames=6, size=64)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_killed_pass_leaves_no_partial_file_and_a_rerun_finishes(
    shards: Path, weights: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    for path in shards.glob("shard-*"):
        (folder / path.name).write_bytes(path.read_bytes())
    vae = load_vae("tiny", str(weights))
    calls = []

    def die_on_third_sample(*_: object) -> None:
        calls.append(1)
        if len(calls) == 3:  # the first shard (two samples) is committed, the second is not
            raise Killed

    hook = vae.encoder.register_forward_hook(die_on_third_sample)
    with pytest.raises(Killed):
        run_latents([str(folder)], vae, torch.device("cpu"))
    hook.remove()
    first, second = sorted(str(p) for p in folder.glob("*.tar"))
    latents = folder / LATENT_DIR
    assert visible(latents) == sorted(Path(p).name for p in latent_paths(first))
    # What a SIGKILL between the tar's rename and the marker leaves, and an unrenamed temp file.
    tar, _ = latent_paths(second)
    Path(tar).write_bytes(b"half")
    (latents / ".stale.tar.tmp-0000").write_bytes(b"half")

    summary = run_latents([str(folder)], vae, torch.device("cpu"))
    assert summary.cached == [first] and summary.encoded == [second] and not summary.failed
    assert [p.name for p in latents.iterdir() if p.name.startswith(".")] == []
    for shard in (first, second):
        tar, marker = latent_paths(shard)
        stats = json.loads(Path(marker).read_text())
        assert stats["samples"] == 2 and stats["dtype"] == "fp32" and stats["resolution"] == 64
        assert Path(tar).stat().st_size == stats["bytes"]
    again = run_latents([str(folder)], vae, torch.device("cpu"))
    assert again.encoded == [] and len(again.cached) == 2
    other = run_latents([str(folder)], vae, torch.device("cpu"), dtype="bf16")  # other settings: redone
    assert other.encoded == [first, second]
    assert json.loads(Path(latent_paths(first)[1]).read_text())["dtype"] == "bf16"


def test_bf16_latents_take_half_the_bytes_within_bf16_rounding(
    shards: Path, weights: Path, tmp_path: Path
) -> None:
    vae = load_vae("tiny", str(weights))
    stored = {}
    for dtype in ("fp32", "bf16"):
        folder = tmp_path / dtype / "shards"
        folder.mkdir(parents=True)
        shard = sorted(shards.glob("*.tar"))[0]
        for path in shards.glob(f"{shard.stem}*"):
            (folder / path.name).write_bytes(path.read_bytes())
        run_latents([str(folder)], vae, torch.device("cpu"), dtype=dtype)
        with tarfile.open(latent_paths(str(folder / shard.name))[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(LATENT_MEMBER))
            stored[dtype] = load_tensors(tar.extractfile(member).read())["latents"]
    assert stored["bf16"].dtype == torch.bfloat16 and stored["fp32"].dtype == torch.float32
    assert stored["bf16"].element_size() * 2 == stored["fp32"].element_size()
    relative = (stored["bf16"].float() - stored["fp32"]).abs() / stored["fp32"].abs().clamp(min=1e-12)
    assert float(relative.max()) <= 2**-8  # bf16 keeps 8 significant bits: rounding is within 2^-8


def test_the_command_says_when_there_is_nothing_to_encode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["latents", "--out", str(tmp_path), "--profile", "tiny", "--device", "cpu"]) == EXIT_USAGE
    assert "no committed shards" in caplog.text


def test_the_command_encodes_and_a_rerun_has_nothing_left(
    shards: Path, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    for path in shards.glob("shard-*"):
        (out / "shards" / path.name).write_bytes(path.read_bytes())
    args = [
        "latents",
        "--out",
        str(out),
        "--profile",
        "tiny",
        "--weights-dir",
        str(weights),
        "--device",
        "cpu",
    ]
    assert main(args) == EXIT_OK
    markers = sorted((out / "shards" / LATENT_DIR).glob(f"*{STATS_SUFFIX}"))
    assert len(markers) == 2
    before = [m.stat().st_mtime_ns for m in markers]
    assert main(args) == EXIT_OK
    assert [m.stat().st_mtime_ns for m in markers] == before


@pytest.mark.slow
def test_on_an_object_store_the_pass_commits_and_the_trainer_reads_the_cache(
    shards: Path, weights: Path
) -> None:
    from s3_helpers import aws_environment, moto_server, object_keys, s3_client

    from train.data import DataConfig, fixed_batch

    with moto_server() as endpoint, aws_environment(endpoint):
        s3_client().create_bucket(Bucket="latents-test")
        root = "s3://latents-test/out"
        storage.upload_tree(shards, f"{root}/shards")
        vae = load_vae("tiny", str(weights))
        summary = run_latents([f"{root}/shards"], vae, torch.device("cpu"))
        assert len(summary.encoded) == 2 and not summary.failed
        latent_objects = object_keys("latents-test", "out/shards/latents/")
        assert len(latent_objects) == 4  # two tars and their markers, nothing else
        config = DataConfig(
            root=root, num_frames=3, stride=1, resolution=64, num_workers=0, latents="required"
        )
        batch = fixed_batch(config, 2)
        assert batch["target_latents"].shape == (2, 3, 4, 8, 8)
        assert run_latents([f"{root}/shards"], vae, torch.device("cpu")).encoded == []
