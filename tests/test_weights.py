from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline import weights as w


def test_check_lists_every_missing_file_in_one_error(tmp_path: Path) -> None:
    specs = w.load_weight_specs()
    assert {"parsenet", "l2cs_gaze360", "inswapper_128", "sdxl_turbo"} <= set(specs)
    with pytest.raises(w.MissingWeights) as info:
        w.require_weights(tmp_path, ["parsenet", "l2cs_gaze360"])
    message = str(info.value)
    assert "2 weights file(s)" in message
    assert (
        str(tmp_path / specs["parsenet"].path) in message
        and str(tmp_path / specs["l2cs_gaze360"].path) in message
    )


def test_sha256_mismatch_is_reported(tmp_path: Path) -> None:
    yaml_path = tmp_path / "weights.yaml"
    good = hashlib.sha256(b"right").hexdigest()
    yaml_path.write_text(f"a:\n  path: a.bin\n  sha256: {good}\n  origin: here\n")
    (tmp_path / "a.bin").write_bytes(b"wrong")
    assert "wrong sha256" in w.check_weights(tmp_path, ["a"], manifest=yaml_path)[0]
    (tmp_path / "a.bin").write_bytes(b"right")
    assert w.check_weights(tmp_path, ["a"], manifest=yaml_path) == []
    assert "not listed" in w.check_weights(tmp_path, ["b"], manifest=yaml_path)[0]


def test_tiny_writer_output_appears_atomically(tmp_path: Path) -> None:
    calls = []

    def writer(dest: Path, seed: int) -> None:
        calls.append(dest)
        assert dest.name.startswith(".")  # written under a temp name, renamed afterwards
        dest.write_bytes(b"tiny")

    w.TINY_WRITERS["parsenet"], saved = writer, w.TINY_WRITERS.get("parsenet")
    try:
        w.ensure_tiny_weights(tmp_path, ["parsenet"])
        w.ensure_tiny_weights(tmp_path, ["parsenet"])  # present: not written again
    finally:
        if saved is None:
            del w.TINY_WRITERS["parsenet"]
        else:
            w.TINY_WRITERS["parsenet"] = saved
    target = tmp_path / w.load_weight_specs()["parsenet"].path
    assert target.read_bytes() == b"tiny" and len(calls) == 1
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_full_profile_needs_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIGHTS_DIR", raising=False)
    with pytest.raises(w.MissingWeights, match="WEIGHTS_DIR"):
        w.resolve_weights_dir("full", None)
    monkeypatch.setenv("WEIGHTS_DIR", "/data/weights")
    assert w.resolve_weights_dir("full", None) == Path("/data/weights")
    assert w.resolve_weights_dir("tiny", None) == w.DEFAULT_TINY_DIR


