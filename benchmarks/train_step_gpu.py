"""The full-size stage-1 and stage-2 training step on one GPU: step time, peak memory, MFU, data-wait fraction.

    python benchmarks/train_step_gpu.py --out-dir out/bench-gpu --results benchmarks/RESULTS.md   # GPU, < 8 min
    python benchmarks/train_step_gpu.py --out-dir out/bench-cpu    # no GPU: the tiny model, 4 x 64², CPU

Each stage is what `configs/train/<stage>.yaml` trains: its MegActorConfig (its own gradient
checkpointing), its trainable set, its frames and stride (16 x 512², stride 2 / 12), bf16 autocast over
fp32 weights and AdamW states; with random full-size weights (nothing is downloaded). The model is
wrapped as the trainer wraps it (`train.loop.wrap_model` in a one-rank process group: DDP with the
trainer's options, gloo on CPU, nccl on a GPU; an EMA when the stage config enables it or --ema is
given), so peak memory holds DDP's buckets and the EMA. The data come from the trainer's own loader
(`train.data.make_loader`, DataLoader workers decoding shards written in this run by the project's
writer: demo-generator talking heads, real + swap, 240-frame 512² segments on a GPU), and each step is
the trainer's own `train.loop.train_step` (autocast forward, loss, backward, clipping, AdamW).

Per stage: median step seconds (synchronised), peak GPU memory (`torch.cuda.max_memory_allocated`), and
two utilisations of the card's dense bf16 peak (PEAK_BF16_TFLOPS, by the exact device name):
- MFU (model FLOP utilisation): the step's model FLOPs (forward + backward of the trained networks, no
  recompute of checkpointed blocks, no frozen VAE / CLIP; counted on the meta device by
  benchmarks/step_flops.py) / median step seconds / peak;
- HFU (hardware FLOP utilisation): the FLOPs the step executed (torch FlopCounterMode on a real step:
  recompute, VAE encode and CLIP included) / median step seconds / peak.
An unknown device name gives no MFU (null, with a message) unless --peak-tflops is given. Data-wait
fraction = time blocked on the loader / (that + step time) over the measured steps (50 on a GPU, far
more than the DataLoader's prefetch depth, workers x prefetch factor, so the queue filled while the
model was built is drained). JSON on stdout and in OUT/train_step.json; a Markdown section naming the
device in OUT/train_step.md, appended to --results when given. Without CUDA the same code runs on CPU
with the tiny profile (the test that keeps the script ready).

On a GPU node without network that has torch, torchvision, numpy, safetensors and transformers (and
their own requirements) but none of the project's other packages, ship the rest as wheels:

    make wheelhouse PY=3.12                  # here: WHEELHOUSE's wheels into .whl/ (size printed, <= 64 MiB)
    python3 -m pip install --no-index --no-deps --find-links .whl .whl/*.whl       # there, then:
    python3 benchmarks/train_step_gpu.py --out-dir out/bench-gpu

The script also needs NODE_BINARIES: OpenCV, pandas and pyarrow (train/augment.py, train/data.py,
pipeline/storage.py and pipeline/writer.py import them at module level: the trainer's loader reads the
shards and the writer writes them through them) and scikit-image (pipeline/sources/demo.py, whose
talking heads fill the shards, imports skimage.data; with it comes SciPy). Their wheels are over 100 MiB
together, too big for the wheelhouse: the GPU image must already hold them (this workplace's does), and
the script names a missing one. The wheelhouse's `av` (about 36 MB, FFmpeg inside) stays: it is the
loader's H.264 decoder, and the data wait is measured on the trainer's own decode.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MISSING = (
    "train_step_gpu: the package of module {name!r} is not installed. On a GPU node without network: "
    "`make wheelhouse PY=<its Python>` here, carry .whl/ there and `python3 -m pip install --no-index "
    "--no-deps --find-links .whl .whl/*.whl`; OpenCV (opencv-python-headless), pandas, pyarrow and "
    "scikit-image are too big for it and must be on the node already (NODE_BINARIES)."
)
try:
    from model.components import build_components
    from model.megactor import MegActor, count
    from train.config import TrainConfig, load_train_config
    from train.data import make_loader
    from train.ema import make_ema
    from train.loop import (
        make_lr_scheduler,
        make_optimizer,
        to_model_batch,
        train_step,
        trainable,
        wrap_model,
    )
except ModuleNotFoundError as exc:  # a node without the wheelhouse: say what to do, not a traceback
    raise SystemExit(MISSING.format(name=exc.name)) from exc

log = logging.getLogger("benchmarks.train_step_gpu")

# Dense (no 2:4 sparsity) bf16 Tensor Core peak, TFLOP/s, keyed by the exact torch.cuda.get_device_name().
# NVIDIA's datasheets give the sparse figure; dense is half of it: H100 datasheet (nvidia.com, "NVIDIA
# H100 Tensor Core GPU", BF16 1,979 SXM / 1,671 NVL / 1,513 PCIe TFLOPS with sparsity), H200 datasheet
# (BF16 1,979 with sparsity, the H100 SXM's compute), A100 datasheet (BF16 312 dense / 624 sparse, the
# same for 40 GB, 80 GB SXM4 and PCIe; also glennklockwood.com/garden/processors/A100, which cites it).
# An H100 NVL or PCIe is not an SXM: a name not in the table gets no MFU rather than a guess.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM5
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H200": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
}
# Measured steps for the data-wait fraction on a GPU: far more than the DataLoader's prefetch depth.
DATA_WAIT_STEPS = 50
PREFETCH_FACTOR = 2  # torch's DataLoader default; train.data.make_loader keeps it
# What a GPU node without network holds (with their own requirements), what it must already hold
# (big binaries the trainer's loader imports at module level), and what `make wheelhouse` ships: the
# rest of the import closure (test_train_step_gpu_wheelhouse_is_the_import_closure keeps them equal).
NODE_PACKAGES = ("torch", "torchvision", "numpy", "safetensors", "transformers")
NODE_BINARIES = ("opencv-python-headless", "pandas", "pyarrow", "scikit-image")
WHEELHOUSE = (
    "av",  # the loader's H.264 decoder (about 36 MB, FFmpeg inside): the trainer's loader cannot do without it
    "braceexpand",
    "certifi",
    "charset-normalizer",
    "diffusers",
    "importlib-metadata",
    "lazy-importer",
    "requests",
    "urllib3",
    "webdataset",
    "zipp",
)
NODE_PYTHON = "3.12"
PROJECT_PACKAGES = ("benchmarks", "evaluation", "jobs", "model", "pipeline", "train")
SCRIPTS = ("train_step_gpu.py", "loader.py", "step_flops.py")  # this one and the two it loads by path
STAGES = ("stage1", "stage2")


@dataclasses.dataclass
class Settings:
    device: str
    profile: str  # full on a GPU, tiny on CPU
    frames: int  # per sample
    resolution: int
    mixed_precision: str
    loader_workers: int
    clip_frames: int  # frames per written segment: real ones are 240; stage 2's span is 15 * 12 + 1 = 181
    clips: int
    warmup: int
    steps: int
    ema: bool = False  # an EMA even where the stage config has none

    @property
    def prefetch_depth(self) -> int:
        """Batches the DataLoader holds ready ahead of the step."""
        return self.loader_workers * PREFETCH_FACTOR


def indexed_device(device: str) -> str:
    """cuda -> cuda:0: torch.cuda.set_device and DDP's device_ids need an index (Ray Train gives one)."""
    return "cuda:0" if device == "cuda" else device


