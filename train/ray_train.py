"""Ray Train: one training process per GPU (or CPU), each streaming its own shards into MegActor.

launch(config) runs on the driver (a Ray Job or a plain `python jobs/stageN.py`); train_worker(config)
runs in every worker. Every rank writes its part of a checkpoint straight into storage_path/name
(train/checkpoint.py), and once it is complete ray.train.report registers that folder in place (no copy):
relaunching with the same name resumes from the latest one, FailureConfig restarts a failed worker
group from it, and CheckpointConfig(num_to_keep) deletes older ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from diffusers.training_utils import EMAModel
from ray.train import CheckpointConfig, CheckpointUploadMode, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm.auto import tqdm

from model.components import check_weights_dir
from model.loading import ensure_tiny_weights
from model.megactor import MegActor
from pipeline import storage
from pipeline.dag import init_ray
from pipeline.weights import DEFAULT_TINY_DIR
from train.checkpoint import (
    MODEL_DIR,
    Checkpointer,
    load_training_model,
    load_training_state,
    resolve_init_checkpoint,
    start_model,
)
from train.config import ModelSection, TrainConfig
from train.data import STAT_NAMES, NoShards, fixed_batch, make_loader
from train.ema import averaged_weights, make_ema
from train.loop import (
    TrainState,
    batches_after,
    data_position,
    evaluation_loss,
    make_lr_scheduler,
    make_optimizer,
    mean_across_ranks,
    step_generator,
    sum_counts,
    to_model_batch,
    train_step,
    trainable,
    unwrap,
    wrap_model,
)
from train.preflight import preflight
from train.validation import conditioning_batch, held_out_metrics, log_conditioning, write_validation_video

log = logging.getLogger("train")

TINY_MODEL_DIR = DEFAULT_TINY_DIR.parent / "tiny_model"
STEP_LOG = "steps.jsonl"  # rank 0: one line per step (step, data epoch / offset, sample keys, loss)


def model_weights_dir(section: ModelSection) -> Path:
    """tiny: the random tiny folder (written once, shared by the workers); full: checked real weights."""
    if section.profile == "tiny":
        return ensure_tiny_weights(section.weights_dir or TINY_MODEL_DIR)
    chosen = section.weights_dir or os.environ.get("WEIGHTS_DIR")
    if not chosen:
        raise FileNotFoundError("model.profile=full needs model.weights_dir=... or $WEIGHTS_DIR")
    check_weights_dir(chosen, verify_hash=True)  # one error naming every missing or wrong file
    return Path(chosen)


def build_model(config: TrainConfig, resume: str | Path | None = None) -> MegActor:
    """Stage 1: the pretrained components; stage 2 (init_from): a stage-1 checkpoint, config overrides on top.
    A resume (relaunch or max_failures restart) rebuilds the model its checkpoint was trained as; its
    trained weights are loaded after wrapping (load_training_state)."""
    weights_dir = model_weights_dir(config.model)
    if resume is not None:
        return load_training_model(weights_dir, resume, config.model.config)
    return start_model(weights_dir, config.model.init_from, config.model.config)


class Window:
    """Timings and losses between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.wait = 0.0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.samples = 0

    def scalars(self, device: torch.device) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "loss": mean_across_ranks(sum(self.losses) / len(self.losses), device),
            "grad_norm": sum(self.grad_norms) / len(self.grad_norms),
            "samples_per_s": mean_across_ranks(self.samples / elapsed, device) * _world_size(),
            "data_wait_fraction": mean_across_ranks(self.wait / elapsed, device),
        }


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _run_dir(config: TrainConfig) -> Path:
    """Where rank 0 writes TensorBoard events, validation videos and the step log: under storage_path, or
    for remote storage a local folder that _publish_run_files uploads (an object store cannot append)."""
    if storage.is_remote(config.storage_path):
        digest = hashlib.sha1(config.storage_path.encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / "megactor-train" / digest / config.name
    return Path(config.storage_path) / config.name


def _fetch_run_files(config: TrainConfig, run_dir: Path) -> None:
    """Remote storage: the step log continues the remote copy (the source of truth; this node's local
    folder may be stale or absent after a restart elsewhere). Event files and videos have unique names."""
    if not storage.is_remote(config.storage_path):
        return
    remote = storage.join(config.storage_path, config.name, STEP_LOG)
    local = run_dir / STEP_LOG
    local.unlink(missing_ok=True)
    if storage.is_file(remote):
        local.write_bytes(storage.read_bytes(remote))


def _publish_run_files(config: TrainConfig, run_dir: Path) -> None:
    """Remote storage: upload the step log, TensorBoard events and validation videos (each file whole)."""
    if storage.is_remote(config.storage_path):
        storage.upload_tree(run_dir, storage.join(config.storage_path, config.name))


def run_config(config: TrainConfig) -> RunConfig:
    """Checkpoints under storage_path/name: a folder, or an object store through pyarrow.fs (configured
    from the standard environment, e.g. AWS_ENDPOINT_URL and keys for S3)."""
    filesystem, path = (
        storage.filesystem(config.storage_path)
        if storage.is_remote(config.storage_path)
        else (None, config.storage_path)
    )
    return RunConfig(
        name=config.name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
    )


def checkpoint_location(config: TrainConfig, step: int) -> str:
    """storage_path/name/checkpoint_<step>: where Ray Train keeps the run's checkpoints."""
    return storage.join(config.storage_path, config.name, f"checkpoint_{step:07d}")


def _report_in_place(rank: int) -> Any:
    """on_commit for the Checkpointer: every rank calls ray.train.report the same number of times; rank 0
    registers the complete folder already in the run's storage (NO_UPLOAD: nothing copied)."""

    def report(location: str, metrics: dict[str, Any]) -> None:
        name = storage.name_of(location)
        checkpoint = None
        if rank == 0:
            run = ray.train.get_context().get_storage()
            checkpoint = ray.train.Checkpoint(path=f"{run.experiment_fs_path.rstrip('/')}/{name}",
                                              filesystem=run.storage_filesystem)  # fmt: skip
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)  # fmt: skip

    return report


