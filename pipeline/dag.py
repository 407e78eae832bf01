"""The Ray Data plan: manifest rows -> decode/crop -> annotators -> encode -> shard writer.

The annotators run in the actor pools of plan_pools: by default one actor runs every stage, so a
segment's frames cross the object store twice (decode -> annotators -> encode), not once per stage.

This file only wires steps together; each step lives in its own module. Runs on local Ray by default
and on a cluster when RAY_ADDRESS is set (or inside `ray job submit`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import ray
from ray.data import ActorPoolStrategy

from pipeline.config import BuildConfig, StageConfig
from pipeline.logs import quiet_ray, ray_init_kwargs
from pipeline.resources import Demand, require
from pipeline.rows import guarded
from pipeline.segment import decode_segment
from pipeline.stages.base import StageChain, get_stage
from pipeline.video import EncodeSettings
from pipeline.writer import as_writer_row, encode_members, write_shard_batch

log = logging.getLogger(__name__)


def map_on_actor_pool(
    ds: ray.data.Dataset, udf: type, compute: ActorPoolStrategy, max_task_retries: int, **kwargs: Any
) -> ray.data.Dataset:
    """ds.map_batches(udf) on an actor pool whose tasks are retried at most `max_task_retries` times.

    Ray Data replaces a dead actor by default (max_restarts=-1) but retries its tasks forever; a bounded
    retry has no named parameter in Ray 2.60, only **ray_remote_args, which warns that it is deprecated
    (the named replacement does not exist yet). That one warning is silenced here, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=Warning)
        return ds.map_batches(udf, compute=compute, max_task_retries=max_task_retries, **kwargs)


def pool_strategy(size: int, elastic: bool = False) -> ActorPoolStrategy:
    """A pool of `size` actors; `elastic`: one to start with, growing to `size` as the cluster allows (a
    pass after a node was lost: the lost node's share may never come back)."""
    return ActorPoolStrategy(min_size=1, max_size=size) if elastic else ActorPoolStrategy(size=size)


def init_ray(num_cpus: int | None, log_to_driver: bool = False) -> None:
    """Join RAY_ADDRESS's cluster (or the job's), else start a private local Ray on loopback.

    The local Ray runs in a session of its own that this process owns (pipeline/ray_head.py): it stops
    when this process exits, however it exits, and a later build kills what a killed one left.
    log_to_driver: show the workers' output here (the trainer's rank-0 log and progress bar).
    """
    if ray.is_initialized():
        return
    quiet_ray()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver, **ray_init_kwargs())
        return
    from pipeline.ray_head import start_head

    ray.init(
        address=start_head(num_cpus),
        _node_ip_address="127.0.0.1",
        log_to_driver=log_to_driver,
        **ray_init_kwargs(),
    )


def _decode_step(config: BuildConfig):
    decode = functools.partial(
        decode_segment,
        resolution=config.resolution,
        crop_scale=config.crop_scale,
        threads=config.video.threads,
        min_face_px=config.min_face_px,
        max_frame_pixels=config.max_frame_pixels,
    )
    return guarded("decode", decode)


def _encode_step(config: BuildConfig):
    video = EncodeSettings(**vars(config.video))
    return guarded("encode", functools.partial(encode_members, resolution=config.resolution, video=video))


@dataclass(frozen=True)
class Pool:
    """One actor pool of the plan: the stages each of its actors runs in sequence, and what an actor
    reserves. `gpu_shares` is each stage's part of the actor's GPUs (its memory cap)."""

    stages: tuple[StageConfig, ...]
    size: int
    num_cpus: float
    num_gpus: float
    gpu_shares: tuple[float, ...]
    batch_size: int
    max_task_retries: int

    @property
    def name(self) -> str:
        return "+".join(stage.name for stage in self.stages)