def default_settings(device: str) -> Settings:
    if device.startswith("cuda"):
        # Two 240-frame segments (one real, one swap): writing them at 512² takes a minute or two of CPU.
        return Settings(device, "full", 16, 512, "bf16", 6, 240, 2, 3, DATA_WAIT_STEPS)
    # CPU: the tiny profile at the tiny overlay's size; fp32 (bf16 autocast on CPU is ~10x slower)
    return Settings(device, "tiny", 4, 64, "fp32", 0, 40, 2, 1, 2)


def load_bench_shard_writer():
    """benchmarks/loader.py's shard writer (benchmarks is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "benchmarks" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.write_bench_shards


def module_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported: module and class level, not inside functions (those
    import when called)."""
    names: set[str] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the file's package
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                names.add(base.strip("."))
                names.update(f"{base}.{alias.name}".strip(".") for alias in node.names)
            elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                visit([child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)])

    visit(ast.parse(path.read_text()).body)
    return names


def project_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def third_party_imports() -> set[str]:
    """Top-level non-project, non-stdlib modules imported by this script's project import closure."""
    todo = [ROOT / "benchmarks" / name for name in SCRIPTS]
    seen: set[Path] = set()
    found: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in module_level_imports(path):
            top = name.split(".")[0]
            if top in PROJECT_PACKAGES:
                parts = name.split(".")
                todo.extend(f for i in range(1, len(parts) + 1) if (f := project_file(".".join(parts[:i]))))
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def requirement_closure(names: set[str]) -> set[str]:
    """Distributions and what they require on the node (Linux, NODE_PYTHON, no extras), installed
    metadata read."""
    environment = default_environment() | {"python_version": NODE_PYTHON, "extra": ""}
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            for line in importlib.metadata.requires(name) or []:
                requirement = Requirement(line)
                if requirement.marker is None or requirement.marker.evaluate(environment):
                    todo.append(canonicalize_name(requirement.name))
    return seen


