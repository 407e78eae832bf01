"""Command line.

python -m pipeline build --dataset demo --root DIR --out DIR [key=value ...]
python -m pipeline weights fetch [--for build|train|eval|NAME ...] [--accept-licence NAME|all]
                                                         # download + verify into WEIGHTS_DIR (make weights)
python -m pipeline weights check [--weights-dir DIR]     # what is missing or wrong under WEIGHTS_DIR
python -m pipeline weights pin NAME ...                  # record the sha256 of files with none published
python -m pipeline weights tiny DIR                      # write every model with random weights
python -m pipeline select --out DIR [--top 0.05 | --threshold 200 --score authors]   # the gaze subset
    [--min-frames N | --train-config configs/train/tiny.yaml]   # eligible span (default: stage 2's)
python -m pipeline stats DIR                             # the shard set's statistics as text
python -m pipeline report --out DIR [--html FILE]        # the statistics notebook, run, as HTML
python -m pipeline latents --out DIR [--device cuda] [--dtype fp32|bf16] [--profile full|tiny]
                                                         # cache the VAE latents beside the shards
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

import pandas as pd

from pipeline import storage
from pipeline.build import LOCK_NAME, DiskFull, RecipeMismatch, run_build
from pipeline.config import DATASETS, load_build_config
from pipeline.logs import setup_logging
from pipeline.ray_head import RayStartFailed
from pipeline.sources.base import SourceError
from pipeline.sources.celebvhq import INFO_NAME as CELEBVHQ_INFO
from pipeline.sources.demo import MARKER as DEMO_MARKER
from pipeline.visibility import NotShared
from pipeline.writer import DISK_FULL_ERRNOS, committed_keys

log = logging.getLogger("pipeline")

# Exit codes, distinct so a scheduler or script can tell a bad input from a crash from a full disk.
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_CRASH, EXIT_DISK_FULL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = """exit codes:
  0    done
  1    build: it finished, but more clips failed than max_failure_fraction allows (OUT/failures.parquet);
       weights fetch / check: a file could not be fetched or is missing or wrong
  2    usage, configuration or input error: the message names the file or setting to fix
  3    unexpected error (a bug): the traceback is printed, then one line naming the error and where
  4    the output's disk or quota is full: the message names the path and the free space; free space
       and rerun the same command (finished shards are kept)
  130  interrupted (Ctrl-C, SIGINT); rerun the same command to resume
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or resume building) a shard set")
    build.add_argument("--dataset", choices=DATASETS, default="demo")
    build.add_argument("--root", required=True, help="dataset folder (demo: where to generate it)")
    build.add_argument("--out", required=True, help="output folder or URI (s3://bucket/prefix)")
    build.add_argument(
        "--config", help="YAML overlay on configs/data/<dataset>.yaml, e.g. configs/data/cluster-8gpu.yaml"
    )
    build.add_argument("--overwrite", action="store_true", help="delete earlier output and start over")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument(
        "--verbose",
        action="store_true",
        help="Ray's own log lines and progress too (else in Ray's log folder)",
    )
    build.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. resolution=256"
    )
    weights = commands.add_parser(
        "weights", help="fetch, check or pin real weights, or write tiny random ones"
    )
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_commands.add_parser(
        "fetch",
        help="download every file of configs/weights.yaml (or those --for names) and verify it",
        description="Download into WEIGHTS_DIR in parallel, resuming partial files, trying each mirror in "
        "turn; a file appears under its name only once its size and sha256 are verified. A no-op when "
        "everything is in place. HF_ENDPOINT / HF_TOKEN apply to Hugging Face files; WEIGHTS_MIRROR=<base URL> "
        "fetches every file from one mirror laid out as <base>/<origin host>/<origin path>.",
    )
    fetch.add_argument("--weights-dir", help="default: $WEIGHTS_DIR")
    fetch.add_argument("--manifest", type=Path, help="default: configs/weights.yaml")
    fetch.add_argument(
        "--for", dest="wanted", nargs="+", default=[], metavar="NAME",
        help="build, train, eval, a stage name (swap, face_mask, foreground, gaze, stylise) or an entry name",
    )  # fmt: skip
    fetch.add_argument(
        "--accept-licence", action="append", default=[], metavar="NAME",
        help="accept a non-commercial / research-only licence (entry name, or all); remembered",
    )  # fmt: skip
    fetch.add_argument("--jobs", type=int, default=4, help="parallel downloads (default 4)")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    check = weights_commands.add_parser("check", help="list missing or wrong files of configs/weights.yaml")
    check.add_argument("--weights-dir", help="default: $WEIGHTS_DIR")
    check.add_argument("--manifest", type=Path, help="default: configs/weights.yaml")
    check.add_argument("--no-hash", action="store_true", help="check presence only (skip size and sha256)")
    check.add_argument("--rehash", action="store_true", help="ignore the hash cache (read every file again)")
    check.add_argument("names", nargs="*", help="weights names (default: all of configs/weights.yaml)")
    pin = weights_commands.add_parser(
        "pin", help="record the sha256 of present files that have no published hash (trust on first use)"
    )
    pin.add_argument("--weights-dir", help="default: $WEIGHTS_DIR")
    pin.add_argument("--manifest", type=Path, help="default: configs/weights.yaml")
    pin.add_argument("names", nargs="+", help="weights names, e.g. l2cs_gaze360")
    tiny = weights_commands.add_parser(
        "tiny", help="write every model with random weights in its real format"
    )
    tiny.add_argument("dir")
    select = commands.add_parser("select", help="write the gaze subset (DIR/gaze/) of a built shard set")
    select.add_argument("--out", required=True, help="the build's output folder or URI (s3://bucket/prefix)")
    rule = select.add_mutually_exclusive_group()
    rule.add_argument("--top", type=float, help="keep this fraction of the scored samples (default 0.05)")
    rule.add_argument("--threshold", type=float, help="keep samples whose score is above this value")
    select.add_argument(
        "--score", choices=("robust", "authors"), default="robust",
        help="robust: gaze_robust_spread_deg (degrees); authors: gaze_authors (MegActor's variance, keep > 200)",
    )  # fmt: skip
    span = select.add_mutually_exclusive_group()
    span.add_argument("--min-frames", type=int, help="frames a segment needs (default: stage 2's span)")
    span.add_argument(
        "--train-config", action="append", type=Path, default=None,
        help="overlay(s) on configs/train/stage2.yaml whose data.num_frames / data.stride give the span",
    )  # fmt: skip
    report = commands.add_parser("report", help="run the statistics notebook headless, save it as HTML")
    report.add_argument("--out", required=True, help="the build's output folder or s3:// prefix")
    report.add_argument("--html", help="where to write, a path or URI (default: OUT/shard_stats.html)")
    latents = commands.add_parser(
        "latents",
        help="cache the VAE latents of every frame beside the shards (resumable; the trainer reads them)",
    )
    latents.add_argument("--out", required=True, help="the build's output folder or URI (s3://bucket/prefix)")
    latents.add_argument(
        "--shards", action="append", default=None, metavar="FOLDER",
        help="a shard folder, relative to --out or absolute (repeatable); default: shards and gaze/shards",
    )  # fmt: skip
    latents.add_argument(
        "--profile", choices=("full", "tiny"), default="full",
        help="the trainer's model.profile: whose VAE encodes (tiny: the shared random tiny weights)",
    )  # fmt: skip
    latents.add_argument("--weights-dir", help="the trainer's model.weights_dir (default: $WEIGHTS_DIR)")
    latents.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when present)")
    latents.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32",
        help="stored precision (bf16: half the bytes; each value rounded within 2^-8 = 0.39 %% relative)",
    )  # fmt: skip
    latents.add_argument(
        "--resolution", type=int, help="the trainer's data.resolution (default: the shards' own resolution)"
    )
    latents.add_argument("--chunk", type=int, default=16, help="frames per VAE call (default 16)")
    stats = commands.add_parser("stats", help="print a shard set's statistics")
    stats.add_argument("dir", help="the build's output folder")
    return parser


