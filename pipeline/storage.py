"""The one filesystem layer: local paths and URIs (s3://bucket/prefix, any pyarrow filesystem) alike.

Locations are strings: a local path, or a URI that pyarrow.fs.FileSystem.from_uri understands. Remote
filesystems are configured only from the standard environment (for S3: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION / AWS_REGION), nothing project-specific.

`put_bytes` / `put_file` / `put_parquet` are atomic: locally a temp file beside the target, fsynced and
renamed over it; on an object store one PUT (one multipart upload for big files), so the object appears
whole when the upload completes and never before. S3 has no rename, so a set of objects (a shard and its
index part) cannot be published at once: writers publish a small marker object last (pipeline/writer.py).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import pandas as pd
import pyarrow.fs as pafs

COPY_CHUNK = 8 * 2**20  # upload and copy granularity


def is_remote(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for paths and URIs alike (pathlib would fold the `//` of a URI)."""
    if not is_remote(base):
        return str(Path(base).joinpath(*parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def name_of(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent_of(location: str) -> str:
    if not is_remote(location):
        return str(Path(location).parent)
    return str(location).rstrip("/").rsplit("/", 1)[0]


_filesystems: dict[str, pafs.FileSystem] = {}


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a location; one filesystem object per scheme and bucket
    per process (creating an S3 client is not free)."""
    location = str(location)
    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(location.removeprefix("file://")).expanduser().absolute())
    scheme, rest = location.split("://", 1)
    bucket = rest.split("/", 1)[0]
    key = f"{scheme}://{bucket}"
    if key not in _filesystems:
        _filesystems[key] = pafs.FileSystem.from_uri(location)[0]
    return _filesystems[key], rest.rstrip("/")


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def list_names(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the files directly in `folder` ([] when it does not exist)."""
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)


def list_dirs(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the folders (common prefixes) directly in `folder`."""
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def download_tree(location: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy every file under `location` into the local folder `local` (same relative names)."""
    fs, path = filesystem(location)
    root = Path(local)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            target = root / info.path[len(path) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as stream, open(target, "wb") as handle:
                while chunk := stream.read(COPY_CHUNK):
                    handle.write(chunk)
    return root


def makedirs(folder: str | os.PathLike) -> None:
    """A local folder; nothing on an object store (prefixes need no creating)."""
    if not is_remote(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def read_parquet(location: str | os.PathLike) -> pd.DataFrame:
    fs, path = filesystem(location)
    return pd.read_parquet(path, filesystem=fs)


def open_input(location: str | os.PathLike, seekable: bool = False) -> IO[bytes]:
    """A binary file object to read: a forward-only stream (tar streaming), or seekable (random access)."""
    fs, path = filesystem(location)
    return fs.open_input_file(path) if seekable else fs.open_input_stream(path)


def put_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `location` atomically."""
    if not is_remote(location):
        path = Path(location)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    _upload(io.BytesIO(data), location)


def put_file(local: str | os.PathLike, location: str | os.PathLike) -> None:
    """Publish the finished local file `local` at `location` atomically (a rename locally, a streamed
    upload remotely; the local file stays)."""
    if not is_remote(location):
        target = Path(location)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copyfile(local, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with open(local, "rb") as source:
        _upload(source, location)


def _upload(source: IO[bytes], location: str | os.PathLike) -> None:
    """Stream `source` to one object. pyarrow completes the upload on close, so a failed read deletes
    whatever was completed; a killed process never completes it (nothing becomes visible)."""
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as stream:
            while chunk := source.read(COPY_CHUNK):
                stream.write(chunk)
    except BaseException:
        delete(location)
        raise


def put_parquet(location: str | os.PathLike, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    put_bytes(location, buffer.getvalue())


@contextmanager
def staged_file(location: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A local temp file to write; on a clean exit it is published at `location` (put_file) and removed.
    Locally it sits beside the target, so publishing is a rename."""
    if is_remote(location):
        handle, name = tempfile.mkstemp(prefix="storage-", suffix=suffix)
        os.close(handle)
        tmp = Path(name)
    else:
        target = Path(location)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if is_remote(location):
            put_file(tmp, location)
        else:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, location)
    finally:
        tmp.unlink(missing_ok=True)


def delete(location: str | os.PathLike) -> None:
    """Delete one file or object; absent is fine."""
    fs, path = filesystem(location)
    with suppress(FileNotFoundError):
        fs.delete_file(path)


def delete_tree(folder: str | os.PathLike) -> None:
    """Delete a folder / prefix and everything under it; absent is fine."""
    fs, path = filesystem(folder)
    if fs.get_file_info(path).type == pafs.FileType.NotFound and not list_names(folder):
        return
    with suppress(FileNotFoundError):
        fs.delete_dir(path)


def upload_tree(local: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy the files under the local folder `local` to `location` (same relative names), each atomically."""
    root = Path(local)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        target = join(location, *path.relative_to(root).parts)
        makedirs(parent_of(target))
        put_file(path, target)
