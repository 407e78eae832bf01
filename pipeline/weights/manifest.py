"""configs/weights.yaml as typed entries: what each weights file is, where it comes from, who needs it.

An entry is one file, a folder of files, or a zip archive whose members are their own entries. Every
file resolves to a `FileSpec` (path under WEIGHTS_DIR, candidate URLs, sha256, size) that fetch and check
share. URLs are built here so that HF_ENDPOINT and WEIGHTS_MIRROR apply in exactly one place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

WEIGHTS_YAML = Path(__file__).resolve().parents[2] / "configs" / "weights.yaml"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
JOBS = ("build", "train", "eval")


@dataclass(frozen=True)
class Source:
    """One place an entry can be downloaded from: a plain URL or a Hugging Face repo at a revision."""

    url: str = ""
    hf_repo: str = ""
    hf_type: str = "model"  # model | dataset
    revision: str = "main"
    subfolder: str = ""
    file: str = ""  # path inside the repo (single-file entries)

    @classmethod
    def parse(cls, raw: str | dict[str, Any]) -> Source:
        if isinstance(raw, str):
            return cls(url=raw)
        unknown = set(raw) - {"hf", "type", "revision", "subfolder", "file"}
        if unknown or "hf" not in raw:
            raise ValueError(f"a source is a URL or {{hf: repo, revision, type, subfolder, file}}, got {raw}")
        return cls(
            hf_repo=raw["hf"],
            hf_type=raw.get("type", "model"),
            revision=str(raw.get("revision", "main")),
            subfolder=raw.get("subfolder", ""),
            file=raw.get("file", ""),
        )

    def origin_url(self, rel: str = "", endpoint: str | None = None) -> str:
        """The URL at the origin (HF_ENDPOINT applied unless `endpoint` is given); `rel` is the file's
        path inside a folder entry."""
        if self.url:
            return self.url + ("/" + rel if rel else "")
        endpoint = (endpoint or os.environ.get("HF_ENDPOINT", HF_DEFAULT_ENDPOINT)).rstrip("/")
        prefix = "datasets/" if self.hf_type == "dataset" else ""
        in_repo = "/".join(part for part in (self.subfolder, self.file, rel) if part)
        return f"{endpoint}/{prefix}{self.hf_repo}/resolve/{quote(self.revision, safe='')}/{in_repo}"


def source_url(source: Source, rel: str = "", mirror: str | None = None) -> str:
    """Where to download from: the origin, or WEIGHTS_MIRROR laid out like the canonical origin (a
    mirror of Hugging Face files keeps huggingface.co's paths whatever HF_ENDPOINT says)."""
    mirror = mirror if mirror is not None else os.environ.get("WEIGHTS_MIRROR", "")
    if mirror:
        return mirrored(source.origin_url(rel, endpoint=HF_DEFAULT_ENDPOINT), mirror)
    return source.origin_url(rel)


def mirrored(url: str, mirror: str | None = None) -> str:
    """WEIGHTS_MIRROR=<base> maps https://host/path?query to <base>/host/path: one internal server laid
    out like the origins serves every file (air-gapped clusters)."""
    mirror = mirror if mirror is not None else os.environ.get("WEIGHTS_MIRROR", "")
    if not mirror:
        return url
    parts = urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}"


@dataclass(frozen=True)
class FileSpec:
    """One file on disk: what fetch downloads (or unpacks) and check verifies."""

    entry: str  # the manifest entry it belongs to
    path: str  # relative to WEIGHTS_DIR
    sha256: str | None
    size: int | None
    urls: tuple[str, ...] = ()  # origin first, then mirrors (empty for archive members and manual files)
    member: str = ""  # name inside the archive, for archive members


