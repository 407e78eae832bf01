from __future__ import annotations

import pytest

from pipeline.config import load_build_config, parse_overrides


@pytest.mark.parametrize("dataset", ["demo", "vfhq", "celebvhq"])
def test_shipped_configs_load(dataset: str) -> None:
    config = load_build_config(dataset, root="r", out="o")
    assert config.dataset == dataset and config.root == "r" and config.out == "o"
    assert abs(sum(config.mix.values()) - 1) < 1e-9


def test_overrides_reach_nested_fields_and_replace_the_mix() -> None:
    config = load_build_config(
        "demo",
        overrides=["video.crf=23", "resolution=128", "mix={real: 1, swap: 0, style: 0}"],
        root="r",
        out="o",
    )
    assert config.video.crf == 23 and config.resolution == 128
    assert config.mix == {"real": 1.0, "swap": 0.0, "style": 0.0}
    assert isinstance(config.mix["swap"], float)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="unknown keys \\['resolutoin'\\]"):
        load_build_config("demo", overrides=["resolutoin=128"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(ValueError, match="config.video.crf: expected int"):
        load_build_config("demo", overrides=["video.crf=high"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("mix={real: 0.5, swap: 0.5, style: 0.5}", "sum to 1"),
        ("mix={real: 1.0}", "must name exactly"),
        ("resolution=100", "multiple of 16"),
        ("min_frames=500", "min_frames <= max_frames"),
    ],
)
def test_invalid_settings_are_refused(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_build_config("demo", overrides=[override])


def test_parse_overrides_rejects_non_assignments() -> None:
    with pytest.raises(ValueError, match="not key=value"):
        parse_overrides(["resolution"])
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}
