"""`weights fetch` / `check` / `pin` against a real HTTP server on 127.0.0.1 laid out like the origins."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from weights_origin import Origin, load_onnx, real_format_files, sha, start_origin, write_manifest

from pipeline.weights import (
    STATE_DIR,
    HashCache,
    MissingWeights,
    check_weights,
    pin_weights,
    require_weights,
    verify_job,
)
from pipeline.weights.fetch import FetchError, fetch_weights
from pipeline.weights.licences import LicenceNotAccepted
from pipeline.weights.manifest import Source, mirrored, source_url

PTH = "/github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth"
ZIP = "/github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
HF = f"/huggingface.co/stabilityai/sd-vae-ft-mse/resolve/{'a' * 40}/"
ALL = ["buffalo_l", "scrfd_10g", "arcface_r50", "genderage", "parsenet", "sd_vae_ft_mse", "lpips_alexnet"]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach a real host: resolving any name but the loopback address fails."""
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):  # noqa: ANN001, ANN202
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test tried to reach {host}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HF_ENDPOINT", "HF_TOKEN", "WEIGHTS_MIRROR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def origin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Origin]:
    origin, server = start_origin()
    origin.files = real_format_files()
    monkeypatch.setenv("WEIGHTS_MIRROR", origin.base)
    yield origin
    server.shutdown()
    server.server_close()


def _fetch(root: Path, manifest: Path, **kwargs: object):  # noqa: ANN202
    kwargs.setdefault("accept_licences", ["all"])
    return fetch_weights(root, manifest=manifest, progress=False, **kwargs)