@dataclass(frozen=True)
class WeightFile:
    """One manifest entry. `name`, `path`, `sha256`, `origin` are what the stages have always read."""

    name: str  # key in configs/weights.yaml
    path: str  # relative to the weights folder (a file, a folder, or an archive's unpack folder)
    sha256: str | None  # of the file (or the archive); None for folders and unpublished hashes
    origin: str  # where a user gets the real file, in words or as a URL
    kind: str = "file"  # file | folder | archive
    size: int | None = None
    sources: tuple[Source, ...] = ()
    revision: str | None = None
    licence: str = ""
    restricted: bool = False  # non-commercial / research only: fetch needs --accept-licence
    jobs: tuple[str, ...] = ()
    files: tuple[tuple[str, str | None, int | None], ...] = ()  # folder: (path in folder, sha256, size)
    member_of: str = ""  # the archive entry this file is unpacked from
    member: str = ""  # its name inside that archive
    archive_file: str = ""  # archive: the downloaded file's name
    manual: str = ""  # how to get a file that has no downloadable origin
    derived_from: str = ""  # written by `weights fetch` from this entry (no download of its own)
    derive: str = ""  # how (pipeline/weights/derive.py)

    def file_specs(self, mirror: str | None = None) -> list[FileSpec]:
        """Every file this entry puts on disk (archives: none of their own, see `archive_spec`)."""
        if self.kind == "archive":
            return []
        if self.member_of:
            return [FileSpec(self.name, self.path, self.sha256, self.size, (), self.member)]
        if self.kind == "folder":
            return [
                FileSpec(
                    self.name,
                    f"{self.path}/{rel}",
                    sha,
                    size,
                    tuple(source_url(source, rel, mirror) for source in self.sources),
                )
                for rel, sha, size in self.files
            ]
        urls = tuple(source_url(source, "", mirror) for source in self.sources)
        return [FileSpec(self.name, self.path, self.sha256, self.size, urls)]

    def archive_spec(self, mirror: str | None = None) -> FileSpec:
        """The archive itself, downloaded to the hidden downloads folder and deleted once unpacked."""
        urls = tuple(source_url(source, "", mirror) for source in self.sources)
        return FileSpec(self.name, self.archive_file or f"{self.name}.zip", self.sha256, self.size, urls)


def _entry(name: str, raw: dict[str, Any]) -> WeightFile:
    sources = tuple(Source.parse(item) for item in raw.get("sources") or ())
    files = tuple((item["path"], item.get("sha256"), item.get("size")) for item in raw.get("files") or ())
    kind = raw.get("kind") or ("folder" if files else "file")
    if kind not in ("file", "folder", "archive"):
        raise ValueError(f"{name}: kind must be file, folder or archive, got {kind!r}")
    origin = raw.get("origin") or raw.get("manual") or ", ".join(s.origin_url() for s in sources)
    if raw.get("member_of") and not origin:
        origin = f"the {raw['member_of']} archive ({raw.get('member')})"
    if raw.get("derived_from") and not origin:
        origin = f"written from {raw['derived_from']}"
    return WeightFile(
        name=name,
        path=raw["path"],
        sha256=raw.get("sha256"),
        origin=origin,
        kind=kind,
        size=raw.get("size"),
        sources=sources,
        revision=raw.get("revision"),
        licence=raw.get("licence", ""),
        restricted=bool(raw.get("restricted", False)),
        jobs=tuple(raw.get("jobs") or ()),
        files=files,
        member_of=raw.get("member_of", ""),
        member=raw.get("member", ""),
        archive_file=raw.get("file", ""),
        manual=raw.get("manual", ""),
        derived_from=raw.get("derived_from", ""),
        derive=raw.get("derive", ""),
    )


def load_weight_specs(path: Path | None = None) -> dict[str, WeightFile]:
    """Every entry of the manifest (default configs/weights.yaml), by name."""
    data = yaml.safe_load(Path(path or WEIGHTS_YAML).read_text()) or {}
    specs = {name: _entry(name, raw) for name, raw in data.items()}
    for spec in specs.values():
        if spec.member_of and specs.get(spec.member_of, spec).kind != "archive":
            raise ValueError(f"{spec.name}: member_of {spec.member_of!r} is not an archive entry")
        if spec.derived_from and (spec.derived_from not in specs or not spec.derive):
            raise ValueError(f"{spec.name}: derived_from needs an entry name and `derive`")
    return specs


def members(specs: dict[str, WeightFile], archive: str) -> list[WeightFile]:
    return [spec for spec in specs.values() if spec.member_of == archive]


def select(specs: dict[str, WeightFile], wanted: Iterable[str] = ()) -> list[WeightFile]:
    """Entries for `--for` values: a job (build / train / eval), a stage name in `jobs`, or an entry
    name; nothing = everything. Archive members pull in their archive, archives all their members,
    derived entries what they are derived from."""
    wanted = list(wanted)
    if not wanted:
        chosen = set(specs)
    else:
        chosen = set()
        for word in wanted:
            hits = {name for name, spec in specs.items() if word == name or word in spec.jobs}
            if not hits:
                raise ValueError(
                    f"--for {word!r} matches no entry: use build, train, eval, a stage name or one of "
                    f"{', '.join(sorted(specs))}"
                )
            chosen |= hits
    for name in list(chosen):
        spec = specs[name]
        if spec.member_of:
            chosen.add(spec.member_of)
        if spec.derived_from:
            chosen.add(spec.derived_from)
        if spec.kind == "archive":
            chosen |= {member.name for member in members(specs, name)}
    return [specs[name] for name in sorted(chosen)]
