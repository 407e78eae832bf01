"""Training checkpoints: only what training changes, every rank writing its own part straight to storage.

A training checkpoint is a folder under the run's storage (a local path or an s3:// prefix):

    state/                 torch.distributed.checkpoint (DCP): .metadata + one __<rank>_0.distcp per rank
                           model.<name>  the trainable weights (the optimiser's own)
                           optim.*       AdamW state by parameter name, its moments in
                                         train.checkpoint_moments (bf16 by default)
                           ema.<name>    the EMA average (EMA on only)
    model_config.json      the MegActorConfig being trained
    train_config.json      the TrainConfig that wrote it
    model/                 when due (train.export_every): config.json + model.safetensors, the exported
                           MegActor checkpoint (model.animate and stage 2's init_from read it); the EMA
                           weights when EMA is on
    train_state.json       written last, once every rank's part is stored: step, samples seen, data
                           position, LR scheduler and EMA counters; a folder without it is incomplete

The frozen VAE, CLIP and every other weight the stage does not train are not saved: a resume rebuilds
the run's starting model (the pretrained components for stage 1, model.init_from for stage 2) with the
checkpoint's model config and loads the trainable weights, optimiser and EMA into it. DCP reshards on
load, so a checkpoint written by N ranks resumes on M.

Saving is asynchronous where torch has dcp.async_save: the step loop waits only while the state is
copied to host memory; the write runs in a thread (on a gloo group of its own, so its collectives never
interleave with the training's), and the next save first waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from diffusers.training_utils import EMAModel
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from model.config import MegActorConfig
from model.loading import CONFIG_FILE as EXPORT_CONFIG_FILE
from model.loading import SAVED_MODULES, WEIGHTS_FILE, build_megactor, load_megactor
from pipeline import storage
from train.config import TrainConfig
from train.ema import ema_counters
from train.loop import TrainState, unwrap

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_DIR = "state"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.json"
MODEL_CONFIG_FILE = "model_config.json"
# Model settings that change memory or speed only: a relaunch may change them, all others come from the
# checkpoint being resumed.
RUNTIME_MODEL_FIELDS = ("gradient_checkpointing", "checkpoint_modules", "checkpoint_budget_gb")
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's running averages, the state a save may round to bf16
MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLEMENTATION_FLAGS = ("fused", "foreach")  # AdamW param-group keys that pick a kernel, not the maths
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip


# --- where the bytes go --------------------------------------------------------------------------------
class _ArrowFileSystem(FsspecFileSystem):
    """DCP's fsspec file system over the project's pyarrow filesystem (s3:// needs no s3fs this way)."""

    def __init__(self, location: str) -> None:
        from fsspec.implementations.arrow import ArrowFSWrapper

        self.fs = ArrowFSWrapper(storage.filesystem(location)[0])

    def init_path(self, path: str, **kwargs: Any) -> str:
        return path


def _writer(location: str) -> FileSystemWriter:
    """A local folder: DCP's own writer (fsynced files); a remote prefix: one streamed object per rank."""
    if not storage.is_remote(location):
        return FileSystemWriter(location, single_file_per_rank=True, sync_files=True)
    path = storage.filesystem(location)[1]
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=False)
    writer.fs, writer.path = _ArrowFileSystem(location), path
    return writer


@contextlib.contextmanager
def _local_state(location: str) -> Iterator[str]:
    """A local folder holding the DCP files at `location`: itself, or for a remote prefix a temporary
    copy (removed after). DCP's reader, given an S3 file object, stalls in torch.load's zip reads
    (ranged reads of the open object); whole-object downloads are quick and plain."""
    if not storage.is_remote(location):
        yield location
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-state-") as local:
        started = time.perf_counter()
        storage.download_tree(location, local)
        log.info("downloaded %s in %.1f s", location, time.perf_counter() - started)
        yield local


def _put_json(location: str, data: dict[str, Any]) -> None:
    storage.put_bytes(location, (json.dumps(data, indent=2) + "\n").encode())


