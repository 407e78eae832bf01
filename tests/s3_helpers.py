"""A real S3 API server for the tests: moto's server mode in a process of its own on 127.0.0.1.

A subprocess (not moto's in-process ThreadedMotoServer) so the build's and trainer's Ray workers, and a
driver the tests SIGKILL, reach the same server for the whole module. The AWS environment is the
standard one (AWS_ENDPOINT_URL, keys, region), set for the test process and inherited by its children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3

MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))
PORTS = range(5430, 5440)  # this project's S3 test ports


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1} for the S3 server")


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probing for credentials
    }


@contextlib.contextmanager
def moto_server(timeout: float = 60) -> Iterator[str]:
    """Start `moto_server` on a free port of PORTS; yields its endpoint URL; stops its process group."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        client = boto3.client("s3", **_client_args(endpoint))
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not come up on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _client_args(endpoint: str) -> dict[str, str]:
    env = aws_env(endpoint)
    return {
        "endpoint_url": endpoint,
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@contextlib.contextmanager
def aws_environment(endpoint: str) -> Iterator[None]:
    """The AWS environment of `endpoint` in os.environ for the block (children inherit it), restored after;
    pipeline.storage's per-process filesystems are dropped so they pick it up."""
    from pipeline import storage

    saved = {name: os.environ.get(name) for name in aws_env(endpoint)}
    os.environ.update(aws_env(endpoint))
    storage._filesystems.clear()
    try:
        yield
    finally:
        storage._filesystems.clear()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3_client():
    """A boto3 client of the current AWS environment (for checks independent of pipeline.storage)."""
    return boto3.client("s3", **_client_args(os.environ["AWS_ENDPOINT_URL"]))


def object_keys(bucket: str, prefix: str) -> list[str]:
    """Every object key under `prefix` (paginated)."""
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
