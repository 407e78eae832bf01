"""Where evaluation reads and writes: local folders or object-store URIs (s3://..., any pyarrow
filesystem), through pipeline/storage.py like the build and the trainer.

Scoring needs local files (video encoders, parquet writers, the model loader), so a remote checkpoint is
downloaded into a temporary folder first and a remote --out is written locally, then uploaded object by
object (each one whole or not at all), metrics.json last: its presence says the results are complete.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline import storage

COMPLETE_MARKER = "metrics.json"


@contextlib.contextmanager
def local_output(out: str) -> Iterator[Path]:
    """A local folder to write the results into; uploaded to `out` when the block ends without error."""
    if not storage.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="eval-out-") as staging:
        yield Path(staging)
        marker = Path(staging) / COMPLETE_MARKER
        held_back = marker.read_bytes() if marker.is_file() else None
        marker.unlink(missing_ok=True)
        storage.upload_tree(staging, out)
        if held_back is not None:
            storage.put_bytes(storage.join(out, COMPLETE_MARKER), held_back)


@contextlib.contextmanager
def local_checkpoint(checkpoint: str) -> Iterator[Path]:
    """The checkpoint as a local folder: a run name / run / checkpoint URI is resolved to its latest
    MegActor folder (as stage 2's model.init_from is) and downloaded for the block."""
    if not storage.is_remote(checkpoint):
        yield Path(checkpoint)
        return
    from train.ray_train import remote_init_checkpoint

    source = remote_init_checkpoint(checkpoint, "")
    with tempfile.TemporaryDirectory(prefix="eval-ckpt-") as local:
        yield storage.download_tree(source, local)
