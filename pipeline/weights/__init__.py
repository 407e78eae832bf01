"""Model weights: configs/weights.yaml (manifest), downloading them (fetch), verifying them (check), and
the `tiny` profile's random-weight files (tiny). The names below are the package's public interface;
stage modules and tests import them from `pipeline.weights`."""

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
