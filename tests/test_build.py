from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.build import run_build
from pipeline.config import load_build_config
from pipeline.stages import get_stage
from pipeline.weights import MissingWeights, load_weight_specs


def test_full_profile_refuses_to_start_and_names_every_missing_file(tmp_path: Path) -> None:
    (tmp_path / "vfhq" / "meta_info").mkdir(parents=True)
    config = load_build_config(
        "vfhq", root=str(tmp_path / "vfhq"), out=str(tmp_path / "out"), weights_dir=str(tmp_path / "weights")
    )
    assert config.profile == "full" and len(config.stages) == 5
    with pytest.raises(MissingWeights) as info:
        run_build(config)
    specs = load_weight_specs()
    needed = {n for s in config.stages for n in get_stage(s.name).weights_needed(s.options)}
    assert {"parsenet", "l2cs_gaze360", "scrfd_10g", "inswapper_128", "sdxl_turbo"} <= needed
    for name in needed:
        assert str(tmp_path / "weights" / specs[name].path) in str(info.value)
    assert not (tmp_path / "out" / "manifest.parquet").exists()  # refused before any work
