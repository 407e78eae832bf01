"""Scoring videos: an `Evaluator` loads each network once (a missing or unreadable weights file skips
that metric, with the reason kept for metrics.json), scores clips frame by frame, and summarises any
number of clips into one number per metric (FID and FVD pool the features of every clip)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluation import backbones, face_metrics, pixel
from evaluation.distribution import frechet_distance, i3d_features, inception_features, video_clips
from evaluation.faces import FaceFrames, make_backend
from evaluation.frames import check_frames, pick_device, resize_frames
from evaluation.perceptual import lpips_distance

log = logging.getLogger(__name__)

RECONSTRUCTION = ("psnr", "ssim", "l1", "lpips")
FACE = ("csim", "id_leak", "akd", "apd", "aed", "gaze")
DISTRIBUTION = ("fid", "fvd")
METRICS = RECONSTRUCTION + FACE + DISTRIBUTION
LOAD_ERRORS = (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError)


@dataclass
class ClipScores:
    clip: str
    frames: pd.DataFrame  # one row per frame, one column per per-frame metric
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)  # fid/fvd -> [pred, target]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Evaluator:
    weights_dir: str | Path | None
    backend: str = "insightface"
    device: str = "auto"
    _models: dict[str, Any] = field(default_factory=dict)
    _errors: dict[str, str] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.torch_device = pick_device(self.device)

    def model(self, name: str) -> Any | None:
        """The named network, loaded once; None (and the reason kept) when it cannot load."""
        if name in self._models:
            return self._models[name]
        if name in self._errors:
            return None
        try:
            self._models[name] = self._load(name)
        except LOAD_ERRORS as exc:
            self._errors[name] = f"{type(exc).__name__}: {exc}"
            log.warning("%s skipped: %s", name, self._errors[name])
            self._models[name] = None
        return self._models[name]

    def reason(self, name: str) -> str:
        return self._errors.get(name, "")

    def _load(self, name: str) -> Any:
        if name == "faces":
            face_backend = make_backend(self.backend, self.weights_dir, self.device)
            self.weights.update(face_backend.weights)
            return face_backend
        if self.weights_dir is None:
            raise FileNotFoundError(f"{name} reads its weights from WEIGHTS_DIR: pass --weights-dir")
        if name == "gaze":
            from evaluation.gaze import GazeEstimator
            from pipeline.stages.l2cs import WEIGHTS_NAME

            estimator = GazeEstimator(
                backbones.weights_path(self.weights_dir, WEIGHTS_NAME), self.torch_device
            )
            self.weights.update(estimator.weights)
            return estimator
        entry, loader = {
            "lpips": (backbones.LPIPS_ALEXNET, backbones.load_lpips),
            "fid": (backbones.FID_INCEPTION, backbones.load_inception),
            "fvd": (backbones.FVD_I3D, backbones.load_i3d),
        }[name]
        path = backbones.weights_path(self.weights_dir, entry)
        model = loader(path, self.torch_device)
        self.weights[entry] = backbones.weights_tag(path)
        return model

    def score_clip(
        self,
        pred: np.ndarray,
        target: np.ndarray | None = None,
        reference: np.ndarray | None = None,
        driving: np.ndarray | None = None,
        clip: str = "clip",
    ) -> ClipScores:
        """Per-frame metrics of `pred` against the ground truth `target` (self-reenactment; None in cross
        reenactment), the identity of `reference` (an image [1,H,W,3]; default: target's first frame)
        and the motion of `driving` (default: target).

        Everything is scored at pred's resolution; the videos are cut to the shortest one."""
        check_frames(pred, "pred")
        height, width = pred.shape[1:3]
        videos = {"target": target, "driving": driving}
        count = min(len(v) for v in [pred, *[v for v in videos.values() if v is not None]])
        pred = pred[:count]
        target, driving = (
            None if v is None else resize_frames(check_frames(v, k)[:count], height, width)
            for k, v in videos.items()
        )
        if reference is None and target is not None:
            reference = target[:1]
        if driving is None:
            driving = target
        table: dict[str, np.ndarray] = {"frame": np.arange(count)}
        skipped: dict[str, str] = {}
        features: dict[str, list[np.ndarray]] = {}

        if target is None:
            for name in (*RECONSTRUCTION, *DISTRIBUTION):
                skipped[name] = "no ground-truth video (cross reenactment)"
        else:
            table["psnr"] = pixel.psnr(pred, target)
            table["ssim"] = pixel.ssim(pred, target, self.torch_device)
            table["l1"] = pixel.l1(pred, target)
            if (lp := self.model("lpips")) is not None:
                table["lpips"] = lpips_distance(lp, pred, target, self.torch_device)
            if (inception := self.model("fid")) is not None:
                features["fid"] = [
                    inception_features(inception, v, self.torch_device) for v in (pred, target)
                ]
            if (i3d := self.model("fvd")) is not None:
                features["fvd"] = [
                    i3d_features(i3d, video_clips(v), self.torch_device) for v in (pred, target)
                ]
        self._score_faces(pred, reference, driving, table, skipped)
        return ClipScores(clip, pd.DataFrame(table).assign(clip=clip), features, skipped)

    def _score_faces(
        self,
        pred: np.ndarray,
        reference: np.ndarray | None,
        driving: np.ndarray | None,
        table: dict[str, np.ndarray],
        skipped: dict[str, str],
    ) -> None:
        faces = self.model("faces")
        if faces is None:
            return
        analysed: FaceFrames = faces.analyse(pred)
        table["pred_face"] = analysed.found
        if reference is not None:
            ref = faces.analyse(resize_frames(check_frames(reference, "reference")[:1], *pred.shape[1:3]))
            if ref.found[0]:
                table["csim"] = face_metrics.cosine_to(analysed.embeddings, ref.embeddings[0])
            else:
                skipped["csim"] = "no face found in the reference image"
        else:
            skipped["csim"] = "no reference image and no target to take it from"
        if driving is None:
            for name in ("id_leak", "akd", "apd", "aed", "gaze"):
                skipped[name] = "no driving or target video"
            return
        drive = faces.analyse(driving)
        table["driving_face"] = drive.found
        table["akd"] = face_metrics.keypoint_distance(analysed.landmarks, drive.landmarks)
        table["apd"] = face_metrics.pose_distance(analysed.pose, drive.pose)
        table["aed"] = face_metrics.expression_distance(analysed.shape, drive.shape)
        table["id_leak"] = face_metrics.cosine_to(
            analysed.embeddings, face_metrics.identity_of(drive.embeddings)
        )
        if (gaze := self.model("gaze")) is not None:
            table["gaze"] = face_metrics.gaze_angle(
                gaze.predict(pred, analysed.boxes), gaze.predict(driving, drive.boxes)
            )

    def summarise(self, clips: list[ClipScores]) -> dict[str, Any]:
        """metrics.json's content: one number (or null) per metric, how many frames / samples it averages,
        why a metric is missing, the backend and the weights ids."""
        frames = pd.concat([c.frames for c in clips], ignore_index=True)
        metrics: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        skipped: dict[str, str] = {}
        for name in METRICS:
            reason = next((c.skipped[name] for c in clips if name in c.skipped), "")
            if name in DISTRIBUTION:
                pairs = [c.features[name] for c in clips if name in c.features]
                if pairs:
                    pred = np.concatenate([p[0] for p in pairs])
                    target = np.concatenate([p[1] for p in pairs])
                    try:
                        metrics[name] = frechet_distance(pred, target)
                        counts[name] = len(pred)
                    except ValueError as exc:
                        reason = str(exc)
            elif name in frames:
                value, used = face_metrics.summarise(frames[name].to_numpy(np.float64))
                if used:
                    metrics[name], counts[name] = value, used
                else:
                    reason = reason or "no frame where both videos have a face"
            if name not in metrics:
                metrics[name] = None
                skipped[name] = reason or self._reason_for(name) or "not computed"
        return {
            "metrics": metrics,
            "samples": counts,
            "skipped": skipped,
            "backend": self.backend,
            "weights": dict(sorted(self.weights.items())),
            "clips": len(clips),
            "frames": int(len(frames)),
            "device": str(self.torch_device),
        }

    def _reason_for(self, name: str) -> str:
        source = {"lpips": "lpips", "fid": "fid", "fvd": "fvd", "gaze": "gaze"}.get(name, "faces")
        return self.reason(source) or self.reason("faces")
