"""Download the weights the manifest names: in parallel, resuming partial files with HTTP Range, trying
each source in turn, and verifying size and sha256 before a file appears under its final name.

A file is written as `.NAME.part` beside its destination and renamed only once verified, so a reader
never sees a truncated or tampered file; an interrupted download leaves the part file for the next run to
resume. Archives are downloaded to WEIGHTS_DIR/.weights/downloads/, each member is unpacked the same way
(temp name, verified, renamed), and the archive is deleted once every member is in place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener

from tqdm import tqdm

from pipeline.weights.check import STATE_DIR, HashCache, Pins, expected_sha256, file_problem, sha256_file
from pipeline.weights.derive import derive_folder
from pipeline.weights.licences import gate_licences
from pipeline.weights.manifest import (
    HF_DEFAULT_ENDPOINT,
    FileSpec,
    WeightFile,
    load_weight_specs,
    members,
    select,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 60.0
USER_AGENT = "megactor-weights/1 (python urllib)"


class FetchError(RuntimeError):
    """Every file that could not be fetched, with every source's reason, in one message."""


class _Interrupted(ConnectionError):
    """The server closed the connection before the whole body arrived: keep the part file, resume."""


class _DropAuthOnRedirect(HTTPRedirectHandler):
    """Hugging Face redirects to a CDN: the token goes to the endpoint only, never to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 (urllib's API)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


class _Progress:
    """One byte counter for every download thread (tqdm's update is not atomic across threads)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)


def _headers(url: str, start: int) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    token = os.environ.get("HF_TOKEN")
    endpoint = os.environ.get("HF_ENDPOINT", HF_DEFAULT_ENDPOINT).rstrip("/")
    if token and url.startswith(endpoint + "/"):
        headers["Authorization"] = f"Bearer {token}"
    return headers


@dataclass
class Stats:
    """What one fetch did: files downloaded / already in place, and bytes received over the network."""

    downloaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    bytes_received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, path: str) -> None:
        with self.lock:
            (self.downloaded if kind == "downloaded" else self.present).append(path)


def _download(url: str, part: Path, size: int | None, bar: _Progress, stats: Stats) -> str:
    """Append the rest of `url` to `part` (Range from its current length); return the sha256 of the
    whole part file. Raises _Interrupted (part kept) when the body stops short."""
    start = part.stat().st_size if part.exists() else 0
    if size is not None and start > size:
        part.unlink()
        start = 0
    digest = hashlib.sha256()
    opener = build_opener(_DropAuthOnRedirect)
    try:
        response = opener.open(Request(url, headers=_headers(url, start)), timeout=TIMEOUT_S)
    except HTTPError as exc:
        whole = exc.headers.get("Content-Range") == f"bytes */{start}" if exc.headers else False
        if exc.code == 416 and start and (start == size or whole):  # the part file holds every byte
            exc.close()
            return sha256_file(part)
        raise
    with response:
        resumed = start and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
            raise HTTPException(
                f"server answered Range {start}- with {response.headers.get('Content-Range')}"
            )
        if start and not resumed:  # the server ignored Range: start over
            log.info("%s: no Range support, downloading %s from the start", urlsplit(url).netloc, part.name)
            bar.update(-start)
            start = 0
        if start:
            with open(part, "rb") as handle:
                for chunk in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(chunk)
        length = response.headers.get("Content-Length")
        received = 0
        with open(part, "ab" if start else "wb") as out:
            try:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (IncompleteRead, ConnectionError, TimeoutError) as exc:  # what was written stays
                raise _Interrupted(f"connection lost after {start + received} bytes ({exc})") from exc
            finally:
                with stats.lock:
                    stats.bytes_received += received
        if length is not None and received < int(length):
            raise _Interrupted(f"connection closed after {start + received} bytes of {start + int(length)}")
    return digest.hexdigest()