def _chain(stages: list[StageConfig]) -> Pool:
    """One pool for `stages`. Its size is the largest of theirs and each actor gets the stages' total
    reservation (num x pool_size, summed) spread over them: with equal pool sizes an actor reserves the
    sum of the stages' resources, and the cluster-wide reservation never changes."""
    size = max(stage.pool_size for stage in stages)
    shares = tuple(round(stage.num_gpus * stage.pool_size / size, 6) for stage in stages)
    gpus = round(sum(shares), 6)
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(
            f"chaining {[s.name for s in stages]} gives each of its {size} actors {gpus:g} GPUs: Ray needs "
            "a fraction up to 1 or a whole number; change their num_gpus / pool_size, or set "
            "chain_stages to common or none"
        )
    return Pool(
        stages=tuple(stages),
        size=size,
        num_cpus=round(sum(s.num_cpus * s.pool_size for s in stages) / size, 6),
        num_gpus=gpus,
        gpu_shares=shares,
        batch_size=max(stage.batch_size for stage in stages),
        max_task_retries=max(stage.max_task_retries for stage in stages),
    )


def plan_pools(config: BuildConfig) -> list[Pool]:
    """The annotators' actor pools in DAG order (config.chain_stages).

    Ray Data has no fork: a dataset read by two branches (filter by bucket, then union) is planned and
    run once per branch, decode and annotators included. So rows are not routed by bucket; instead the
    stages a row needs share an actor, where a stage of another bucket passes the row by in memory.
    """
    if config.chain_stages == "none":
        return [_chain([stage]) for stage in config.stages]
    if config.chain_stages == "all":
        return [_chain(config.stages)] if config.stages else []
    pools: list[Pool] = []
    common: list[StageConfig] = []
    for stage in config.stages:
        if get_stage(stage.name).buckets is None:
            common.append(stage)
            continue
        if common:
            pools.append(_chain(common))
            common = []
        pools.append(_chain([stage]))
    return [*pools, _chain(common)] if common else pools


def _gpu_fix(stages: list[StageConfig], need: float) -> str:
    asking = ", ".join(f"{s.name} ({s.num_gpus:g} x {s.pool_size})" for s in stages if s.num_gpus > 0)
    return (
        f"run where {need:g} GPUs are, or set num_gpus: 0 for the stages that ask for GPUs ({asking}) in a "
        "--config overlay or a stages=[...] override (the list is replaced whole; the models then run on CPU)"
    )


def _cpu_fix(need: float, what: str) -> str:
    if os.environ.get("RAY_ADDRESS"):
        return f"add CPU nodes, or lower {what}"
    # Local Ray's CPU count is a reservation, not a core count: a larger one fits (and shares the cores).
    return f"num_cpus={math.ceil(need)} (local Ray's CPU count), or lower {what}"


def dag_demand(config: BuildConfig, elastic: bool = False) -> Demand:
    """The DAG's reservation: every actor pool of plan_pools at full size (one actor each when
    `elastic`: the pools grow into what is free) plus one CPU task, or Ray Data waits for a task slot
    forever."""
    pools = plan_pools(config)
    if elastic:
        pools = [replace(p, size=1) for p in pools]
    total = {
        "CPU": round(sum(p.num_cpus * p.size for p in pools) + config.task_num_cpus, 6),
        "GPU": round(sum(p.num_gpus * p.size for p in pools), 6),
    }
    largest = {
        "CPU": max((p.num_cpus for p in pools), default=0.0),
        "GPU": max((p.num_gpus for p in pools), default=0.0),
    }
    described = "; ".join(f"{p.name}: {p.size} x ({p.num_cpus:g} CPU + {p.num_gpus:g} GPU)" for p in pools)
    lower = "the stages' num_cpus / pool_size or task_num_cpus"
    return Demand(
        what=f"the DAG (actor pools {described or 'none'}; tasks {config.task_num_cpus:g} CPU)",
        total=total,
        per_actor=largest,
        fixes={"CPU": _cpu_fix(total["CPU"], lower), "GPU": _gpu_fix(config.stages, total["GPU"])},
    )


