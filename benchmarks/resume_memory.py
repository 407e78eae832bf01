"""Host memory of each rank while a resume loads the AdamW state: today's way against the trainer's, JSON.

    python benchmarks/resume_memory.py                     # ~100 M trainable parameters, 2 CPU ranks (gloo)

The same state is written first as one optimizer.pt (full state dict keyed by parameter name) and as a
training checkpoint (train/checkpoint.py: DCP, one file per rank). Then, for each strategy (ddp, fsdp)
and each loader, two spawned gloo processes build the model and a fresh AdamW and load it:

    today   every rank torch.load()s the whole optimizer.pt into its own memory
    fixed   train.checkpoint.load_training_state: each rank reads what it holds from the DCP checkpoint
            (the trainable weights too, so its figures include them)

Per rank: RSS before the load, peak RSS during it (VmHWM reset just before), RSS after, and the peak of
private (anonymous) memory, sampled every 2 ms: mapped file pages count in RSS but are page cache,
shared by every process of a node and dropped under pressure, not a per-rank copy. On CPU the optimiser
state itself lives in host RAM (DDP: all of it on every rank; FSDP: each rank's shard), so "held" is what
any resume must keep; on GPUs it is device memory and the host needs only the transient part.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import load_training_state, save_training_checkpoint  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.loop import TrainState  # noqa: E402

OPTIMIZER_FILE = "optimizer.pt"

MIB = 2**20
WORLD = 2


def build_model(width: int, layers: int) -> nn.Sequential:
    """layers x Linear(width, width): 12 x 2880² ~ 99.6 M parameters."""
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def write_checkpoint(folder: Path, width: int, layers: int) -> int:
    """optimizer.pt and train_state.json after one AdamW step, as save_training_checkpoint writes them."""
    model = build_model(width, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model(torch.randn(2, width)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    torch.save(get_optimizer_state_dict(model, optimizer, options=options), folder / OPTIMIZER_FILE)
    save_training_checkpoint(folder / "dcp", model, optimizer, scheduler, TrainState(step=1),
                             TrainConfig(export_every=10**9), rank=0)  # fmt: skip
    return sum(p.numel() for p in model.parameters())


def status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class AnonPeak:
    """Samples RssAnon (private memory) every 2 ms in a thread; .peak in KiB."""

    def __init__(self) -> None:
        self.peak, self.running = status_kib("RssAnon"), True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_kib("RssAnon"))
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, status_kib("RssAnon"))


def load_today(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The earlier resume: every rank reads the whole file."""
    state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def worker(rank: int, folder: str, init: str, strategy: str, how: str, width: int, layers: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    model = build_model(width, layers)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before, anon_before = status_kib("VmRSS"), status_kib("RssAnon")
    sampler = AnonPeak()
    started = time.perf_counter()
    if how == "today":
        load_today(wrapped, optimizer, Path(folder))
    else:
        load_training_state(wrapped, optimizer, scheduler, Path(folder) / "dcp")
    seconds = time.perf_counter() - started
    anon_peak = sampler.stop()
    result = {
        "rank": rank,
        "rss_before_mib": round(before / 1024),
        "peak_rss_mib": round(status_kib("VmHWM") / 1024),
        "rss_after_mib": round(status_kib("VmRSS") / 1024),
        "peak_extra_rss_mib": round((status_kib("VmHWM") - before) / 1024),
        "peak_extra_private_mib": round((anon_peak - anon_before) / 1024),
        "held_after_mib": round((status_kib("RssAnon") - anon_before) / 1024),
        "load_s": round(seconds, 2),
    }
    dist.barrier()
    (Path(folder) / f"result-{strategy}-{how}-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=2880)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="resume-memory-") as tmp:
        folder = Path(tmp)
        params = write_checkpoint(folder, args.width, args.layers)
        runs: dict[str, dict[str, list[dict]]] = {}
        for strategy in args.strategies:
            for how in ("today", "fixed"):
                init = folder / f"init-{strategy}-{how}"
                mp.spawn(worker, args=(tmp, str(init), strategy, how, args.width, args.layers), nprocs=WORLD)
                results = [
                    json.loads((folder / f"result-{strategy}-{how}-{r}.json").read_text())
                    for r in range(WORLD)
                ]
                runs.setdefault(strategy, {})[how] = results
        file_mib = round((folder / OPTIMIZER_FILE).stat().st_size / MIB)
    summary = {
        strategy: {
            "peak_extra_private_mib_per_rank": {
                how: [r["peak_extra_private_mib"] for r in rs] for how, rs in hows.items()
            },
            "peak_extra_rss_mib_per_rank": {
                how: [r["peak_extra_rss_mib"] for r in rs] for how, rs in hows.items()
            },
        }
        for strategy, hows in runs.items()
    }
    print(json.dumps({
        "benchmark": "resume_memory",
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, torch {torch.__version__}",
        "world_size": WORLD,
        "trainable_parameters": params,
        "optimizer_file_mib": file_mib,
        "summary": summary,
        "runs": runs,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