def fetch_file(
    root: Path,
    spec: FileSpec,
    cache: HashCache,
    pins: Pins,
    bar: _Progress,
    stats: Stats,
    attempts: int = 3,
    record: bool = True,
) -> None:
    """Put `spec` under root: each source in turn, each up to `attempts` times (resuming), verified
    before the rename. Raises FetchError with every source's reason."""
    final = root / spec.path
    part = final.with_name(f".{final.name}.part")
    final.parent.mkdir(parents=True, exist_ok=True)
    expected, kind = expected_sha256(spec, pins)
    errors = []
    for url in spec.urls:
        for _ in range(attempts):
            had_part = part.is_file() and part.stat().st_size > 0
            try:
                digest = _download(url, part, spec.size, bar, stats)
            except _Interrupted as exc:
                errors.append(f"{url}: {exc}")
                continue  # resume from the part file
            except (HTTPError, URLError, HTTPException, OSError) as exc:
                errors.append(f"{url}: {exc}")
                break  # next source; the part file stays for it (same bytes, same hash) or a rerun
            size = part.stat().st_size
            if spec.size is not None and size != spec.size:
                errors.append(f"{url}: got {size} bytes, expected {spec.size}")
            elif expected and digest != expected:
                errors.append(f"{url}: sha256 mismatch: got {digest}, expected {expected} ({kind})")
            else:
                os.replace(part, final)
                cache.remember(spec.path, digest)
                if not expected:  # nobody published a hash: this download is the first use we trust
                    pins.record(spec.path, digest, size)
                if record:
                    stats.add("downloaded", spec.path)
                return
            part.unlink()  # wrong bytes: never resume from them
            bar.update(-size)
            if not had_part:
                break  # a whole download from this source is wrong: next source
            # else the resumed prefix may be what was wrong: once more from the start
    raise FetchError(f"{spec.path}: " + "; ".join(errors or ["no download source"]))


