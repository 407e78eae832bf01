"""Real test media for the metric tests, fetched once at setup time (never while tests run):
the face_recognition 1.3.0 source distribution's test photos (two people: Obama, Biden) from PyPI,
unpacked into the cache. `python -m evaluation.assets` (run by `make setup`) is idempotent."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

CACHE = Path(os.environ.get("MEGACTOR_CACHE", Path.home() / ".cache" / "megactor")) / "eval_assets"
FACE_RECOGNITION = "face_recognition==1.3.0"
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")
PHOTO_DIR = CACHE / "face_recognition_test_images"


def photos_present(folder: Path = PHOTO_DIR) -> bool:
    return all((folder / name).is_file() for name in PHOTOS)


def fetch_photos(folder: Path = PHOTO_DIR) -> Path:
    """Download the sdist with pip (the package registry's own client) and keep its test photos."""
    if photos_present(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eval-assets-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", FACE_RECOGNITION, "--no-deps", "--no-binary", ":all:",
             "-q", "-d", tmp],
            check=True,
        )  # fmt: skip
        archive = next(Path(tmp).glob("face_recognition-*.tar.gz"))
        staging = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if "/tests/test_images/" in member.name and name in PHOTOS and member.isfile():
                    data = tar.extractfile(member)
                    if data is None:
                        raise RuntimeError(f"{archive.name}: cannot read {member.name}")
                    (staging / name).write_bytes(data.read())
        if not photos_present(staging):
            raise RuntimeError(f"{archive.name} lacks some of {PHOTOS}")
        if folder.exists():  # another process finished first
            for path in staging.iterdir():
                path.unlink()
            staging.rmdir()
        else:
            os.replace(staging, folder)
    return folder


if __name__ == "__main__":
    print(fetch_photos())
