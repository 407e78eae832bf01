"""The trainer through its real entry points on the demo shards: a killed 2-worker run resumes, FSDP
trains like DDP (the killed run's step-2 checkpoint is the DDP reference), and `ray job submit` runs
stage 2 to a checkpoint, whose relaunch keeps stage 1's model settings."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ray_helpers import PYTHON, RAY, REPO, kill_tree, loopback_head
from safetensors.torch import load_file
from shard_helpers import write_synthetic_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from model.config import MegActorConfig
from model.loading import build_megactor, save_checkpoint
from train.checkpoint import MODEL_DIR, STATE_DIR, STATE_FILE, latest_checkpoint, read_train_state
from train.config import load_train_config
from train.data import make_loader

pytestmark = pytest.mark.slow

TINY = str(REPO / "configs" / "train" / "tiny.yaml")


def registered_steps(run_dir: Path) -> list[int]:
    """Checkpoint steps Ray Train has registered for the run (what a relaunch resumes from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, json.JSONDecodeError, KeyError):
        return []
    return [r["metrics"]["step"] for r in results]


def read_step_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a TensorBoard scalar over every launch of a run (a later launch wins)."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {event.step: event.value for event in events.Scalars(tag)}


def saved_state(checkpoint: Path, scratch: Path) -> dict:
    """A training checkpoint's DCP state as one nested dict of full tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / STATE_DIR, scratch)
    return torch.load(scratch, weights_only=True)


@dataclasses.dataclass
class KilledRun:
    """A two-worker DDP run SIGKILLed after its first checkpoint, and what it left."""

    overrides: list[str]  # its settings; a relaunch with the same ones resumes it
    run_dir: Path
    killed_log: list[dict]  # its step log at the kill
    # Its step-2 checkpoint, read before a relaunch can rotate it away: the DDP reference FSDP must match.
    losses: list[float]  # steps 1 and 2
    weights: dict[str, torch.Tensor]  # the optimiser's own (DCP state)
    averaged: dict[str, torch.Tensor]  # the exported EMA


def ddp_overrides(demo_out: Path, storage: Path, weights: Path, name: str, strategy: str) -> list[str]:
    """Two CPU workers on the demo shards, EMA on, a checkpoint every 2 steps, no held-out validation."""
    return [
        f"data.root={demo_out}", f"storage_path={storage}", f"name={name}", f"strategy={strategy}",
        "num_workers=2", "cpus_per_worker=0.5", "checkpoint_every=2", "data.steps_per_epoch=3",
        "validation.every=0", "validation.loss_every=0", "progress=false", f"model.weights_dir={weights}",
        "ema.enabled=true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def killed_run(
    demo_out: Path, tiny_model_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> KilledRun:
    """`jobs/stage1.py` (max_steps=40) killed whole once Ray Train has registered a checkpoint. Nothing
    in steps 1-2 depends on max_steps (constant LR, per-step noise seeds), so its step-2 checkpoint is
    what an uninterrupted 2-step DDP run ends with."""
    base = tmp_path_factory.mktemp("killed")
    overrides = ddp_overrides(demo_out, base / "train", tiny_model_weights, "resume", "ddp")
    first = subprocess.Popen(
        [PYTHON, "jobs/stage1.py", "--config", TINY, *overrides, "max_steps=40"], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    run_dir = base / "train" / "resume"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not registered_steps(run_dir):
        assert first.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    kill_tree(first)
    killed_log = read_step_log(run_dir)
    assert registered_steps(run_dir), "no checkpoint was registered before the deadline"
    step2 = run_dir / "checkpoint_0000002"
    assert (step2 / MODEL_DIR / "model.safetensors").is_file(), sorted(p.name for p in run_dir.iterdir())
    return KilledRun(
        overrides=overrides,
        run_dir=run_dir,
        killed_log=killed_log,
        losses=[line["loss"] for line in killed_log if "loss" in line and line["step"] <= 2],
        weights=saved_state(step2, base / "ddp.pt")["model"],
        averaged=load_file(str(step2 / MODEL_DIR / "model.safetensors")),
    )


def test_a_killed_two_worker_run_resumes_its_steps_and_data_position(
    demo_out: Path, killed_run: KilledRun
) -> None:
    run_dir, overrides, killed_log = killed_run.run_dir, killed_run.overrides, killed_run.killed_log
    command = [PYTHON, "jobs/stage1.py", "--config", TINY, *overrides]
    second = subprocess.run([*command, "max_steps=8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]

    log = read_step_log(run_dir)
    starts = [i for i, line in enumerate(log) if line.get("event") == "start"]
    assert len(starts) == 2, "expected one start per launch"
    resumed = log[starts[1]]
    resumed_at = resumed["step"]
    assert resumed_at > 0 and resumed_at % 2 == 0, f"resumed from step {resumed_at}, not a checkpoint"
    after = log[starts[1] + 1 :]
    assert [line["step"] for line in after] == list(range(resumed_at + 1, 9))  # steps continue, none repeated

    # Data position: the resumed steps see exactly the batches an uninterrupted run's rank 0 would see.
    config = load_train_config("stage1", [TINY], [*overrides, "max_steps=8"])
    config.data.root = str(demo_out)
    expected: dict[int, list[str]] = {}
    for epoch in range(3):
        loader = make_loader(config.data, seed=config.seed, epoch=epoch, rank=0, world_size=2)
        for position, batch in enumerate(loader):
            expected[epoch * 3 + position + 1] = list(batch["key"])
    assert (resumed["epoch"], resumed["batch"]) == divmod(resumed_at, 3)
    for line in after:
        assert line["keys"] == expected[line["step"]], f"step {line['step']}: wrong data position"
        assert (line["epoch"], line["batch"]) == divmod(line["step"] - 1, 3)
    for line in killed_log:  # the killed run, too, followed the same stream
        if "keys" in line:
            assert line["keys"] == expected.get(line["step"], line["keys"])
    restart = [expected[s] for s in range(1, 9 - resumed_at)]
    assert [line["keys"] for line in after] != restart, "a restart from step 0 would have seen the same data"

    final = latest_checkpoint(run_dir)
    state = read_train_state(final)
    assert (state.step, state.samples_seen) == (8, 16)  # 2 workers x batch 1 x 8 steps
    # The loader counts of this launch are both ranks' (one sample per batch, none skipped), not rank 0's.
    assert tensorboard_scalars(run_dir, "data/samples")[8] == 2 * (8 - resumed_at)
    assert (state.epoch, state.epoch_offset) == (2, 2)
    assert (final / MODEL_DIR / "model.safetensors").is_file() and (final / STATE_FILE).is_file()


def test_stage_2_through_ray_job_submit_then_relaunched_keeps_stage_1s_model(
    demo_out: Path, tiny_model_weights: Path, tmp_path: Path
) -> None:
    """`ray job submit --working-dir . -- python jobs/stage2.py ...` against a loopback head, from a stage 1
    trained with v-prediction, reference dropout 0.3 and the Ada branch; relaunched after its checkpoint,
    it resumes that model (not the stage-2 YAML's) and ends at the planned step. EMA on; held-out
    validation (loss, video, reconstruction metrics) on a val shard."""
    storage = tmp_path / "train"
    settings = {"prediction_type": "v_prediction", "reference_dropout": 0.3, "driven_ada": True}
    save_checkpoint(build_megactor(tiny_model_weights, MegActorConfig(**settings)), tmp_path / "stage1")
    held_out = write_synthetic_shards(tmp_path / "val", samples=1, shards=1, frames=40, split="val")
    args = [
        "--config", "configs/train/tiny.yaml", f"data.root={demo_out}", f"storage_path={storage}",
        "progress=false", f"model.weights_dir={tiny_model_weights}", f"model.init_from={tmp_path / 'stage1'}",
        "ema.enabled=true", f"validation.shards={held_out}", "validation.loss_every=2", "validation.every=4",
        "validation.eval_every=4", "validation.eval_clips=1", "validation.eval_steps=1",
    ]  # fmt: skip
    with loopback_head(tmp_path / "head", 6393, 8273) as (address, env, temp_dir):
        job = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python",
               "jobs/stage2.py", *args, "max_steps=2"]  # fmt: skip
        result = subprocess.run(job, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert "succeeded" in output
    # A stopped head must not stay recorded: a later ray.init() would try to join it.
    assert not (temp_dir / "ray_current_cluster").exists()
    run_dir = storage / "stage2"
    assert read_train_state(latest_checkpoint(run_dir)).step == 2

    relaunch = subprocess.run([PYTHON, "jobs/stage2.py", *args, "max_steps=4"], cwd=REPO, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    assert relaunch.returncode == 0, (relaunch.stdout + relaunch.stderr)[-4000:]
    starts = [line for line in read_step_log(run_dir) if line.get("event") == "start"]
    assert [line["step"] for line in starts] == [0, 2]
    final = latest_checkpoint(run_dir)
    assert final is not None and read_train_state(final).step == 4
    saved = json.loads((final / MODEL_DIR / "config.json").read_text())
    assert {k: saved[k] for k in settings} == settings
    assert any(
        k.startswith("driven_encoder.ada.") for k in load_file(str(final / MODEL_DIR / "model.safetensors"))
    )
    assert (final / STATE_DIR / ".metadata").is_file() and read_train_state(final).ema[
        "optimization_step"
    ] == 4
    config = json.loads((final / "train_config.json").read_text())
    assert (config["data"]["stride"], config["data"]["shards"]) == (12, "gaze/shards")
    assert sorted(tensorboard_scalars(run_dir, "val/loss")) == [2, 4]
    # the conditioning diagnostics run with the held-out loss
    assert sorted(tensorboard_scalars(run_dir, "val/cond/gain_driving_shuffled")) == [2, 4]
    assert (run_dir / "validation" / "step_0000004.mp4").is_file()
    # validation.eval_every inside a real run: PSNR / SSIM / L1 logged at step 4 only, in their ranges.
    metrics = {name: tensorboard_scalars(run_dir, f"val/{name}") for name in ("psnr", "ssim", "l1")}
    assert all(sorted(values) == [4] for values in metrics.values()), metrics
    assert 0 < metrics["psnr"][4] < 100 and -1 <= metrics["ssim"][4] <= 1 and 0 <= metrics["l1"][4] <= 1


def test_fsdp_trains_like_ddp(
    killed_run: KilledRun, demo_out: Path, tiny_model_weights: Path, tmp_path: Path
) -> None:
    """Two CPU workers, the same data and noise: FSDP2's sharded step gives DDP's losses and weights (the
    killed DDP run's step-2 checkpoint), and its sharded EMA gives DDP's exported average."""
    overrides = ddp_overrides(demo_out, tmp_path, tiny_model_weights, "fsdp", "fsdp")
    result = subprocess.run(
        [PYTHON, "jobs/stage1.py", "--config", TINY, *overrides, "max_steps=2"], cwd=REPO, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run_dir = tmp_path / "fsdp"
    fsdp_losses = [line["loss"] for line in read_step_log(run_dir) if "loss" in line]
    final = latest_checkpoint(run_dir)
    assert read_train_state(final).step == 2
    fsdp = saved_state(final, tmp_path / "fsdp.pt")["model"]  # the optimiser's own
    fsdp_ema = load_file(str(final / MODEL_DIR / "model.safetensors"))  # the exported EMA
    ddp_losses, ddp, ddp_ema = killed_run.losses, killed_run.weights, killed_run.averaged
    initial = load_file(str(tiny_model_weights / "megactor" / "model.safetensors"))
    assert len(ddp_losses) == 2
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4)
    for prefix in ("reference_net.", "denoiser.", "driven_encoder."):  # every trained module moved
        moved = max(float((fsdp[k] - initial[k]).abs().max()) for k in fsdp if k.startswith(prefix))
        assert moved > 5e-5, f"{prefix} did not train under FSDP"
    # AdamW moves each weight by at most lr x steps = 2e-4; the runs differ only by reduction order.
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in ddp) < 1e-4
    assert max(float((fsdp_ema[k] - ddp_ema[k]).abs().max()) for k in ddp) < 1e-4
    assert sum(not torch.equal(fsdp_ema[k], fsdp[k]) for k in fsdp) > len(fsdp) // 2  # the average lags
