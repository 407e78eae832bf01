"""The Ray Data plan: manifest rows -> decode/crop -> annotators -> encode -> shard writer.

This file only wires steps together; each step lives in its own module. Runs on local Ray by default
and on a cluster when RAY_ADDRESS is set (or inside `ray job submit`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any

import pandas as pd
import ray
from ray.data import ActorPoolStrategy

from pipeline.config import BuildConfig
from pipeline.rows import guarded
from pipeline.segment import decode_segment
from pipeline.stages.base import get_stage
from pipeline.video import EncodeSettings
from pipeline.writer import as_writer_row, encode_members, write_shard_batch

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None, log_to_driver: bool = False) -> None:
    """Join RAY_ADDRESS's cluster (or the job's), else start a private local Ray on loopback.

    log_to_driver: show the workers' output here (the trainer's rank-0 log and progress bar).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
    else:
        ray.init(
            address="local",  # never join a head that `ray start` once recorded in /tmp/ray
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=log_to_driver,
        )


def _decode_step(config: BuildConfig):
    decode = functools.partial(
        decode_segment,
        resolution=config.resolution,
        crop_scale=config.crop_scale,
        threads=config.video.threads,
    )
    return guarded("decode", decode)


def _encode_step(config: BuildConfig):
    video = EncodeSettings(**vars(config.video))
    return guarded("encode", functools.partial(encode_members, resolution=config.resolution, video=video))


def check_resources(config: BuildConfig, available: dict[str, float]) -> None:
    """The actor pools must leave room for at least one CPU task, or Ray Data waits forever."""
    need = {
        "CPU": sum(s.num_cpus * s.pool_size for s in config.stages) + config.task_num_cpus,
        "GPU": sum(s.num_gpus * s.pool_size for s in config.stages),
    }
    short = {k: (v, available.get(k, 0.0)) for k, v in need.items() if v > available.get(k, 0.0) + 1e-9}
    if short:
        details = ", ".join(f"{k}: need {v:g}, cluster has {have:g}" for k, (v, have) in short.items())
        message = (
            f"the stages' actor pools plus one task need more than the cluster offers ({details}); "
            "lower the stages' num_cpus / num_gpus / pool_size or task_num_cpus"
        )
        if os.environ.get("RAY_ADDRESS"):
            log.warning("%s (an autoscaling cluster may still grow)", message)
        else:
            raise ValueError(message)


def stage_kwargs(stage_cls: type, options: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of a stage actor: its options plus the build context it asks for
    (weights_dir, bank_path, gpu_share: its num_gpus, ...), matched by parameter name."""
    accepted = inspect.signature(stage_cls.__init__).parameters
    return {**{k: v for k, v in context.items() if k in accepted}, **options}


def build_dataset(
    manifest: pd.DataFrame,
    config: BuildConfig,
    shards_dir: str,
    fence: tuple[str, str] | None = None,
    stage_context: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """The lazy Dataset of writer status rows (one per manifest row) for the rows to build.

    `fence` (lock file, run id) stops writers orphaned by a killed build from committing later;
    `stage_context` holds what stages may ask for in their constructor (weights_dir, bank_path).
    """
    rows = manifest.assign(error_stage="", error="", message="", timings="{}", annotations="[]")
    # A batch whose retries ran out (its actor kept dying) is dropped instead of failing the whole run;
    # the driver records its clips as failures (pipeline/build.py).
    ray.data.DataContext.get_current().max_errored_blocks = max(1, len(rows))
    # One block per segment: the writer bundles `samples_per_shard` of them into each task.
    ds = ray.data.from_items(rows.to_dict("records"), override_num_blocks=max(1, len(rows)))
    check_resources(config, ray.cluster_resources())
    task_cpus = config.task_num_cpus
    ds = ds.map(_decode_step(config), num_cpus=task_cpus)
    for stage in config.stages:
        stage_cls = get_stage(stage.name)
        ds = ds.map_batches(
            stage_cls,
            compute=ActorPoolStrategy(size=stage.pool_size),
            batch_size=stage.batch_size,
            num_gpus=stage.num_gpus,
            num_cpus=stage.num_cpus,
            max_restarts=-1,  # a dead actor is replaced, so the pool keeps its size
            max_task_retries=stage.max_task_retries,
            fn_constructor_kwargs=stage_kwargs(
                stage_cls, stage.options, {**(stage_context or {}), "gpu_share": stage.num_gpus}
            ),
        )
    ds = ds.map(_encode_step(config), num_cpus=task_cpus).map(as_writer_row, num_cpus=task_cpus)
    return ds.map_batches(
        write_shard_batch,
        batch_size=config.samples_per_shard,
        num_cpus=task_cpus,
        fn_kwargs={"shards_dir": shards_dir, "fence": fence},
    )