def _visible(root: Path) -> list[str]:
    """Files a reader could pick up: everything but the hidden state folder."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and STATE_DIR not in p.parts
    )


def test_full_fetch_then_check_passes_and_uses_the_hash_cache(origin: Origin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    root = tmp_path / "weights"
    stats = _fetch(root, manifest)
    assert _visible(root) == [
        "facexlib/parsing_parsenet.pth",
        "insightface/models/buffalo_l/det_10g.onnx",
        "insightface/models/buffalo_l/genderage.onnx",
        "insightface/models/buffalo_l/w600k_r50.onnx",
        "torch/hub/checkpoints/alexnet-owt-7be5be79.pth",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]  # no part files, and the archive is gone once unpacked
    assert len(stats.downloaded) == 7 and stats.present == []
    assert load_onnx(root / "insightface/models/buffalo_l/det_10g.onnx").graph.node[0].op_type == "Identity"
    assert (root / "facexlib/parsing_parsenet.pth").read_bytes() == origin.files[PTH]
    assert check_weights(root, ALL, manifest=manifest) == []
    # files without a published hash are pinned on first download, marked as such
    pins = yaml.safe_load((root / STATE_DIR / "pins.json").read_text())
    assert set(pins) == {"insightface/models/buffalo_l/genderage.onnx", "vae/config.json"}
    assert {pin["trust"] for pin in pins.values()} == {"trust-on-first-use"}
    # the check read no file: fetch cached each verified hash by (size, mtime)
    cache = HashCache(root)
    cache.sha256("facexlib/parsing_parsenet.pth")
    assert cache.hashed == 0
    os.utime(root / "facexlib/parsing_parsenet.pth", ns=(1, 1))  # touched: hashed again
    assert HashCache(root).sha256("facexlib/parsing_parsenet.pth") == sha(origin.files[PTH])


def test_downloads_run_in_parallel(origin: Origin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    origin.delay_s = 0.2
    _fetch(tmp_path / "weights", manifest, jobs=4)
    assert origin.max_in_flight >= 2


def test_rerun_downloads_nothing(origin: Origin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    root = tmp_path / "weights"
    _fetch(root, manifest)
    served = len(origin.requests)
    stats = _fetch(root, manifest)
    assert len(origin.requests) == served and stats.downloaded == [] and stats.bytes_received == 0
    assert len(stats.present) == 7


def test_dropped_connection_resumes_with_range(origin: Origin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    root = tmp_path / "weights"
    body = origin.files[PTH]
    origin.drop_after[PTH] = len(body) // 3
    with pytest.raises(FetchError, match="connection closed after"):
        _fetch(root, manifest, wanted=["parsenet"], attempts=1)
    assert not (root / "facexlib/parsing_parsenet.pth").exists()  # never visible half-written
    assert (root / "facexlib/.parsing_parsenet.pth.part").stat().st_size == len(body) // 3
    _fetch(root, manifest, wanted=["parsenet"])
    assert (root / "facexlib/parsing_parsenet.pth").read_bytes() == body
    assert [r.range for r in origin.requests if r.path == PTH] == [None, f"bytes={len(body) // 3}-"]
    assert origin.sent(PTH) == len(body)  # not one byte fetched twice


def test_dropped_connection_is_resumed_within_one_run(origin: Origin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    origin.drop_after[PTH] = 1000
    stats = _fetch(tmp_path / "weights", manifest, wanted=["parsenet"])
    assert stats.downloaded == ["facexlib/parsing_parsenet.pth"]
    assert origin.sent(PTH) == len(origin.files[PTH]) and stats.bytes_received == len(origin.files[PTH])


def test_complete_part_file_of_unknown_size_is_finished_without_a_body(
    origin: Origin, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    root = tmp_path / "weights"
    (root / "vae").mkdir(parents=True)
    (root / "vae/.config.json.part").write_bytes(origin.files[HF + "config.json"])  # crashed before rename
    _fetch(root, manifest, wanted=["sd_vae_ft_mse"])
    config = [r for r in origin.requests if r.path == HF + "config.json"]
    assert [(r.status, r.sent) for r in config] == [(416, 0)]
    assert (root / "vae/config.json").read_bytes() == origin.files[HF + "config.json"]


def test_corrupted_file_is_refused_and_never_visible(origin: Origin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    root = tmp_path / "weights"
    good = origin.files[PTH]
    origin.files[PTH] = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]  # same size, one byte flipped
    with pytest.raises(FetchError) as info:
        _fetch(root, manifest, wanted=["parsenet"])
    message = str(info.value)
    assert "facexlib/parsing_parsenet.pth" in message and "sha256 mismatch" in message
    assert f"got {sha(origin.files[PTH])}, expected {sha(good)}" in message
    assert list((root / "facexlib").iterdir()) == []  # nothing under the final name, no part file kept


def test_404_on_the_first_mirror_uses_the_second(origin: Origin, tmp_path: Path) -> None:
    dead = "https://mirror.invalid/facexlib/parsing_parsenet.pth"  # served as 404 via WEIGHTS_MIRROR
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files, {"parsenet": [dead]})
    _fetch(tmp_path / "weights", manifest, wanted=["parsenet"])
    assert [(r.path, r.status) for r in origin.requests] == [
        ("/mirror.invalid/facexlib/parsing_parsenet.pth", 404),
        (PTH, 200),
    ]
    assert (tmp_path / "weights/facexlib/parsing_parsenet.pth").read_bytes() == origin.files[PTH]


def test_archive_members_are_each_checked(origin: Origin, tmp_path: Path) -> None:
    files = dict(origin.files)
    files["/member/w600k_r50.onnx"] = b"what the manifest expects instead"
    manifest = write_manifest(tmp_path / "weights.yaml", files)
    root = tmp_path / "weights"
    with pytest.raises(FetchError, match="arcface_r50: member w600k_r50.onnx has .* bytes, expected"):
        _fetch(root, manifest, wanted=["arcface_r50"])
    assert not (root / "insightface/models/buffalo_l/w600k_r50.onnx").exists()
    assert (root / "insightface/models/buffalo_l/det_10g.onnx").is_file()  # the good member is in place
    assert (root / STATE_DIR / "downloads/buffalo_l.zip").is_file()  # kept: no re-download to retry


def test_restricted_licence_needs_acceptance_once(origin: Origin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    root = tmp_path / "weights"
    with pytest.raises(LicenceNotAccepted, match="buffalo_l: insightface models, non-commercial") as info:
        _fetch(root, manifest, wanted=["build"], accept_licences=[])
    assert "--accept-licence" in str(info.value) and origin.requests == []  # refused before any download
    _fetch(root, manifest, wanted=["build"], accept_licences=["buffalo_l"])
    _fetch(root, manifest, wanted=["swap"], accept_licences=[])  # remembered
    assert (root / "insightface/models/buffalo_l/det_10g.onnx").is_file()


def test_hf_endpoint_and_token_go_to_the_hub_only(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WEIGHTS_MIRROR")
    monkeypatch.setenv("HF_ENDPOINT", origin.base + "/huggingface.co")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    plain = origin.base + "/download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files, {"lpips_alexnet": [plain]})
    _fetch(tmp_path / "weights", manifest, wanted=["train", "lpips_alexnet"])
    auth = {r.path: r.authorization for r in origin.requests}
    assert auth[HF + "config.json"] == auth[HF + "diffusion_pytorch_model.safetensors"] == "Bearer hf_secret"
    assert auth["/download.pytorch.org/models/alexnet-owt-7be5be79.pth"] is None


def test_wrong_files_are_refused_in_one_message_and_pins_protect_unpublished(
    origin: Origin, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "weights.yaml", origin.files)
    root = tmp_path / "weights"
    _fetch(root, manifest)
    (root / "facexlib/parsing_parsenet.pth").write_bytes(b"tampered")
    (root / "vae/config.json").write_text('{"_class_name": "y"}')  # pinned on first download
    (root / "torch/hub/checkpoints/alexnet-owt-7be5be79.pth").unlink()
    (root / "insightface/models/buffalo_l/det_10g.onnx").unlink()
    with pytest.raises(MissingWeights) as info:
        require_weights(root, ALL, manifest=manifest)
    message = str(info.value)
    assert message.startswith("4 weights file(s) missing or wrong")
    assert message.count("scrfd_10g: missing") == 1  # named by buffalo_l and scrfd_10g: reported once
    assert "parsing_parsenet.pth has 8 bytes, expected" in message
    assert "vae/config.json has the wrong sha256" in message and "trust-on-first-use" in message
    assert "alexnet-owt-7be5be79.pth" in message and "weights fetch" in message
    assert verify_job(root, "train", manifest) == [
        f"sd_vae_ft_mse: {root}/vae/config.json has the wrong sha256 (expected "
        f"{sha(origin.files[HF + 'config.json'])}, trust-on-first-use)"
    ]  # the trainer's check: its files only
    assert pin_weights(root, ["sd_vae_ft_mse"], manifest=manifest) == {
        "vae/config.json": sha(b'{"_class_name": "y"}')
    }  # `weights pin` accepts the file the user has
    assert "vae/config.json" not in str(check_weights(root, ["sd_vae_ft_mse"], manifest=manifest))


def test_mirror_keeps_the_origin_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        mirrored("https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1", "http://m:8/w/")
        == "http://m:8/w/www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt"
    )
    assert mirrored("https://huggingface.co/a/b/resolve/c/d", "") == "https://huggingface.co/a/b/resolve/c/d"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    source = Source.parse({"hf": "openai/clip-vit-large-patch14", "revision": "c" * 40})
    assert (
        source_url(source, "config.json", "")
        == f"https://hf-mirror.example/openai/clip-vit-large-patch14/resolve/{'c' * 40}/config.json"
    )
    assert (
        source_url(source, "config.json", "http://m")
        == f"http://m/huggingface.co/openai/clip-vit-large-patch14/resolve/{'c' * 40}/config.json"
    )


def test_cli_fetch_check_and_rerun(
    origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import main

    manifest = str(write_manifest(tmp_path / "weights.yaml", origin.files))
    root = str(tmp_path / "weights")
    common = ["--weights-dir", root, "--manifest", manifest]
    assert main(["weights", "fetch", *common, "--for", "build", "--no-progress"]) == 1  # licence not accepted
    assert origin.requests == []
    fetch = ["weights", "fetch", *common, "--for", "build", "--no-progress", "--accept-licence", "all"]
    assert main(fetch) == 0
    assert main(["weights", "check", *common, "scrfd_10g", "arcface_r50", "parsenet"]) == 0
    assert "all 3 weights present" in capsys.readouterr().out
    served = len(origin.requests)
    assert main(fetch) == 0 and len(origin.requests) == served  # complete folder: a no-op
    assert main(["weights", "check", *common, "lpips_alexnet"]) == 1  # not fetched (--for build)
    assert "lpips_alexnet: missing" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["weights", "fetch", "--help"])
    assert info.value.code == 0 and "--accept-licence" in capsys.readouterr().out


def test_train_fetch_writes_the_image_encoder_from_clip(origin: Origin, tmp_path: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=64, max_position_embeddings=8),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=24,  # the vision sub-config keeps its default: the reason for the derive step
    )
    torch.manual_seed(0)
    clip = CLIPModel(config)
    clip.save_pretrained(tmp_path / "clip")
    rev = "b" * 40
    for name in ("config.json", "model.safetensors"):
        served = f"/huggingface.co/openai/clip-vit-large-patch14/resolve/{rev}/{name}"
        origin.files[served] = (tmp_path / "clip" / name).read_bytes()
    manifest = tmp_path / "weights.yaml"
    manifest.write_text(f"""
clip_vit_large_patch14:
  path: clip-vit-large-patch14
  sources: [{{hf: openai/clip-vit-large-patch14, revision: {rev}}}]
  jobs: [train]
  files: [{{path: config.json}}, {{path: model.safetensors}}]
clip_image_encoder:
  path: image_encoder
  derived_from: clip_vit_large_patch14
  derive: clip_vision_with_projection
  jobs: [train]
  files: [{{path: config.json}}, {{path: model.safetensors}}]
""")
    root = tmp_path / "weights"
    _fetch(root, manifest, wanted=["clip_image_encoder"])
    encoder = CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder", local_files_only=True)
    assert torch.equal(encoder.visual_projection.weight, clip.visual_projection.weight)  # 24 x 16
    assert check_weights(root, ["clip_image_encoder"], manifest=manifest) == []
    pins = yaml.safe_load((root / STATE_DIR / "pins.json").read_text())
    assert {"image_encoder/config.json", "image_encoder/model.safetensors"} <= set(pins)
    assert _fetch(root, manifest, wanted=["train"]).downloaded == []  # in place: nothing written again
