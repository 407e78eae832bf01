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
