"""Before a training job asks Ray for workers: what the driver can check in seconds.

Ray Train, asked for workers the cluster cannot give, retries the worker group's start without end
("WorkerGroupStartupTimeoutError ... waiting for 8 workers"), and a missing shard folder or weights
folder surfaces only inside every worker. So `launch` calls `preflight` first: the shards of the split,
the weights folder and init_from exist, and num_workers x (GPU, cpus_per_worker) fits the cluster
(pipeline/resources.py: an error at once locally, a bounded wait on a cluster).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ray

from pipeline import storage
from pipeline.resources import Demand, cluster_nodes, require
from train.config import TrainConfig
from train.data import list_shards

RESOURCE_WAIT_S = 600.0  # on a cluster (RAY_ADDRESS): how long an autoscaler may take to add nodes


class PreflightError(ValueError):
    """The job cannot start: the message names what is missing and the setting that fixes it."""


def check_inputs(config: TrainConfig) -> None:
    """data.root holds committed shards of data.split; model.weights_dir and init_from exist."""
    root, shards_path = config.data.root, config.data.shards
    relative = not storage.is_remote(shards_path) and not Path(shards_path).is_absolute()
    if relative and not root:
        raise PreflightError("data.root is not set: data.root=<the shard build's output folder (OUT)>")
    if relative and not storage.is_remote(root) and not Path(root).is_dir():
        raise PreflightError(
            f"data.root={root} does not exist: point data.root= at a shard build's output folder "
            "(`make shards` writes out/demo)"
        )
    try:
        shards = list_shards(config.data)
    except FileNotFoundError as exc:  # NoShards too: no shard of the split
        raise PreflightError(f"data.root={root}: {exc}") from exc
    if not shards:
        raise PreflightError(f"data.root={root}: no {config.data.split!r} shards")
    weights = config.model.weights_dir or os.environ.get("WEIGHTS_DIR")
    if config.model.profile == "full" and not weights:
        raise PreflightError(
            "model.profile=full needs the real weights: model.weights_dir=<folder> (or $WEIGHTS_DIR); "
            "model.profile=tiny trains random tiny models (--config configs/train/tiny.yaml)"
        )
    if config.model.profile == "full" and not Path(weights).is_dir():
        raise PreflightError(
            f"model.weights_dir={weights} does not exist: `python -m pipeline weights fetch --for train "
            f"--weights-dir {weights}` downloads the weights"
        )
    init = config.model.init_from
    if init and not storage.is_remote(init) and not Path(init).exists():
        raise PreflightError(f"model.init_from={init} does not exist: train stage 1 first, or fix the path")


def training_demand(config: TrainConfig, nodes: list[dict[str, float]]) -> Demand:
    """What the ScalingConfig reserves, and the overrides that make it fit `nodes`."""
    per_worker = {"CPU": config.cpus_per_worker, **({"GPU": 1.0} if config.use_gpu else {})}
    total = {name: amount * config.num_workers for name, amount in per_worker.items()}
    gpus = int(sum(node.get("GPU", 0.0) for node in nodes))
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    gpu_fix = (
        f"num_workers={gpus} (one per GPU)" if gpus else "num_workers=1 use_gpu=false (train on the CPU)"
    )
    workers = config.num_workers if not config.use_gpu or not gpus else min(config.num_workers, gpus)
    cpu_each = max(math.floor(cpus / max(workers, 1) * 100) / 100, 0.01)
    cpu_fix = f"cpus_per_worker={cpu_each:g}" if cpus else "a Ray cluster with CPUs"
    return Demand(
        what=(
            f"training ({config.num_workers} worker(s) x ({config.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if config.use_gpu else ''}))"
        ),
        total=total,
        per_actor=per_worker,
        fixes={"GPU": gpu_fix, "CPU": cpu_fix},
    )


def preflight(config: TrainConfig, wait_s: float = RESOURCE_WAIT_S) -> None:
    """Raise PreflightError (or ResourceShortfall) before any worker is asked for: the inputs first
    (no Ray needed), then Ray up (joined or started) and the ScalingConfig against its resources."""
    from pipeline.dag import init_ray

    check_inputs(config)
    if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        # The loopback head would register this machine: a shortfall needs no Ray start to be seen.
        here = [local_node()]
        require(training_demand(config, here), wait_s, nodes=lambda: here)
    init_ray(None, log_to_driver=True)
    nodes = cluster_nodes()
    require(training_demand(config, nodes), wait_s)


def local_node() -> dict[str, float]:
    """The CPUs and GPUs a Ray head started on this machine registers (Ray's own detection)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    manager = get_accelerator_manager_for_resource("GPU")
    gpus = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    if visible is not None:
        gpus = min(gpus, len(visible))
    return {"CPU": float(get_num_cpus()), "GPU": float(gpus)}