def train_worker(config_dict: dict[str, Any]) -> None:
    """The per-worker training loop (Ray Train's train_loop_per_worker)."""
    config = TrainConfig.from_dict(config_dict)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    resume = ray.train.get_checkpoint()
    # The checkpoint where Ray Train registered it (a URI for remote storage; its state/ is fetched on load).
    checkpoint = (
        storage.join(config.storage_path, config.name, storage.name_of(resume.path)) if resume else None
    )
    model = build_model(config, checkpoint)
    model.trainable_parameters(config.stage)  # sets requires_grad for the stage
    model.train()
    wrapped = wrap_model(model, config.strategy, device, config.ddp.grad_compression,
                         config.mixed_precision == "bf16" and config.fsdp.bf16_params)  # fmt: skip
    params = list(trainable(wrapped).values())  # FSDP2 swaps in sharded ones
    optimizer = make_optimizer(params, config.optim)
    lr_scheduler = make_lr_scheduler(optimizer, config.optim.warmup_steps)
    ema = make_ema(params, config.ema) if config.ema.enabled else None
    state = TrainState(seed=config.seed)
    if checkpoint is not None:
        state = load_training_state(wrapped, optimizer, lr_scheduler, checkpoint, ema)
        log.info("resumed from %s at step %d (data epoch %d, batch %d)", checkpoint, state.step, state.epoch,
                 state.epoch_offset)  # fmt: skip
    run_loop(config, wrapped, params, optimizer, lr_scheduler, state, rank, world_size, device, ema)


def held_out_batch(config: TrainConfig, rank: int) -> dict[str, Any] | None:
    """The fixed validation batch: the first usable clips of validation.split; None (with a warning) when
    there are none, so a shard set without held-out clips trains without validation."""
    section = config.validation
    data = dataclasses.replace(config.data, split=section.split, shards=section.shards or config.data.shards)
    try:
        return fixed_batch(data, section.samples, seed=section.seed, allow_fewer=True)
    except (NoShards, ValueError) as exc:
        if rank == 0:
            log.warning("held-out validation (loss and video) skipped: %s", exc)
        return None