def distributions_of(modules: set[str]) -> set[str]:
    """The installed distribution of each top-level module; where two provide one (cv2), the project's."""
    provided = importlib.metadata.packages_distributions()
    project = {
        canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires("megactor-ray") or []
    }
    found = set()
    for module in modules:
        candidates = sorted(canonicalize_name(d) for d in provided.get(module, []))
        if not candidates:
            raise LookupError(f"{module!r}: no installed distribution provides it; run `make setup`")
        found.add(next((c for c in candidates if c in project), candidates[0]))
    return found


def wheelhouse_closure() -> list[str]:
    """What the benchmark imports beyond the node's packages and binaries, their requirements included."""
    needed = requirement_closure(distributions_of(third_party_imports()))
    on_node = requirement_closure(set(NODE_PACKAGES) | set(NODE_BINARIES))
    return sorted(needed - on_node)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cores = os.cpu_count()
    return f"{platform.machine()} CPU, {cores} cores, {torch.get_num_threads()} torch threads, no GPU"


def peak_tflops(name: str, override: float) -> float | None:
    """The device's dense bf16 peak: --peak-tflops, else the table's entry for exactly this name."""
    if override:
        return override
    peak = PEAK_BF16_TFLOPS.get(name)
    if peak is None:
        log.warning(
            "no dense bf16 peak is known for %r (known: %s): MFU and HFU are null; give --peak-tflops "
            "from the card's datasheet", name, ", ".join(PEAK_BF16_TFLOPS),
        )  # fmt: skip
    return peak


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stage_config(stage: str, settings: Settings, shards: Path) -> TrainConfig:
    overrides = [
        f"data.root={shards.parent}",
        f"data.shards={shards}",
        f"data.num_frames={settings.frames}",
        f"data.resolution={settings.resolution}",
        f"data.num_workers={settings.loader_workers}",
        "data.batch_size=1",
        "data.shuffle_buffer=4",
        f"mixed_precision={settings.mixed_precision}",
        f"model.profile={settings.profile}",
        "model.init_from=null",
    ] + (["ema.enabled=true"] if settings.ema else [])
    config = load_train_config(stage, overrides=overrides)
    # One data epoch for the whole run, many times the prefetch depth: no epoch boundary while measuring.
    needed = max(settings.warmup + settings.steps + 1, 10 * settings.prefetch_depth)
    if config.data.steps_per_epoch < needed:
        config = load_train_config(stage, overrides=[*overrides, f"data.steps_per_epoch={needed}"])
    return config


