"""Weights folders written from downloaded ones, for loaders that need another layout than the origin's.

The trainer reads `image_encoder/` as a CLIPVisionModelWithProjection folder, while the origin publishes
the full CLIP checkpoint whose vision config does not carry the projection width: the tower is loaded with
the top-level `projection_dim` and saved once (docs/model.md). The result is pinned trust-on-first-use.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

Deriver = Callable[[Path, Path], None]  # (source folder, destination folder)


def clip_vision_with_projection(source: Path, dest: Path) -> None:
    """CLIP's vision tower and visual projection, from the full CLIPModel checkpoint in `source`."""
    from transformers import CLIPVisionModelWithProjection

    projection_dim = json.loads((source / "config.json").read_text())["projection_dim"]
    model = CLIPVisionModelWithProjection.from_pretrained(
        source, projection_dim=projection_dim, local_files_only=True, use_safetensors=True
    )
    model.save_pretrained(dest)


DERIVERS: dict[str, Deriver] = {"clip_vision_with_projection": clip_vision_with_projection}


def derive_folder(how: str, source: Path, dest: Path, expected: list[str]) -> None:
    """Write `dest` with deriver `how` under a temp name; rename it into place once every expected
    file is there (a half-written folder is never visible)."""
    if how not in DERIVERS:
        raise ValueError(f"unknown derive {how!r}; known: {sorted(DERIVERS)}")
    tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")
    try:
        DERIVERS[how](source, tmp)
        missing = [rel for rel in expected if not (tmp / rel).is_file()]
        if missing:
            raise RuntimeError(f"{how} wrote no {', '.join(missing)} into {dest}")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