def _select(args: argparse.Namespace) -> int:
    from pipeline.select import run_select, stage2_span

    min_frames = args.min_frames if args.min_frames is not None else stage2_span(args.train_config)
    selection, written = run_select(
        args.out, top=args.top, threshold=args.threshold, score=args.score, min_frames=min_frames
    )
    state = "written" if written else "unchanged"
    log.info(
        "gaze subset %s: %d of %d samples, %s threshold %.4g",
        state, selection.selected, selection.samples_total, selection.column, selection.threshold,
    )  # fmt: skip
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipeline.report import run_report

    log.info("report written: %s", run_report(args.out, args.html))
    return 0


def _latents(args: argparse.Namespace) -> int:
    import torch

    from pipeline.latents import load_vae, require_shards, run_latents, shard_folders

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = shard_folders(args.out, args.shards)
    require_shards(folders)  # before loading any weights
    vae = load_vae(args.profile, args.weights_dir)
    summary = run_latents(folders, vae, torch.device(device), args.dtype, args.resolution, args.chunk)
    for line in summary.lines():
        log.info("latents: %s", line)
    if summary.failed:
        log.error("%d shard(s) failed (above); rerun the same command to retry them", len(summary.failed))
        return EXIT_FAILURES
    if not summary.encoded:
        log.info("latents: every shard already has latents of these settings")
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    from pipeline.stats import load, report

    print(report(load(args.dir)))
    return 0