def run_loop(
    config: TrainConfig,
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    rank: int,
    world_size: int,
    device: torch.device,
    ema: EMAModel | None = None,
) -> None:
    run_dir = _run_dir(config)
    writer = step_log = None
    section = config.validation
    # Every rank holds the held-out batch: the loss runs through the wrapped model (collective under FSDP).
    wanted = section.loss_every > 0 or section.every > 0 or section.eval_every > 0
    held_out = held_out_batch(config, rank) if wanted else None
    conditioning = conditioning_batch(config, rank) if held_out is not None and section.conditioning else None
    video = (
        held_out is not None and (section.every > 0 or section.eval_every > 0) and config.strategy != "fsdp"
    )
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        _fetch_run_files(config, run_dir)
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        step_log = (run_dir / STEP_LOG).open("a")
        epoch, offset = data_position(state.step, config.data.steps_per_epoch)
        start = {
            "event": "start",
            "step": state.step,
            "epoch": epoch,
            "batch": offset,
            "world_size": world_size,
        }
        step_log.write(json.dumps(start) + "\n")
        if section.every > 0 and config.strategy == "fsdp":
            log.warning("validation videos need the whole model on rank 0: skipped under FSDP")
    progress = tqdm(total=config.max_steps, initial=state.step, desc=config.name,
                    disable=rank != 0 or not config.progress)  # fmt: skip
    data_counts: Counter[str] = Counter()
    window = Window()

    checkpointer = Checkpointer(config, rank, on_commit=_report_in_place(rank))

    def save(metrics: dict[str, Any]) -> None:
        state.epoch, state.epoch_offset = data_position(state.step, config.data.steps_per_epoch)
        location = checkpoint_location(config, state.step)
        blocked = checkpointer.save(location, model, optimizer, lr_scheduler, state, ema, metrics)
        if writer is not None:
            writer.add_scalar("train/checkpoint_blocked_s", blocked, state.step)

    def validate() -> None:
        """Held-out loss (fixed noise and timesteps) and video, with the EMA weights when EMA is on."""
        loss_now = section.loss_every > 0 and state.step % section.loss_every == 0
        video_now = video and rank == 0 and section.every > 0 and state.step % section.every == 0
        metrics_now = video and rank == 0 and section.eval_every > 0 and state.step % section.eval_every == 0
        if held_out is None or not (loss_now or video_now or metrics_now):
            return
        with averaged_weights(ema, params):
            if loss_now:
                loss = evaluation_loss(model, to_model_batch(held_out, device), seed=section.seed,
                                       mixed_precision=config.mixed_precision, repeats=section.loss_repeats)  # fmt: skip
                if writer is not None:
                    writer.add_scalar("val/loss", loss, state.step)
                    log.info("step %d: held-out loss %.4f (%d clips)", state.step, loss, len(held_out["key"]))
                if conditioning is not None:
                    log_conditioning(model, conditioning, config, device, writer, state.step)
            if video_now:
                path = write_validation_video(unwrap(model), held_out, section, run_dir / "validation",
                                              state.step)  # fmt: skip
                log.info("step %d: validation video %s", state.step, path)
            if metrics_now and writer is not None:
                for name, value in held_out_metrics(unwrap(model), held_out, section).items():
                    writer.add_scalar(f"val/{name}", value, state.step)
        unwrap(model).train()  # sampling and the loss leave the model in eval mode

    # One loader for the whole run: its DataLoader workers persist, set_epoch moves them to the next epoch.
    loader = make_loader(config.data, seed=config.seed, epoch=0, rank=rank, world_size=world_size,
                         pin_memory=device.type == "cuda")  # fmt: skip
    while state.step < config.max_steps:
        epoch, offset = data_position(state.step, config.data.steps_per_epoch)
        if offset:
            log.info("data epoch %d: skipping the %d batches trained on before the resume", epoch, offset)
        loader.set_epoch(epoch)
        batches = iter(batches_after(iter(loader), offset))
        for position in range(offset, config.data.steps_per_epoch):
            waited = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - waited
            data_counts.update(batch.get("stats", {}))
            generator = step_generator(config.seed, rank, state.step, device)
            metrics = train_step(model, to_model_batch(batch, device), optimizer, lr_scheduler, params, config,
                                 generator)  # fmt: skip
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"step {state.step + 1}: loss is {metrics['loss']}")
            if ema is not None:
                ema.step(params)
            state.step += 1
            state.samples_seen += len(batch["key"]) * world_size
            window.losses.append(metrics["loss"])
            window.grad_norms.append(metrics["grad_norm"])
            window.samples += len(batch["key"])
            progress.update(1)
            if step_log is not None:
                line = {"step": state.step, "epoch": epoch, "batch": position, "keys": list(batch["key"]),
                        "loss": metrics["loss"]}  # fmt: skip
                step_log.write(json.dumps(line) + "\n")
                step_log.flush()
            log_now = state.step % config.log_every == 0
            save_now = state.step % config.checkpoint_every == 0 or state.step == config.max_steps
            if log_now or save_now:
                scalars = {**window.scalars(device), "lr": metrics["lr"]}
                window.reset()
                totals = sum_counts(data_counts, STAT_NAMES, device)  # every rank's loader, not rank 0's
                if writer is not None:
                    for name, value in scalars.items():
                        writer.add_scalar(f"train/{name}", value, state.step)
                    for name, value in totals.items():
                        writer.add_scalar(f"data/{name}", value, state.step)
                    progress.set_postfix(loss=f"{scalars['loss']:.4f}")
                if save_now:  # report is a barrier with the controller: only with a checkpoint
                    report = {
                        **scalars,
                        "step": state.step,
                        "samples_seen": state.samples_seen,
                        "epoch": epoch,
                    }
                    save(report)  # reported once every rank's part is stored (at the next save)
                    if writer is not None and step_log is not None:
                        writer.flush()
                        step_log.flush()
                        _publish_run_files(config, run_dir)
            validate()
            if state.step >= config.max_steps:
                break
    progress.close()
    checkpointer.close()  # the last checkpoint complete and reported
    totals = sum_counts(data_counts, STAT_NAMES, device)
    if writer is not None:
        writer.close()
    if step_log is not None:
        step_log.close()
        _publish_run_files(config, run_dir)
    bad = {k: v for k, v in totals.items() if k != "samples" and v}
    log.info(
        "done at step %d, %d samples seen; data problems over all ranks: %s",
        state.step, state.samples_seen, bad or "none",
    )  # fmt: skip


