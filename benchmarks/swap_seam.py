"""Face-swap paste-back seam: insightface's square mask against the face-parsing mask, same frames, JSON.

    python benchmarks/swap_seam.py                       # tiny profile, CPU, 4 demo clips at 256²

The face mask is the demo face's oval (inscribed in the dataset box), standing in for the parsing
mask of the face_mask stage (whose tiny weights are random). Figures (see `seam_energy`):
  seam_energy           added squared gradient outside the face's core (lower = less seam)
  changed_outside_face  share of the pixels outside the face oval that the swap changed by > 2 levels
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from swap_helpers import decoded_row, make_manifest  # noqa: E402

from pipeline.identity_bank import build_identity_bank  # noqa: E402
from pipeline.stages.face_swap import ARCFACE, INSWAPPER, SCRFD, FaceSwapStage, seam_energy  # noqa: E402
from pipeline.weights import ensure_tiny_weights  # noqa: E402


def oval_masks(row: dict) -> np.ndarray:
    masks = np.zeros(row["frames"].shape[:3], np.uint8)
    for t, (x0, y0, x1, y1) in enumerate(np.asarray(json.loads(row["face_boxes"]))):
        centre = (round((x0 + x1) / 2), round((y0 + y1) / 2))
        cv2.ellipse(masks[t], centre, (round((x1 - x0) / 2), round((y1 - y0) / 2)), 0, 0, 360, 1, -1)
    return masks.astype(bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--feathers", default="0.03,0.05,0.08")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="swap_seam_"))
    weights = ensure_tiny_weights(work / "weights", [SCRFD, ARCFACE, INSWAPPER])
    clips = [dict(clip_id=f"s{i}", identity=i, num_frames=args.frames) for i in range(args.clips)]
    manifest = make_manifest(work / "clips", clips)
    bank = work / "identities.parquet"
    build_identity_bank(manifest, args.resolution, 1.8, weights, bank, device="cpu")
    rows = [decoded_row(r, "swap", args.resolution) for r in manifest.to_dict("records")]
    feathers = [float(f) for f in args.feathers.split(",")]
    results: dict[str, dict[str, float]] = {}
    for method in ["insightface_square", *[f"face_mask_feather_{f}" for f in feathers]]:
        feather = 0.05 if method == "insightface_square" else float(method.rsplit("_", 1)[1])
        stage = FaceSwapStage(str(weights), str(bank), blend_feather=feather, device="cpu")
        seams, outside = [], []
        for row in rows:
            masks = oval_masks(row)
            inner = int(np.ceil(3 * 0.08 * np.sqrt(masks[0].sum()))) + 1  # widest feather's reach
            given = dict(row, face_mask=masks) if method != "insightface_square" else dict(row)
            out = stage.process(given)["driving_frames"]
            seams.append(seam_energy(out, row["frames"], masks, inner))
            changed = np.abs(out.astype(int) - row["frames"]).max(-1) > 2
            outside.append(float(changed[~masks].mean()))
        results[method] = {
            "seam_energy": round(float(np.mean(seams)), 1),
            "changed_outside_face": round(float(np.mean(outside)), 3),
        }
    print(
        json.dumps(
            {
                "benchmark": "swap_seam",
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                "profile": "tiny",
                "resolution": args.resolution,
                "clips": args.clips,
                "frames_per_clip": args.frames,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