def load_step_flops():
    """benchmarks/step_flops.py: the meta-device counts that separate model FLOPs from recompute and
    the frozen encoders."""
    spec = importlib.util.spec_from_file_location("bench_step_flops", ROOT / "benchmarks" / "step_flops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def model_flops_per_step(stage: str, config: TrainConfig, settings: Settings) -> int:
    """The step's model FLOPs at batch 1, counted on the meta device (no memory, no time on the GPU)."""
    step_flops = load_step_flops()
    shape = step_flops.StageShape(stage, settings.frames, settings.resolution, settings.profile)
    return step_flops.model_flops_of(step_flops.count_model_step(config.megactor_config(), shape))


@contextlib.contextmanager
def one_rank_group(device: torch.device) -> Iterator[None]:
    """A process group of one rank, as a Ray Train worker has (nccl on a GPU, gloo on CPU), so the model
    is wrapped, and its memory held, as the trainer's is. An in-memory store: no port to find."""
    if dist.is_initialized():
        raise RuntimeError("train_step_gpu: a process group already exists; run the benchmark on its own")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def utilisation(flops: int, seconds: float, peak: float | None) -> float | None:
    return round(flops / seconds / (peak * 1e12), 4) if peak else None


def measure_stage(stage: str, settings: Settings, shards: Path, peak: float | None) -> dict:
    device = torch.device(settings.device)
    config = stage_config(stage, settings, shards)
    counted_started = time.perf_counter()
    model_flops = model_flops_per_step(stage, config, settings)
    count_seconds = time.perf_counter() - counted_started
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    build_started = time.perf_counter()
    with torch.device(device):
        model = MegActor(config.megactor_config(), build_components(settings.profile))
    model.trainable_parameters(stage)  # sets requires_grad for the stage
    model.train()
    # As train.ray_train.train_worker does: wrap, then the optimiser and EMA over the wrapped parameters.
    wrapped = wrap_model(model, config.strategy, device, config.ddp.grad_compression,
                         config.mixed_precision == "bf16" and config.fsdp.bf16_params)  # fmt: skip
    params = list(trainable(wrapped).values())
    optimizer = make_optimizer(params, config.optim)
    lr_scheduler = make_lr_scheduler(optimizer, config.optim.warmup_steps)
    ema = make_ema(params, config.ema) if config.ema.enabled else None
    build_seconds = time.perf_counter() - build_started

    loader = iter(
        make_loader(config.data, seed=0, epoch=0, rank=0, world_size=1, pin_memory=device.type == "cuda")
    )
    generator = torch.Generator(device).manual_seed(0)

    def one_step(batch: dict) -> None:
        train_step(wrapped, to_model_batch(batch, device), optimizer, lr_scheduler, params, config, generator)
        if ema is not None:
            ema.step(params)

    first = next(loader)  # starts the DataLoader workers and fills the shuffle buffer: not timed
    with FlopCounterMode(display=False) as counter:
        one_step(first)  # also the first warm-up step
    executed_flops = counter.get_total_flops()
    for _ in range(settings.warmup - 1):
        one_step(next(loader))
    sync(settings.device)
    waits, steps = [], []
    for _ in range(settings.steps):
        started = time.perf_counter()
        batch = next(loader)
        waited = time.perf_counter()
        one_step(batch)
        sync(settings.device)
        waits.append(waited - started)
        steps.append(time.perf_counter() - waited)
    if settings.steps < max(DATA_WAIT_STEPS, 4 * settings.prefetch_depth):
        log.warning("%s: %d measured steps: the data-wait fraction is not the steady state (want >= %d)",
                    stage, settings.steps, max(DATA_WAIT_STEPS, 4 * settings.prefetch_depth))  # fmt: skip
    seconds = statistics.median(steps)
    return {
        "stage": stage,
        "frames": settings.frames,
        "resolution": settings.resolution,
        "stride": config.data.stride,
        "mixed_precision": config.mixed_precision,
        "strategy": f"{type(wrapped).__name__} (1 rank)",
        "ema": ema is not None,
        "gradient_checkpointing": model.config.gradient_checkpointing,
        "checkpoint_motion_modules": model.config.checkpoint_motion_modules,
        "checkpoint_modules": list(model.config.checkpoint_modules),
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": count(model),
        "build_seconds": round(build_seconds, 1),
        "model_flop_count_seconds": round(count_seconds, 1),
        "steps_per_epoch": config.data.steps_per_epoch,
        "prefetch_depth": settings.prefetch_depth,
        "step_seconds_median": round(seconds, 3),
        "step_seconds_all": [round(s, 3) for s in steps],
        "data_wait_seconds_all": [round(w, 4) for w in waits],
        "data_wait_fraction": round(sum(waits) / (sum(waits) + sum(steps)), 4),
        "model_tflop": round(model_flops / 1e12, 4),
        "executed_tflop": round(executed_flops / 1e12, 4),
        "achieved_model_tflops": round(model_flops / seconds / 1e12, 2),
        "achieved_executed_tflops": round(executed_flops / seconds / 1e12, 2),
        "mfu": utilisation(model_flops, seconds, peak),
        "hfu": utilisation(executed_flops, seconds, peak),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }


def markdown(report: dict) -> str:
    peak = report["peak_tflops"]
    basis = (
        f"MFU counts the step's model FLOPs (forward + backward of the trained networks: no recompute, no "
        f"frozen VAE / CLIP; counted on the meta device), HFU the FLOPs it executed (recompute, VAE and "
        f"CLIP included), both against {peak} TFLOP/s dense bf16."
        if peak
        else "No MFU / HFU: no dense bf16 peak is known for this device (give --peak-tflops)."
    )
    lines = [
        f"## Stage-1 and stage-2 training step on one device (`benchmarks/train_step_gpu.py`, {report['date']})",
        "",
        f"Device: **{report['device']}**; torch {report['torch']}; profile `{report['profile']}`, batch 1, "
        f"wrapped as the trainer wraps it (one-rank process group); data from the trainer's loader with "
        f"{report['loader_workers']} DataLoader workers on {report['settings']['clip_frames']}-frame "
        f"segments written in the same run. {basis}",
        "",
        "| stage | frames x pixels (stride) | precision | wrap | trainable | step (median) | peak memory | "
        "model / executed TFLOP | MFU | HFU | data wait (steps) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    percent = lambda v: f"{v:.1%}" if v is not None else "n/a"  # noqa: E731
    for run in report["runs"]:
        memory = f"{run['peak_memory_gib']} GiB" if run["peak_memory_gib"] is not None else "n/a (CPU)"
        ckpt = describe_checkpointing(run)
        wrap = run["strategy"] + (" + EMA" if run["ema"] else "")
        lines.append(
            f"| {run['stage']} | {run['frames']} x {run['resolution']}² ({run['stride']}) | "
            f"{run['mixed_precision']}, {ckpt} | {wrap} | {run['trainable_parameters'] / 1e6:.1f} M | "
            f"{run['step_seconds_median']} s | {memory} | {run['model_tflop']} / {run['executed_tflop']} | "
            f"{percent(run['mfu'])} | {percent(run['hfu'])} | "
            f"{run['data_wait_fraction']:.1%} ({len(run['step_seconds_all'])}) |"
        )
    return "\n".join(lines) + "\n"


def describe_checkpointing(run: dict) -> str:
    if not run["gradient_checkpointing"]:
        return "no ckpt"
    if run["checkpoint_modules"]:
        return f"ckpt {len(run['checkpoint_modules'])} units"
    return "ckpt incl. motion" if run["checkpoint_motion_modules"] else "ckpt"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument(
        "--steps", type=int, default=0, help="measured steps per stage (0 = the device default)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="override the device's dense bf16 peak"
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "out" / "bench-train-step")
    parser.add_argument("--results", type=Path, default=None, help="append the Markdown section to this file")
    parser.add_argument("--ema", action="store_true", help="an EMA in every stage (default: as its config)")
    parser.add_argument(
        "--wheelhouse", action="store_true", help="print the wheels a GPU node needs and exit"
    )
    args = parser.parse_args(argv)
    if args.wheelhouse:
        print("\n".join(WHEELHOUSE))
        return {"wheelhouse": list(WHEELHOUSE)}
    logging.basicConfig(level=logging.WARNING)
    args.device = indexed_device(args.device)
    settings = default_settings(args.device)
    settings.ema = args.ema
    if args.steps:
        settings.steps = args.steps
    name = device_name(args.device)
    peak = peak_tflops(name, args.peak_tflops) if args.device.startswith("cuda") else args.peak_tflops or None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, one_rank_group(torch.device(args.device)):
        shards = Path(tmp) / "shards"
        write_seconds = load_bench_shard_writer()(
            shards, settings.clips, settings.clip_frames, settings.resolution
        )
        runs = [measure_stage(stage, settings, shards, peak) for stage in args.stages.split(",")]
    report = {
        "benchmark": "train_step_gpu",
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "profile": settings.profile,
        "loader_workers": settings.loader_workers,
        "peak_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else ("PEAK_BF16_TFLOPS" if peak else None),
        "settings": dataclasses.asdict(settings),
        "shard_write_seconds": round(write_seconds, 1),
        "total_seconds": None,
        "runs": runs,
    }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "train_step.json").write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    (args.out_dir / "train_step.md").write_text(section)
    if args.results:
        with args.results.open("a") as results:
            results.write("\n" + section)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
