"""Every network evaluation reads, written with random weights in its real on-disk format (the project's
`tiny` profile): the demo and the tests score with the same loaders as real weights, no download."""

from __future__ import annotations

from pathlib import Path

# configs/weights.yaml names: buffalo_l's detector, ArcFace and landmark graphs, the three metric backbones,
# face-alignment's FAN (AKD) and L2CS.
EVAL_WEIGHTS = (
    "scrfd_10g", "arcface_r50", "landmark_2d106", "landmark_1k3d68",
    "lpips_alexnet", "fid_inception", "fvd_i3d", "fan_2dfan4", "l2cs_gaze360",
)  # fmt: skip


def write_tiny_eval_weights(weights_dir: Path, seed: int = 0, names: tuple[str, ...] = EVAL_WEIGHTS) -> Path:
    import evaluation.backbones  # noqa: F401 - registers the metric backbones' tiny writers
    import evaluation.insightface_tiny  # noqa: F401 - and the landmark graphs'
    import evaluation.keypoints  # noqa: F401 - the FAN
    import pipeline.stages.face_swap  # noqa: F401 - SCRFD and ArcFace
    import pipeline.stages.l2cs  # noqa: F401
    from pipeline.weights import ensure_tiny_weights

    return ensure_tiny_weights(weights_dir, names, seed)