def unpack_archive(
    root: Path, archive: WeightFile, parts: list[WeightFile], cache: HashCache, pins: Pins
) -> None:
    """Unpack each member entry from the downloaded archive: temp name, size + sha256, rename."""
    zip_path = root / STATE_DIR / "downloads" / (archive.archive_file or f"{archive.name}.zip")
    problems = []
    with zipfile.ZipFile(zip_path) as zf:
        for member in parts:
            spec = member.file_specs()[0]
            final = root / spec.path
            tmp = final.with_name(f".{final.name}.part")
            final.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            try:
                with zf.open(member.member) as source, open(tmp, "wb") as out:
                    for chunk in iter(lambda: source.read(CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
            except KeyError:
                problems.append(f"{member.name}: {archive.name} has no member {member.member!r}")
                continue
            size = tmp.stat().st_size
            expected, kind = expected_sha256(spec, pins)
            if spec.size is not None and size != spec.size:
                problems.append(
                    f"{member.name}: member {member.member} has {size} bytes, expected {spec.size}"
                )
            elif expected and digest.hexdigest() != expected:
                problems.append(
                    f"{member.name}: member {member.member} sha256 mismatch: got {digest.hexdigest()}, "
                    f"expected {expected} ({kind})"
                )
            else:
                os.replace(tmp, final)
                cache.remember(spec.path, digest.hexdigest())
                if not expected:
                    pins.record(spec.path, digest.hexdigest(), size)
                continue
            tmp.unlink()
    if problems:
        raise FetchError("; ".join(problems))
    zip_path.unlink()


def _fetch_archive(
    root: Path, archive: WeightFile, parts: list[WeightFile], cache: HashCache, pins: Pins, bar: _Progress,
    stats: Stats, attempts: int, mirror: str | None,
) -> None:  # fmt: skip
    spec = archive.archive_spec(mirror)
    zip_spec = FileSpec(spec.entry, f"{STATE_DIR}/downloads/{spec.path}", spec.sha256, spec.size, spec.urls)
    if not (root / zip_spec.path).is_file() or file_problem(root, zip_spec, cache, pins):
        fetch_file(root, zip_spec, cache, pins, bar, stats, attempts, record=False)
    unpack_archive(root, archive, parts, cache, pins)
    for member in parts:
        stats.add("downloaded", member.path)


def _derive(
    root: Path, specs: dict[str, WeightFile], entry: WeightFile, cache: HashCache, pins: Pins, stats: Stats
) -> None:
    """Write a derived folder from its (verified) source; pin what was written, trust-on-first-use."""
    files = entry.file_specs()
    if not any(file_problem(root, file, cache, pins) for file in files):
        stats.present.extend(file.path for file in files)
        return
    source = specs[entry.derived_from]
    source_problems = [p for f in source.file_specs() if (p := file_problem(root, f, cache, pins))]
    if source_problems:
        raise FetchError(f"cannot write it from {source.name}: " + "; ".join(source_problems))
    log.info("writing %s from %s (%s)", entry.path, source.path, entry.derive)
    derive_folder(entry.derive, root / source.path, root / entry.path, [rel for rel, _, _ in entry.files])
    for file in files:
        pins.record(file.path, cache.sha256(file.path), (root / file.path).stat().st_size)
        stats.add("downloaded", file.path)


def _part_size(final: Path) -> int:
    part = final.with_name(f".{final.name}.part")
    return part.stat().st_size if part.is_file() else 0


def fetch_weights(
    weights_dir: Path,
    wanted: Iterable[str] = (),
    accept_licences: Iterable[str] = (),
    jobs: int = 4,
    mirror: str | None = None,
    manifest: Path | None = None,
    progress: bool = True,
    attempts: int = 3,
) -> Stats:
    """Fetch what `--for` names (default: everything); a no-op when every file is in place and right.
    Raises LicenceNotAccepted before any download, FetchError listing every failure at the end."""
    root = Path(weights_dir)
    specs = load_weight_specs(manifest)
    chosen = select(specs, wanted)
    gate_licences(root, chosen, accept_licences)
    cache, pins = HashCache(root), Pins(root)
    stats = Stats()
    files: list[FileSpec] = []  # plain files still to download
    archives: list[tuple[WeightFile, list[WeightFile]]] = []
    problems = []
    derived = [entry for entry in chosen if entry.derived_from]
    for entry in chosen:
        if entry.member_of or entry.derived_from:
            continue  # handled with its archive / after the downloads
        if entry.kind == "archive":
            parts = members(specs, entry.name)
            todo = [m for m in parts if file_problem(root, m.file_specs()[0], cache, pins)]
            stats.present.extend(m.path for m in parts if m not in todo)
            if todo:
                archives.append((entry, todo))
            continue
        for spec in entry.file_specs(mirror):
            if not file_problem(root, spec, cache, pins):
                stats.present.append(spec.path)
            elif not spec.urls:
                problems.append(f"{spec.path}: no download source; {entry.manual or entry.origin}")
            else:
                files.append(spec)
    total = sum(spec.size or 0 for spec in files) + sum(a.size or 0 for a, _ in archives)
    zips = [root / STATE_DIR / "downloads" / (a.archive_file or f"{a.name}.zip") for a, _ in archives]
    part_files = [root / spec.path for spec in files] + zips
    resumable = sum(_part_size(path) for path in part_files)  # already on disk: shown as done
    if files or archives:
        log.info("fetching %d file(s), %d archive(s) into %s", len(files), len(archives), root)
    with (
        tqdm(
            total=total, initial=resumable, unit="B", unit_scale=True, desc="weights", disable=not progress
        ) as tqdm_bar,
        ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
    ):
        bar = _Progress(tqdm_bar)
        futures = {
            pool.submit(fetch_file, root, spec, cache, pins, bar, stats, attempts): spec.path
            for spec in files
        }
        futures.update(
            {
                pool.submit(_fetch_archive, root, a, parts, cache, pins, bar, stats, attempts, mirror): a.name
                for a, parts in archives
            }
        )
        for future in as_completed(futures):
            try:
                future.result()
            except (FetchError, OSError, zipfile.BadZipFile) as exc:
                problems.append(str(exc))
    for entry in derived:
        try:
            _derive(root, specs, entry, cache, pins, stats)
        except (FetchError, OSError, ValueError, RuntimeError) as exc:
            problems.append(f"{entry.path}: {exc}")
    cache.save()
    pins.save()
    if problems:
        raise FetchError(f"{len(problems)} weights file(s) not fetched:\n  " + "\n  ".join(sorted(problems)))
    return stats