# The weights table: file -> (manifest path, sha256, bytes); None where nothing is published.
PUBLISHED = {
    "buffalo_l": ("insightface/models/buffalo_l", "80ffe37d8a5940d59a7384c201a2a38d4741f2f3c51eef46ebb28218a7b0ca2f", 288621354),
    "scrfd_10g": ("insightface/models/buffalo_l/det_10g.onnx", "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91", 16923827),
    "arcface_r50": ("insightface/models/buffalo_l/w600k_r50.onnx", "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43", 174383860),
    "landmark_2d106": ("insightface/models/buffalo_l/2d106det.onnx", "f001b856447c413801ef5c42091ed0cd516fcd21f2d6b79635b1e733a7109dbf", 5030888),
    "landmark_1k3d68": ("insightface/models/buffalo_l/1k3d68.onnx", "df5c06b8a0c12e422b2ed8947b8869faa4105387f199c477af038aa01f9a45cc", 143607619),
    "inswapper_128": ("insightface/inswapper_128.onnx", "e4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af", 554253681),
    "parsenet": ("facexlib/parsing_parsenet.pth", "3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2", 85331193),
    "bisenet": ("facexlib/parsing_bisenet.pth", "468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567", 53289463),
    "densepose_r50_fpn_s1x": ("densepose/model_final_162be9.pkl", "b8a7382001b16e453bad95ca9dbc68ae8f2b839b304cf90eaf5c27fbdb4dae91", 255757821),
    "l2cs_gaze360": ("l2cs/L2CSNet_gaze360.pkl", None, None),
    "sdxl_turbo/unet": ("sdxl-turbo/unet/diffusion_pytorch_model.fp16.safetensors", "48fa46161a745f48d4054df3fe13804ee255486bca893403b60373c188fd1bdb", 5135149760),
    "sdxl_turbo/vae": ("sdxl-turbo/vae/diffusion_pytorch_model.fp16.safetensors", "02ee4bd18e5d16e7fe5fc5b85b4aefa2cba6db28897f674226c9d6ddd2f34f06", None),
    "sd15_unet": ("unet/diffusion_pytorch_model.safetensors", "19da7aaa4b880e59d56843f1fcb4dd9b599c28a1d9d9af7c1143057c8ffae9f1", 3438167540),
    "sd_vae_ft_mse": ("vae/diffusion_pytorch_model.safetensors", "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815", 334643276),
    "clip_vit_large_patch14": ("clip-vit-large-patch14/model.safetensors", "a2bf730a0c7debf160f7a6b50b3aaf3703e7e88ac73de7a314903141db026dcb", 1710540580),
    "animatediff_v3": ("motion_adapter/diffusion_pytorch_model.safetensors", None, None),
    "lpips_alexnet": ("torch/hub/checkpoints/alexnet-owt-7be5be79.pth", "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02", 244408911),
    "fid_inception": ("torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth", "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", 95628359),
    "fvd_i3d": ("eval/i3d_torchscript.pt", "bec6519f66ea534e953026b4ae2c65553c17bf105611c746d904657e5860a5e2", 51235320),
    # google-ai-edge/mediapipe third_party/external_files.bzl pins this object generation's sha256 (no size)
    "mediapipe_face_landmarker": ("mediapipe/face_landmarker_v2_with_blendshapes.task", "b261925d4aad812b47a0e8d58c1baa1223270a5d1f663d78338bc881c003879d", None),
    "fan_2dfan4": ("face_alignment/2DFAN4-11f355bf06.pth.tar", "11f355bf0693120222f5955ce3f9dc8fb5763ebb30a47d7906e509490d32e4aa", None),
}  # fmt: skip
PINNED_REVISIONS = {
    "sdxl_turbo": "3a98214d01b1e1f5b0e71bec85ffb07534300fc7",
    "sd_vae_ft_mse": "31f26fdeee1355a5c34592e401dd41e45d25a493",
    "clip_vit_large_patch14": "32bd64288804d66eefd0ccbe215aa642df71cc41",
    "animatediff_v3": "449d8993ead63a068e1030eb26925132814db1c8",
}


def test_manifest_holds_every_published_file_with_its_facts() -> None:
    specs = w.load_weight_specs()
    files = {
        file.path: file
        for spec in specs.values()
        for file in (spec.archive_spec() if spec.kind == "archive" else None, *spec.file_specs())
        if file is not None
    }
    for row, (path, sha256, size) in PUBLISHED.items():
        name = row.split("/")[0]
        file = files[specs[name].archive_spec().path] if specs[name].kind == "archive" else files[path]
        in_place = (
            path.startswith(specs[name].path + "/")
            if specs[name].kind == "folder"
            else specs[name].path == path
        )
        assert in_place, row
        assert (file.sha256, file.size) == (sha256, size), row
        assert file.urls or specs[name].member_of or specs[name].manual, f"{row}: no source"
        sources_of = {spec.derived_from for spec in specs.values()}
        assert specs[name].jobs or specs[name].member_of or name in sources_of, f"{row}: no job named"
    for name, revision in PINNED_REVISIONS.items():
        assert {source.revision for source in specs[name].sources} == {revision}
    # Hugging Face files on `main` are only those whose weights are pinned by sha256
    for spec in specs.values():
        if any(source.hf_repo and source.revision == "main" for source in spec.sources):
            assert any(file.sha256 for file in spec.file_specs()), spec.name
    restricted = {name for name, spec in specs.items() if spec.restricted}
    assert restricted == {"buffalo_l", "inswapper_128", "sdxl_turbo"}


def test_jobs_name_what_the_trainer_and_evaluation_read() -> None:
    assert w.job_names("train") == ["animatediff_v3", "clip_image_encoder", "sd15_unet", "sd_vae_ft_mse"]
    assert [w.load_weight_specs()[n].path for n in w.job_names("train")] == [
        "motion_adapter",
        "image_encoder",
        "unet",
        "vae",
    ]  # fmt: skip  (the four folders model/components.py reads)
    assert w.job_names("eval") == [
        "arcface_r50",
        "buffalo_l",
        "fan_2dfan4",
        "fid_inception",
        "fvd_i3d",
        "l2cs_gaze360",
        "landmark_1k3d68",
        "landmark_2d106",
        "lpips_alexnet",
        "mediapipe_face_landmarker",
        "scrfd_10g",
    ]  # fmt: skip  (the backbones, buffalo_l's detector / ArcFace / landmarks, L2CS, MediaPipe)
