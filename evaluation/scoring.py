"""Scoring videos: an `Evaluator` loads each network once (a missing or unreadable weights file skips
that metric, with the reason kept for metrics.json), scores clips frame by frame, and summarises any
number of clips: each per-frame metric as a mean of per-video means (`psnr`) and pooled over frames
(`psnr_frames`); FID and FVD pool the features of every clip under a sampling protocol
(evaluation/distribution.py) and carry their sample count in their name below the protocol's N."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluation import backbones, expression, face_metrics, keypoints, pixel
from evaluation.distribution import (
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    Protocol,
    frechet_distance,
    i3d_features,
    inception_features,
    protocol_clip,
)
from evaluation.faces import FaceFrames, make_backend
from evaluation.frames import check_frames, pick_device, resize_frames
from evaluation.perceptual import lpips_distance

log = logging.getLogger(__name__)

RECONSTRUCTION = ("psnr", "ssim", "l1", "lpips")
FACE = ("csim", "id_leak", "akd", "akd_euclid_512", "apd", "aed", "apd_landmark", "aed_landmark", "gaze")
# aed / apd: MediaPipe coefficients (evaluation/expression.py); the _landmark pair: the face backend's.
EXPRESSION = ("aed", "apd")
SELF_ONLY = ("akd", "akd_euclid_512")  # keypoint distances need the ground truth: no key in cross reenactment
PER_PAIR = ("id_leak_base", "id_leak_norm")  # one value per (reference, driver) pair
DISTRIBUTION = ("fid", "fvd")
PER_FRAME = RECONSTRUCTION + FACE
METRICS = RECONSTRUCTION + FACE + PER_PAIR + DISTRIBUTION
LOAD_ERRORS = (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError)
# A driver whose identity is this close to the reference's leaves no gap to normalise by.
MIN_IDENTITY_GAP = 1e-3
UNITS = {
    "psnr": "dB", "ssim": "1", "l1": "1 (RGB in [0,1])", "lpips": "1", "csim": "cosine",
    "id_leak": "cosine", "id_leak_base": "cosine", "id_leak_norm": "1 (0: reference-driver level, 1: driver)",
    "akd": "px at 256² (mean |Δx|, |Δy|)", "akd_euclid_512": "px at 512² (Euclidean)", "gaze": "deg",
    "aed": "1 (mean |Δ| MediaPipe blendshape score)", "apd": "1 (mean |Δ| rotation-matrix entry, not deg)",
    "aed_landmark": "1 (residual / RMS radius)", "apd_landmark": "deg",
    "fid": "1", "fvd": "1",
}  # fmt: skip
# Which way is better: "↑" higher, "↓" lower; a baseline (id_leak_base) has no direction.
BETTER = {"psnr": "↑", "ssim": "↑", "csim": "↑", "id_leak_base": ""}
LOWER_IS_BETTER = "↓"


def direction(name: str) -> str:
    """↑ or ↓ for a metric name (psnr_frames and fvd_n<N> as their base metric), '' for a baseline."""
    return BETTER.get(_base_name(name), LOWER_IS_BETTER)


CSIM_CONVENTIONS = {
    "insightface": {
        "backbone": "w600k_r50 (insightface buffalo_l ArcFace, 512-D)",
        "crop": "5-point similarity alignment to 112x112 (ArcFace template, SCRFD landmarks)",
    },
    "dlib": {
        "backbone": "dlib_face_recognition_resnet_model_v1 (128-D)",
        "crop": "dlib face chip: 150x150 aligned on the 68-point shape, padding 0.25",
    },
}
AKD_EUCLID_LANDMARKS = {
    "insightface": "insightface 2d106det, 106 points",
    "dlib": "dlib 68-point shape predictor",
}


def frames_name(name: str) -> str:
    """The pooled-over-frames twin of a per-frame metric (its plain name is the mean of video means)."""
    return f"{name}_frames"


@dataclass
class ClipScores:
    clip: str
    frames: pd.DataFrame  # one row per frame, one column per per-frame metric
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)  # fid/fvd -> [pred, target]
    skipped: dict[str, str] = field(default_factory=dict)
    pair: dict[str, float] = field(default_factory=dict)  # per-pair metrics (PER_PAIR)
    too_short: bool = False  # shorter than the protocol's FVD clip: no FVD sample
    cross: bool = False  # no ground truth: no AKD


@dataclass
class Evaluator:
    weights_dir: str | Path | None
    backend: str = "insightface"
    device: str = "auto"
    protocol: str = DEFAULT_PROTOCOL
    _models: dict[str, Any] = field(default_factory=dict)
    _errors: dict[str, str] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.torch_device = pick_device(self.device)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}: expected one of {sorted(PROTOCOLS)}")
        self.rules: Protocol = PROTOCOLS[self.protocol]

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
        if name == "expression":
            landmarker = expression.load_landmarker(self.weights_dir)
            self.weights.update(landmarker.weights)
            return landmarker
        if self.weights_dir is None:
            raise FileNotFoundError(f"{name} reads its weights from WEIGHTS_DIR: pass --weights-dir")
        if name == "fan":
            fan = keypoints.load_fan(self.weights_dir, self.torch_device)
            self.weights[keypoints.FAN_2D] = fan.weights_id
            return fan
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
        and the motion of `driving` (default: target). Without a target it is cross reenactment: no
        AKD (the driver is another person, whose landmarks differ by face shape, not motion).

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
        too_short = False

        if target is None:
            for name in (*RECONSTRUCTION, *DISTRIBUTION):
                skipped[name] = "no ground-truth video (cross reenactment)"
        else:
            table["psnr"] = pixel.psnr(pred, target)
            table["psnr_identical"] = pixel.identical(pred, target)
            table["ssim"] = pixel.ssim(pred, target, self.torch_device)
            table["l1"] = pixel.l1(pred, target)
            if (lp := self.model("lpips")) is not None:
                table["lpips"] = lpips_distance(lp, pred, target, self.torch_device)
            if (inception := self.model("fid")) is not None:
                features["fid"] = [
                    inception_features(inception, v, self.torch_device) for v in (pred, target)
                ]
            i3d = self.model("fvd")  # loaded first: a missing file is the reason to report, not the length
            too_short = count < self.rules.fvd_frames
            if not too_short and i3d is not None:
                features["fvd"] = [
                    i3d_features(i3d, protocol_clip(v, self.rules), self.torch_device) for v in (pred, target)
                ]
        pair = self._score_faces(pred, reference, driving, table, skipped, cross=target is None)
        self._score_expression(pred, driving, table, skipped)
        frames = pd.DataFrame(table).assign(clip=clip)
        return ClipScores(clip, frames, features, skipped, pair, too_short, cross=target is None)

    def _score_faces(
        self,
        pred: np.ndarray,
        reference: np.ndarray | None,
        driving: np.ndarray | None,
        table: dict[str, np.ndarray],
        skipped: dict[str, str],
        cross: bool,
    ) -> dict[str, float]:
        """Fills the per-frame face metrics into table; returns the per-pair ones."""
        faces = self.model("faces")
        if faces is None:
            return {}
        analysed: FaceFrames = faces.analyse(pred)
        table["pred_face"] = analysed.found
        reference_identity = None
        if reference is not None:
            ref = faces.analyse(resize_frames(check_frames(reference, "reference")[:1], *pred.shape[1:3]))
            if ref.found[0]:
                reference_identity = ref.embeddings[0]
                table["csim"] = face_metrics.cosine_to(analysed.embeddings, reference_identity)
            else:
                skipped["csim"] = "no face found in the reference image"
        else:
            skipped["csim"] = "no reference image and no target to take it from"
        if driving is None:
            for name in ("id_leak", "akd", "apd_landmark", "aed_landmark", "gaze", *PER_PAIR):
                skipped[name] = "no driving or target video"
            return {}
        drive = faces.analyse(driving)
        table["driving_face"] = drive.found
        if not cross:  # the driver's landmarks in cross reenactment carry another face shape: no AKD
            self._score_keypoints(pred, driving, analysed, drive, table)
        table["apd_landmark"] = face_metrics.pose_distance(analysed.pose, drive.pose)
        table["aed_landmark"] = face_metrics.expression_distance(analysed.shape, drive.shape)
        driver_identity = face_metrics.identity_of(drive.embeddings)
        table["id_leak"] = face_metrics.cosine_to(analysed.embeddings, driver_identity)
        if (gaze := self.model("gaze")) is not None:
            table["gaze"] = face_metrics.gaze_angle(
                gaze.predict(pred, analysed.boxes), gaze.predict(driving, drive.boxes)
            )
        return self._leak_baseline(table["id_leak"], reference_identity, driver_identity, cross, skipped)

    def _score_expression(
        self,
        pred: np.ndarray,
        driving: np.ndarray | None,
        table: dict[str, np.ndarray],
        skipped: dict[str, str],
    ) -> None:
        """AED / APD from MediaPipe's blendshapes and transformation matrices, generated against driving."""
        if driving is None:
            skipped.update(dict.fromkeys(EXPRESSION, "no driving or target video"))
            return
        if (landmarker := self.model("expression")) is None:
            return
        ours, theirs = landmarker.analyse(pred), landmarker.analyse(driving)
        table["aed"] = expression.blendshape_distance(ours.blendshapes, theirs.blendshapes)
        table["apd"] = expression.rotation_distance(ours.transforms, theirs.transforms)

    def _score_keypoints(
        self,
        pred: np.ndarray,
        target: np.ndarray,
        analysed: FaceFrames,
        drive: FaceFrames,
        table: dict[str, np.ndarray],
    ) -> None:
        """akd: FOMM's convention (2D-FAN points at 256² on the face backend's boxes, mean |Δ| per
        coordinate); akd_euclid_512: ours (the backend's landmarks mapped to 512², Euclidean)."""
        height, width = pred.shape[1:3]
        at_512 = [
            keypoints.rescale_points(f.landmarks, height, width, keypoints.EUCLID_SIZE)
            for f in (analysed, drive)
        ]
        table["akd_euclid_512"] = face_metrics.keypoint_distance(*at_512)
        if (fan := self.model("fan")) is not None:
            both = (analysed.found & drive.found)[:, None]  # the FAN runs only where AKD has two faces
            table["akd"] = keypoints.fomm_akd(
                fan.points_at_256(pred, np.where(both, analysed.boxes, np.nan)),
                fan.points_at_256(target, np.where(both, drive.boxes, np.nan)),
            )

    @staticmethod
    def _leak_baseline(
        leak_frames: np.ndarray,
        reference: np.ndarray | None,
        driver: np.ndarray,
        cross: bool,
        skipped: dict[str, str],
    ) -> dict[str, float]:
        """id_leak_base: cosine(reference identity, driver identity), what a perfect cross reenactment
        already scores as leakage; id_leak_norm: (leak - base) / (1 - base), the share of the gap
        between the reference's and the driver's identity the generated face crossed."""
        if reference is None or not np.isfinite(driver).all():
            reason = "no face in the reference image" if reference is None else "no face in the driving video"
            skipped.update(dict.fromkeys(PER_PAIR, reason))
            return {}
        base = float(face_metrics.cosine_to(reference[None], driver)[0])
        leak, used = face_metrics.summarise(leak_frames.astype(np.float64))
        pair = {"id_leak_base": base}
        if not cross:
            skipped["id_leak_norm"] = "self reenactment: reference and driver are the same person"
        elif not used:
            skipped["id_leak_norm"] = "no generated frame with a face"
        elif 1.0 - base < MIN_IDENTITY_GAP:
            skipped["id_leak_norm"] = f"reference and driver identities coincide (cosine {base:.4f})"
        else:
            pair["id_leak_norm"] = (leak - base) / (1.0 - base)
        return pair

    def summarise(self, clips: list[ClipScores]) -> dict[str, Any]:
        """metrics.json's content: one number (or null) per metric, how many samples it averages (videos
        for the plain name, frames for `_frames`, pairs, FID/FVD samples), why a metric is missing, the
        units, the distribution protocol, the backend and the weights ids."""
        frames = pd.concat([c.frames for c in clips], ignore_index=True)
        metrics: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        skipped: dict[str, str] = {}
        distribution: dict[str, dict[str, Any]] = {}
        identical = int(frames["psnr_identical"].sum()) if "psnr_identical" in frames else 0
        if identical:  # infinite PSNR: counted, kept out of the means
            frames.loc[frames["psnr_identical"].astype(bool), "psnr"] = np.nan
        all_cross = all(c.cross for c in clips)
        for name in METRICS:
            if all_cross and name in SELF_ONLY:
                continue
            reason = next((c.skipped[name] for c in clips if name in c.skipped), "")
            if name in DISTRIBUTION:
                reported, info, reason = self._distribution(name, clips, reason)
                if info:
                    distribution[name] = info
                if reported is not None:
                    metrics[reported[0]], counts[reported[0]] = reported[1], info["n"]
                    continue
            elif name in PER_PAIR:
                values = np.array([c.pair[name] for c in clips if name in c.pair], np.float64)
                value, used = face_metrics.summarise(values)
                if used:
                    metrics[name], counts[name] = value, used
                    continue
            elif name in frames:
                if self._per_frame(name, frames, metrics, counts):
                    continue
                if name == "psnr" and identical:
                    reason = f"every frame is identical to the target (infinite PSNR): {identical} frames"
                reason = reason or "no frame where both videos have a face"
            metrics[name] = None
            skipped[name] = reason or self._reason_for(name) or "not computed"
        return {
            "metrics": metrics,
            "samples": counts,
            "skipped": skipped,
            "units": {name: UNITS[_base_name(name)] for name in metrics},
            "conventions": self._conventions(metrics),
            "psnr_identical_frames": identical,
            "distribution": distribution,
            "backend": self.backend,
            "weights": dict(sorted(self.weights.items())),
            "clips": len(clips),
            "frames": int(len(frames)),
            "device": str(self.torch_device),
        }

    @staticmethod
    def _per_frame(
        name: str, frames: pd.DataFrame, metrics: dict[str, float | None], counts: dict[str, int]
    ) -> bool:
        """`name`: the mean of per-video means; `name_frames`: the mean over every frame. False: no value."""
        pooled, used = face_metrics.summarise(frames[name].to_numpy(np.float64))
        if not used:
            return False
        per_video = frames.groupby("clip", sort=False)[name].mean().to_numpy(np.float64)
        metrics[name], counts[name] = face_metrics.summarise(per_video)
        metrics[frames_name(name)], counts[frames_name(name)] = pooled, used
        return True

    def _distribution(
        self, name: str, clips: list[ClipScores], reason: str
    ) -> tuple[tuple[str, float] | None, dict[str, Any], str]:
        """((reported name, value) or None, the protocol facts for metrics.json, the reason if None).
        The first protocol-N samples are used; with fewer the name carries N (fvd_n<N>)."""
        pairs = [c.features[name] for c in clips if name in c.features]
        short = sum(c.too_short for c in clips) if name == "fvd" else 0
        needed = self.rules.fvd_videos if name == "fvd" else self.rules.fid_frames
        info: dict[str, Any] = {"protocol": self.rules.name, "protocol_n": needed}
        if name == "fvd":
            info |= {"clip_frames": self.rules.fvd_frames, "short_videos_skipped": short}
            if short and not pairs:
                reason = self.reason("fvd") or (
                    f"all {short} videos are shorter than the protocol's {self.rules.fvd_frames}-frame clip"
                )
        if not pairs:
            return None, info if short else {}, reason
        pred = np.concatenate([p[0] for p in pairs])[:needed]
        target = np.concatenate([p[1] for p in pairs])[:needed]
        info["n"] = len(pred)
        try:
            value = frechet_distance(pred, target, ddof=self.rules.ddof)
        except ValueError as exc:
            return None, info, str(exc)
        reported = name if len(pred) >= needed else f"{name}_n{len(pred)}"
        info["reported_as"] = reported
        if reported != name:
            log.warning(
                "%s from %d samples, below the %s protocol's %d: reported as %s, not comparable to published %s",
                name, len(pred), self.rules.name, needed, reported, name,
            )  # fmt: skip
        return (reported, value), info, ""

    def _conventions(self, metrics: dict[str, float | None]) -> dict[str, dict[str, str]]:
        """What the identity and keypoint metrics were computed with: published CSIM tables use several
        backbones and crops, AKD two conventions; numbers compare only under the same one."""
        known = {
            "csim": CSIM_CONVENTIONS.get(self.backend, {}),
            "akd": {
                "source": "FOMM (AliaksandrSiarohin/pose-evaluation)",
                "landmarks": "face-alignment 2D-FAN (2DFAN4), 68 points, no flip",
                "boxes": f"{self.backend} face detector",
                "resolution": "256x256",
                "distance": "mean absolute error per coordinate",
            },
            "akd_euclid_512": {
                "source": "ours",
                "landmarks": AKD_EUCLID_LANDMARKS.get(self.backend, ""),
                "resolution": "512x512",
                "distance": "Euclidean per point",
            },
        }
        return {name: info for name, info in known.items() if name in metrics and info}

    def _reason_for(self, name: str) -> str:
        name = _base_name(name)
        if name in EXPRESSION:  # MediaPipe's, whatever the face backend
            return self.reason("expression")
        source = {"lpips": "lpips", "fid": "fid", "fvd": "fvd", "gaze": "gaze", "akd": "fan"}.get(
            name, "faces"
        )
        return self.reason(source) or self.reason("faces")


def _base_name(name: str) -> str:
    """psnr_frames -> psnr, fvd_n12 -> fvd."""
    if name.endswith("_frames"):
        return name[: -len("_frames")]
    head, _, tail = name.rpartition("_n")
    return head if head in DISTRIBUTION and tail.isdigit() else name