def remote_init_checkpoint(init_from: str, storage_path: str) -> str:
    """A run name under a remote storage_path (or a run / checkpoint URI) -> the URI of its latest
    checkpoint's MegActor folder, which each worker downloads (build_model)."""
    for run in (init_from, storage.join(storage_path, init_from)):
        if not storage.is_remote(run):
            continue
        if storage.is_file(storage.join(run, "model.safetensors")):
            return run
        if storage.is_file(storage.join(run, MODEL_DIR, "model.safetensors")):
            return storage.join(run, MODEL_DIR)
        steps = [name for name in storage.list_dirs(run) if name.startswith("checkpoint_")]
        for name in sorted(steps, reverse=True):  # checkpoint_<step, 7 digits>: the latest first
            if storage.is_file(storage.join(run, name, MODEL_DIR, "model.safetensors")):
                return storage.join(run, name, MODEL_DIR)
    raise FileNotFoundError(
        f"model.init_from={init_from!r}: no checkpoint under {storage.join(storage_path, init_from)}. "
        "Train stage 1 first."
    )


def prepare(config: TrainConfig) -> TrainConfig:
    """On the driver: make local paths absolute (workers and jobs run elsewhere) and find init_from."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).expanduser().resolve())

    config.storage_path = absolute(config.storage_path)
    config.data.root = absolute(config.data.root)
    config.model.weights_dir = absolute(config.model.weights_dir)
    init = config.model.init_from
    if init and init.lower() != "none" and storage.is_remote(config.storage_path) and not Path(init).exists():
        config.model.init_from = remote_init_checkpoint(init, config.storage_path)
    elif init and init.lower() != "none":
        config.model.init_from = str(resolve_init_checkpoint(init, config.storage_path))
    else:
        config.model.init_from = None
    return config


def launch(config: TrainConfig) -> ray.train.Result:
    """Run the training described by config on the current Ray cluster (a loopback one when none)."""
    config = prepare(config)
    preflight(config)  # the inputs and the cluster's resources, before Ray Train asks for workers
    init_ray(None, log_to_driver=True)
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=run_config(config),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
    )
    log.info("training %s: %d worker(s), storage %s", config.name, config.num_workers, config.storage_path)
    return trainer.fit()
