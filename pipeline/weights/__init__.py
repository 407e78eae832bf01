"""Model weights. configs/weights.yaml is read by `manifest`; `fetch` downloads and verifies (with
`licences` gating restricted files and `derive` writing folders the loaders need from downloaded ones);
`check` verifies size and sha256 with a hash cache and trust-on-first-use pins; `tiny` writes the tiny
profile's random-weight files. The names below are what stage modules, the build and tests import."""

from pipeline.weights.check import (
    STATE_DIR,
    HashCache,
    MissingWeights,
    Pins,
    check_weights,
    file_id,
    job_names,
    pin_weights,
    require_weights,
    sha256_file,
    unpinned,
    verify_files,
    verify_job,
)
from pipeline.weights.manifest import WEIGHTS_YAML, FileSpec, WeightFile, load_weight_specs
from pipeline.weights.tiny import (
    DEFAULT_TINY_DIR,
    PROFILES,
    TINY_WRITERS,
    TinyWriter,
    ensure_tiny_weights,
    register_tiny_writer,
    resolve_weights_dir,
)

__all__ = [
    "DEFAULT_TINY_DIR",
    "PROFILES",
    "STATE_DIR",
    "TINY_WRITERS",
    "WEIGHTS_YAML",
    "FileSpec",
    "HashCache",
    "MissingWeights",
    "Pins",
    "TinyWriter",
    "WeightFile",
    "check_weights",
    "ensure_tiny_weights",
    "file_id",
    "job_names",
    "load_weight_specs",
    "pin_weights",
    "register_tiny_writer",
    "require_weights",
    "resolve_weights_dir",
    "sha256_file",
    "unpinned",
    "verify_files",
    "verify_job",
]