def check_resources(
    config: BuildConfig,
    available: dict[str, float] | list[dict[str, float]] | None = None,
    elastic: bool = False,
) -> None:
    """The DAG's actor pools plus one task must fit the cluster (pipeline/resources.py: an error locally,
    a bounded wait on a cluster). `available`: one node's or each node's resources; None reads Ray's.
    `elastic`: pools of one actor each suffice (see annotate)."""
    demand = dag_demand(config, elastic)
    if available is None:
        require(demand, config.resource_wait_s)
        return
    nodes = [available] if isinstance(available, dict) else available
    require(demand, config.resource_wait_s, nodes=lambda: nodes)


def stage_kwargs(stage_cls: type, options: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of a stage actor: its options plus the build context it asks for
    (weights_dir, bank_path, gpu_share: its num_gpus, ...), matched by parameter name."""
    accepted = inspect.signature(stage_cls.__init__).parameters
    return {**{k: v for k, v in context.items() if k in accepted}, **options}


def _pool_udf(pool: Pool, context: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The actor class of a pool and its constructor kwargs: the stage itself when it is alone (the plan
    before chaining), else a StageChain of the stages."""
    members = []
    for stage, share in zip(pool.stages, pool.gpu_shares, strict=True):
        stage_cls = get_stage(stage.name)
        members.append((stage_cls, stage_kwargs(stage_cls, stage.options, {**context, "gpu_share": share})))
    if len(members) == 1:
        return members[0]
    return StageChain, {"members": members, "gpu_share": pool.num_gpus}


def annotate(
    ds: ray.data.Dataset, config: BuildConfig, context: dict[str, Any], elastic: bool = False
) -> ray.data.Dataset:
    """The annotator pools of plan_pools applied to decoded rows (`elastic`: see pool_strategy)."""
    for pool in plan_pools(config):
        udf, kwargs = _pool_udf(pool, context)
        ds = map_on_actor_pool(
            ds,
            udf,
            pool_strategy(pool.size, elastic),
            batch_size=pool.batch_size,
            num_gpus=pool.num_gpus,
            num_cpus=pool.num_cpus,
            max_task_retries=pool.max_task_retries,
            fn_constructor_kwargs=kwargs,
        )
    return ds


def build_dataset(
    manifest: pd.DataFrame,
    config: BuildConfig,
    shards_dir: str,
    fence: tuple[str, str] | None = None,
    stage_context: dict[str, Any] | None = None,
    elastic: bool = False,
) -> ray.data.Dataset:
    """The lazy Dataset of writer status rows (one per manifest row) for the rows to build.

    `fence` (lock file, run id) stops writers orphaned by a killed build from committing later;
    `stage_context` holds what stages may ask for in their constructor (weights_dir, bank_path);
    `elastic`: actor pools start at one actor (see annotate).
    """
    rows = manifest.assign(error_stage="", error="", message="", timings="{}", annotations="[]")
    # A batch whose retries ran out (its actor kept dying) is dropped instead of failing the whole run;
    # the driver records its clips as failures (pipeline/build.py).
    ray.data.DataContext.get_current().max_errored_blocks = max(1, len(rows))
    # One block per segment: the writer bundles `samples_per_shard` of them into each task.
    ds = ray.data.from_items(rows.to_dict("records"), override_num_blocks=max(1, len(rows)))
    check_resources(config, elastic=elastic)
    task_cpus = config.task_num_cpus
    ds = ds.map(_decode_step(config), num_cpus=task_cpus)
    ds = annotate(ds, config, stage_context or {}, elastic)
    ds = ds.map(_encode_step(config), num_cpus=task_cpus).map(as_writer_row, num_cpus=task_cpus)
    return ds.map_batches(
        write_shard_batch,
        batch_size=config.samples_per_shard,
        num_cpus=task_cpus,
        fn_kwargs={"shards_dir": shards_dir, "fence": fence},
    )
