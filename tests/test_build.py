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


def test_overwrite_clears_every_output_of_the_old_recipe(tmp_path: Path) -> None:
    from pipeline.build import _clear_outputs

    for name in ("shards/shard-x.tar", "gaze/shards/shard-y.tar", "gaze/index.parquet", "index.parquet",
                 "failures.parquet", "manifest.parquet", "identities.parquet", "build.json"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"old")
    _clear_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