def write_safetensors(stream: IO[bytes], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Stream tensors in the safetensors format (8-byte little-endian header length, JSON header padded
    with spaces to 8 bytes, then the raw little-endian data in header order): no temp file, no second
    copy in memory. Returns the bytes written."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    stream.write(struct.pack("<Q", len(encoded)) + encoded)
    for tensor in tensors.values():
        stream.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return 8 + len(encoded) + offset


def _write_export(location: str, tensors: dict[str, torch.Tensor], config: MegActorConfig) -> None:
    """model/ as model.loading.save_checkpoint writes it, streamed to storage (locally atomic)."""
    folder = storage.join(location, MODEL_DIR)
    storage.makedirs(folder)
    target = storage.join(folder, WEIGHTS_FILE)
    if storage.is_remote(target):
        fs, path = storage.filesystem(target)
        with fs.open_output_stream(path) as stream:
            write_safetensors(stream, tensors, {"format": "megactor"})
    else:
        tmp = Path(folder) / f".{WEIGHTS_FILE}.tmp"
        with open(tmp, "wb") as handle:
            write_safetensors(handle, tensors, {"format": "megactor"})
        tmp.replace(target)
    _put_json(storage.join(folder, EXPORT_CONFIG_FILE), config.to_dict())


# --- what is saved --------------------------------------------------------------------------------------
def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _is_megactor(model: nn.Module) -> bool:
    return isinstance(getattr(_unwrapped(model), "config", None), MegActorConfig)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters being trained, as DCP's state dicts name them (no DDP `module.` prefix),
    in the order of model.parameters() (the order of the EMA's shadow weights)."""
    return [name for name, p in _unwrapped(model).named_parameters() if p.requires_grad]


def dcp_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMAModel | None,
    moments: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The DCP state of a run: the trainable weights, the optimiser and the EMA, by parameter name (plain
    tensors under DDP, this rank's DTensor shards under FSDP2). Loading fills these tensors in place
    (DCP converts a stored bf16 moment into the fp32 one). `moments`: the dtype AdamW's moments are
    saved in; another than theirs makes copies, so a save holds them apart from the optimiser."""
    names = trainable_names(model)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    optim = get_optimizer_state_dict(model, optimizer)
    # New dicts: the per-parameter ones are the optimiser's own, which must keep its fp32 moments.
    optim["state"] = {
        name: {k: v.to(moments) if k in MOMENTS else v for k, v in values.items()}
        for name, values in optim["state"].items()
    }
    state: dict[str, Any] = {"model": {name: weights[name] for name in names}, "optim": optim}
    if ema is not None:
        if len(names) != len(ema.shadow_params):
            raise ValueError(f"EMA: {len(names)} trainable weights, {len(ema.shadow_params)} averaged")
        state["ema"] = dict(zip(names, ema.shadow_params, strict=True))
    return state


def export_tensors(model: nn.Module, ema: EMAModel | None, rank: int) -> dict[str, torch.Tensor]:
    """The exported MegActor weights (every SAVED_MODULES tensor, the EMA average in place of trained
    ones) as full CPU tensors on rank 0, {} elsewhere. Under FSDP2 every rank must call it (gathers)."""
    averaged = dict(zip(trainable_names(model), ema.shadow_params, strict=True)) if ema is not None else {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in unwrap(model).state_dict().items():
        if not name.startswith(SAVED_MODULES):
            continue
        tensor = averaged.get(name, tensor)
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if rank == 0:
            out[name] = full.detach().to("cpu", copy=True).contiguous()
    return out


@dataclasses.dataclass
class _Pending:
    location: str
    model_config: dict[str, Any] | None  # None: not a MegActor (nothing to rebuild it from)
    upload: Future
    export: Future | None
    state: TrainState
    metrics: dict[str, Any]


class Checkpointer:
    """Saves training checkpoints; at most one is in flight. Every rank calls save() and wait() at the
    same steps. `on_commit(location, metrics)` runs on every rank once a checkpoint is complete."""

    def __init__(
        self,
        config: TrainConfig,
        rank: int,
        asynchronous: bool = True,
        on_commit: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config, self.rank, self.on_commit = config, rank, on_commit
        self.asynchronous = asynchronous and hasattr(dcp, "async_save")
        # DCP's own collectives (plan exchange, metadata) on a gloo group: CPU-capable for async save, and
        # apart from the training's group, so a background write never interleaves with an all-reduce.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.exporter = ThreadPoolExecutor(1, thread_name_prefix="export") if rank == 0 else None
        self.pending: _Pending | None = None
        self.blocked_s: list[float] = []  # per save: seconds the caller waited in save()

    def export_due(self, step: int) -> bool:
        every = self.config.export_every
        return every == 0 or step % every == 0 or step >= self.config.max_steps

    def save(
        self,
        location: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: TrainState,
        ema: EMAModel | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> float:
        """Start a checkpoint of the current state at `location`; returns the seconds it blocked (the
        previous save's remainder included)."""
        started = time.perf_counter()
        self.wait()
        snapshot = dataclasses.replace(state, lr_scheduler=lr_scheduler.state_dict(),
                                       ema=ema_counters(ema) if ema is not None else {})  # fmt: skip
        export = None
        if self.export_due(state.step):
            tensors = export_tensors(model, ema, self.rank)
            if self.exporter is not None:
                export = self.exporter.submit(_write_export, location, tensors, unwrap(model).config)
        target = storage.join(location, STATE_DIR)
        storage.makedirs(target)
        kwargs = {
            "storage_writer": _writer(target),
            "process_group": self.group,
            "no_dist": self.group is None,
        }
        values = dcp_state(model, optimizer, ema, MOMENT_DTYPES[self.config.checkpoint_moments])
        if self.asynchronous:
            upload = dcp.async_save(values, **kwargs)
        else:
            upload = Future()
            upload.set_result(dcp.save(values, **kwargs))
        config = _unwrapped(model).config.to_dict() if _is_megactor(model) else None
        self.pending = _Pending(location, config, upload, export, snapshot, dict(metrics or {}))
        blocked = time.perf_counter() - started
        self.blocked_s.append(blocked)
        return blocked

    def wait(self) -> None:
        """Finish the checkpoint in flight: every rank's part stored, then rank 0 commits it (train_state
        .json last) and every rank runs on_commit."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        pending.upload.result()
        if pending.export is not None:
            pending.export.result()
        if self.rank == 0:
            if pending.model_config is not None:
                _put_json(storage.join(pending.location, MODEL_CONFIG_FILE), pending.model_config)
            _put_json(storage.join(pending.location, CONFIG_FILE), self.config.to_dict())
            _put_json(storage.join(pending.location, STATE_FILE), dataclasses.asdict(pending.state))
        if self.group is not None:
            dist.barrier(group=self.group)  # committed before any rank reports or deletes it
        if self.on_commit is not None:
            self.on_commit(pending.location, pending.metrics)

    def close(self) -> None:
        self.wait()
        if self.exporter is not None:
            self.exporter.shutdown()


def save_training_checkpoint(
    location: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    config: TrainConfig,
    rank: int,
    ema: EMAModel | None = None,
) -> None:
    """One complete checkpoint, written before it returns (every rank calls it)."""
    checkpointer = Checkpointer(config, rank, asynchronous=False)
    try:
        checkpointer.save(str(location), model, optimizer, lr_scheduler, state, ema)
    finally:
        checkpointer.close()


# --- reading it back ------------------------------------------------------------------------------------
def _read_json(location: str | Path, name: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(str(location), name)))


def read_train_state(checkpoint: str | Path) -> TrainState:
    return TrainState(**_read_json(checkpoint, STATE_FILE))


def resume_model_config(checkpoint: str | Path, overrides: dict[str, Any]) -> MegActorConfig:
    """The model config a training checkpoint was written with; of the current model.config overrides
    only the RUNTIME_MODEL_FIELDS apply (the others would silently change the objective or the weights'
    layout), and differing ones are named in a warning."""
    saved = MegActorConfig.from_dict(_read_json(checkpoint, MODEL_CONFIG_FILE)).to_dict()
    ignored = {k: v for k, v in overrides.items() if k not in RUNTIME_MODEL_FIELDS and saved.get(k, v) != v}
    if ignored:
        kept = {k: saved.get(k) for k in ignored}
        log.warning("resuming from %s: model.config %s ignored, the checkpoint's %s kept", checkpoint,
                    ignored, kept)  # fmt: skip
    runtime = {k: overrides[k] for k in RUNTIME_MODEL_FIELDS if k in overrides}
    return MegActorConfig.from_dict({**saved, **runtime})


def start_model(weights_dir: Path, init_from: str | None, overrides: dict[str, Any]) -> nn.Module:
    """A run's starting model: the pretrained components (stage 1) or the MegActor checkpoint init_from
    (stage 2: a local folder, or a URI downloaded first), MegActorConfig fields `overrides` on top."""
    if not init_from:
        return build_megactor(weights_dir, MegActorConfig.from_dict(overrides))
    if not storage.is_remote(init_from):
        return load_megactor(weights_dir, init_from, overrides=overrides)
    with tempfile.TemporaryDirectory(prefix="init-") as local:
        storage.download_tree(init_from, local)
        return load_megactor(weights_dir, local, overrides=overrides)


def load_training_model(weights_dir: Path, checkpoint: str | Path, overrides: dict[str, Any]) -> nn.Module:
    """Before wrapping: the run's starting model, rebuilt with the checkpoint's model config (the weights
    the stage does not train are those it started from); load_training_state fills in the trained ones."""
    init_from = _read_json(checkpoint, CONFIG_FILE).get("model", {}).get("init_from")
    return start_model(weights_dir, init_from, resume_model_config(checkpoint, overrides).to_dict())


def load_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    checkpoint: str | Path,
    ema: EMAModel | None = None,
) -> TrainState:
    """After wrapping (every rank): the trainable weights, AdamW state, EMA and scheduler of a checkpoint,
    resharded to this world size; returns the run's position. Locally each rank reads only what it
    holds; from remote storage each rank first downloads state/ to a temporary folder."""
    location = storage.join(str(checkpoint), STATE_DIR)
    if not storage.is_file(storage.join(location, ".metadata")):
        raise FileNotFoundError(
            f"{checkpoint}: no {STATE_DIR}/.metadata, so not a complete training checkpoint of this trainer; "
            "resume from another checkpoint or start a new run name (its model/ still serves as init_from)"
        )
    state = read_train_state(checkpoint)
    values = dcp_state(model, optimizer, ema)
    if ema is not None and not state.ema:
        log.warning("%s holds no EMA: the average starts from the resumed weights", checkpoint)
        del values["ema"]
    # The saved param groups carry the fused / foreach flags of the run that wrote them; this run's
    # optim.fused (and this machine's devices) decide.
    implementation = [{k: g.get(k) for k in IMPLEMENTATION_FLAGS} for g in optimizer.param_groups]
    # In place, resharded to this world size.
    with _local_state(location) as local:
        dcp.load(values, storage_reader=FileSystemReader(local), no_dist=not dist.is_initialized())
    set_model_state_dict(model, values["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, values["optim"])
    for group, flags in zip(optimizer.param_groups, implementation, strict=True):
        group.update(flags)
    if "ema" in values:
        with torch.no_grad():
            for shadow, loaded in zip(ema.shadow_params, values["ema"].values(), strict=True):
                if shadow is not loaded:
                    shadow.copy_(loaded)
        ema.load_state_dict({**state.ema, "shadow_params": None})
    lr_scheduler.load_state_dict(state.lr_scheduler)
    return state


# --- finding checkpoints --------------------------------------------------------------------------------
def checkpoint_step(path: str | Path) -> int:
    """The step a complete training checkpoint was written at, -1 when it is not one."""
    try:
        return read_train_state(path).step
    except (OSError, json.JSONDecodeError, TypeError):
        return -1


def has_export(path: str | Path) -> bool:
    return storage.is_file(storage.join(str(path), MODEL_DIR, WEIGHTS_FILE))


def latest_checkpoint(run_dir: Path, exported: bool = False) -> Path | None:
    """The complete training checkpoint with the highest step in a run folder (with `exported`: the
    highest one holding an exported model/)."""
    candidates = [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and checkpoint_step(p) >= 0]
    if exported:
        candidates = [p for p in candidates if has_export(p)]
    return max(candidates, key=checkpoint_step, default=None)


def resolve_init_checkpoint(init_from: str, storage_path: str) -> Path:
    """A run name under storage_path, a run folder, a training checkpoint or a MegActor checkpoint ->
    the MegActor checkpoint folder (config.json + model.safetensors) to start from."""
    tried = []
    for candidate in (Path(storage_path) / init_from, Path(init_from)):
        tried.append(str(candidate))
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate.resolve()
        if has_export(candidate):
            return (candidate / MODEL_DIR).resolve()
        latest = latest_checkpoint(candidate, exported=True) if candidate.is_dir() else None
        if latest is not None:
            return (latest / MODEL_DIR).resolve()
    raise FileNotFoundError(
        f"model.init_from={init_from!r}: expected a run name under storage_path, a run folder with "
        f"checkpoints, or a checkpoint folder; found none at {tried}. Train stage 1 first."
    )