def _weights(args: argparse.Namespace) -> int:
    from pipeline.stages import load_all_stages
    from pipeline.weights import (
        STATE_DIR,
        TINY_WRITERS,
        check_weights,
        ensure_tiny_weights,
        load_weight_specs,
        pin_weights,
        resolve_weights_dir,
        unpinned,
    )
    from pipeline.weights.fetch import FetchError, fetch_weights
    from pipeline.weights.licences import LicenceNotAccepted

    if args.weights_command == "tiny":
        load_all_stages()
        ensure_tiny_weights(Path(args.dir), TINY_WRITERS)
        log.info("tiny weights for %s in %s", ", ".join(sorted(TINY_WRITERS)), args.dir)
        return 0
    weights_dir = resolve_weights_dir("full", args.weights_dir)
    if args.weights_command == "fetch":
        try:
            stats = fetch_weights(
                weights_dir,
                args.wanted,
                args.accept_licence,
                jobs=args.jobs,
                manifest=args.manifest,
                progress=not args.no_progress,
            )
        except (LicenceNotAccepted, FetchError) as exc:
            log.error("%s", exc)
            return 1
        log.info(
            "weights in %s: %d downloaded, %d already in place (%d bytes received)",
            weights_dir, len(stats.downloaded), len(stats.present), stats.bytes_received,
        )  # fmt: skip
        return 0
    if args.weights_command == "pin":
        for path, digest in pin_weights(weights_dir, args.names, args.manifest).items():
            log.info("pinned %s sha256 %s (trust on first use)", path, digest)
        return 0
    names = args.names or sorted(load_weight_specs(args.manifest))
    if args.rehash:
        (weights_dir / STATE_DIR / "hashes.json").unlink(missing_ok=True)
    problems = check_weights(weights_dir, names, verify_hash=not args.no_hash, manifest=args.manifest)
    for problem in problems:
        print(problem)
    for path in unpinned(weights_dir, names, args.manifest):
        log.warning("%s has no published sha256 and no pin: `weights pin` records it", path)
    if not problems:
        print(f"all {len(names)} weights present in {weights_dir}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(verbose=getattr(args, "verbose", False))
    try:
        return _run(args)
    except KeyboardInterrupt:
        log.error("interrupted: %s; run the same command to finish", _committed(args))
        return EXIT_INTERRUPTED
    except RayStartFailed as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except DiskFull as exc:
        log.error("%s", exc)
        return EXIT_DISK_FULL
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            return _crashed(exc)
        log.error("%s", DiskFull.from_error(exc, getattr(args, "out", "") or getattr(args, "dir", "")))
        return EXIT_DISK_FULL
    except Exception as exc:  # noqa: BLE001 - a crash gets its own exit code and one clear line
        return _crashed(exc)


def _committed(args: argparse.Namespace) -> str:
    """What an interrupted build has kept: committed samples of those planned (its manifest)."""
    out = getattr(args, "out", None)
    if args.command != "build" or not out:
        return "nothing half-written is kept"
    try:
        planned = set(pd.read_parquet(storage.join(out, "manifest.parquet"))["key"])
        done = committed_keys(storage.join(out, "shards")) & planned
    except (OSError, ValueError, KeyError):
        return "no sample committed yet"
    return f"{len(done)} of {len(planned)} samples committed"


def _crashed(exc: BaseException) -> int:
    """Log the traceback, then one line naming the error and the line it came from."""
    log.critical("unexpected error; traceback:\n%s", "".join(traceback.format_exception(exc)).rstrip())
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown"
    log.critical(
        "unexpected error (exit %d): %s: %s at %s; the traceback is above. This is a bug: please report it "
        "with the command you ran",
        EXIT_CRASH, type(exc).__name__, exc, where,
    )  # fmt: skip
    return EXIT_CRASH


def _run(args: argparse.Namespace) -> int:
    if args.command == "weights":
        try:
            return _weights(args)
        except (ValueError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return EXIT_USAGE
    if args.command in ("select", "stats", "report", "latents"):
        handler = {"select": _select, "stats": _stats, "report": _report, "latents": _latents}[args.command]
        try:
            return handler(args)
        except (ValueError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return EXIT_USAGE
    return _build(args)


def check_root(dataset: str, root: str) -> None:
    """Before any weights or output: the dataset folder exists, and a demo build does not write its
    generated clips into a real dataset's download (a forgotten DATASET=)."""
    path = Path(root)
    if dataset == "demo":
        found = guess_dataset(path)
        if found and not (path / DEMO_MARKER).is_file():
            raise SourceError(
                f"{root} is not a demo folder: this looks like {found}: DATASET={found.lower().replace('-', '')} "
                f"(make) or --dataset {found.lower().replace('-', '')}"
            )
        return
    if not path.is_dir():
        raise SourceError(
            f"dataset root {root} does not exist: point ROOT= (make shards ROOT=/path/to/{dataset}) or --root "
            "at the downloaded dataset folder"
        )


def guess_dataset(root: Path) -> str | None:
    """'VFHQ' or 'CelebV-HQ' when `root` holds that dataset's files (a cheap look at two levels)."""
    if not root.is_dir():
        return None
    if any(root.glob(CELEBVHQ_INFO)) or any(root.glob(f"*/{CELEBVHQ_INFO}")):
        return "CelebV-HQ"
    vfhq = ("meta_info", "meta_info*.zip", "Clip+*.txt", "*/Clip+*.txt", "extracted_cropped_face_results")
    if any(next(root.glob(pattern), None) for pattern in vfhq):
        return "VFHQ"
    return None


def _remove_stub(out: str, existed: bool) -> None:
    """A failed run that created its output folder leaves nothing there but its lock and empty folders:
    remove them, so a corrected command does not meet a half-made output."""
    path = Path(out)
    if existed or storage.is_remote(out) or not path.is_dir():
        return
    files = [p for p in path.rglob("*") if not p.is_dir()]
    if [p.name for p in files] not in ([], [LOCK_NAME]):
        return
    (path / LOCK_NAME).unlink(missing_ok=True)
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        folder.rmdir()
    path.rmdir()


def _build(args: argparse.Namespace) -> int:
    existed = storage.is_remote(args.out) or Path(args.out).exists()
    try:
        check_root(args.dataset, args.root)
        config = load_build_config(args.dataset, args.config, args.overrides, root=args.root, out=args.out)
        summary = run_build(config, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, SourceError, RecipeMismatch, NotShared) as exc:
        log.error("%s", exc)
        _remove_stub(args.out, existed)
        return EXIT_USAGE
    except RayStartFailed:
        _remove_stub(args.out, existed)
        raise
    for line in summary.lines():
        log.info("summary: %s", line)
    if summary.failure_fraction > config.max_failure_fraction:
        log.error(
            "%.1f %% of clips failed, above max_failure_fraction %.1f %%; see %s/failures.parquet",
            100 * summary.failure_fraction,
            100 * config.max_failure_fraction,
            config.out,
        )
        return EXIT_FAILURES
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
