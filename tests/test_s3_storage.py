"""pipeline/storage.py on local folders and on a real S3 API server (moto, 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from s3_helpers import aws_environment, moto_server, object_keys, s3_client

from pipeline import storage
from pipeline.writer import committed_keys, read_stats, remove_uncommitted

BUCKET = "storage-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with moto_server() as endpoint, aws_environment(endpoint):
        s3_client().create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"


def test_join_and_parent_keep_uri_slashes() -> None:
    assert storage.join("s3://b/p/", "shards", "x.tar") == "s3://b/p/shards/x.tar"
    assert storage.parent_of("s3://b/p/shards/x.tar") == "s3://b/p/shards"
    assert storage.name_of("s3://b/p/shards/x.tar") == "x.tar"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b" and not storage.is_remote("/tmp/a")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_put_list_read_delete(where: str, s3: str, tmp_path: Path) -> None:
    base = str(tmp_path) if where == "local" else f"{s3}/plrd"
    storage.makedirs(base)
    storage.put_bytes(storage.join(base, "a.json"), b"{}")
    storage.put_parquet(storage.join(base, "t.parquet"), pd.DataFrame({"k": ["x", "y"]}))
    assert storage.list_names(base) == ["a.json", "t.parquet"]  # no temp file left beside them
    assert list(storage.read_parquet(storage.join(base, "t.parquet"))["k"]) == ["x", "y"]
    assert storage.is_file(storage.join(base, "a.json")) and not storage.exists(storage.join(base, "b"))
    storage.delete(storage.join(base, "a.json"))
    storage.delete(storage.join(base, "a.json"))  # absent is fine
    assert storage.list_names(base) == ["t.parquet"]
    assert storage.list_names(storage.join(base, "missing")) == []


class BreaksMidway:
    """A source whose read fails after the first chunk (a disk error while uploading)."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self, size: int) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise OSError("disk went away")
        return b"x" * 1024


def test_a_failed_upload_leaves_no_object(s3: str) -> None:
    with pytest.raises(OSError, match="disk went away"):
        storage._upload(BreaksMidway(), f"{s3}/failed/part.tar")  # type: ignore[arg-type]
    assert object_keys(BUCKET, "failed/part.tar") == []


def test_readers_skip_objects_without_a_marker_and_cleanup_removes_them(s3: str) -> None:
    shards = f"{s3}/markers/shards"
    storage.put_bytes(f"{shards}/shard-aaaaaaaaaaaaaaaa.tar", b"tar")
    storage.put_bytes(
        f"{shards}/shard-aaaaaaaaaaaaaaaa.stats.json",
        b'{"shard": "shard-aaaaaaaaaaaaaaaa.tar", "keys": ["a"]}',
    )
    storage.put_bytes(f"{shards}/shard-bbbbbbbbbbbbbbbb.tar", b"no marker")
    assert committed_keys(shards) == {"a"} and len(read_stats(shards)) == 1
    assert remove_uncommitted(shards) == ["shard-bbbbbbbbbbbbbbbb.tar"]
    assert storage.list_names(shards) == ["shard-aaaaaaaaaaaaaaaa.stats.json", "shard-aaaaaaaaaaaaaaaa.tar"]
