"""The counting benchmark (benchmarks/step_flops.py) on the tiny profile, and stage 1's checkpointing config."""

import contextlib
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def step_flops():
    spec = importlib.util.spec_from_file_location("step_flops", ROOT / "benchmarks" / "step_flops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_flops"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_stage_counts_have_the_report_shape_and_the_new_defaults_cost_less(step_flops):
    before, after, shape = step_flops.stage_configs("stage1")
    after = replace(after, gradient_checkpointing=True, checkpoint_modules=["denoiser.*.motion_modules"])
    tiny = replace(shape, frames=2, resolution=64, profile="tiny")
    report = step_flops.count_stage(tiny, before, after, ema=True, ranks=8, budget_gb=80.0, headroom_gb=6.0)
    for key in ("executed_tflop_per_sample", "checkpoint_bytes_per_save", "fixed_memory_gb_ddp"):
        value = report[key]
        assert set(value) == {"before", "after", "ratio"}, key
        assert value["before"] >= value["after"] > 0, (key, value)
    recompute = report["recompute_tflop_per_sample"]
    assert recompute["before"] > recompute["after"] > 0  # only the motion modules run twice
    vae = report["vae_tflop_per_sample"]
    assert vae["before"] == pytest.approx(3 * vae["after"], rel=1e-4)  # 2 targets + reference vs reference
    parts = report["fixed_memory_ddp_parts_gb"]
    assert parts["before"]["bucket_copy"] == parts["before"]["grads"] > 0 == parts["after"]["bucket_copy"]
    assert report["fixed_memory_gb_fsdp"]["total"] < report["fixed_memory_gb_ddp"]["after"]
    assert report["checkpoint_files"]["before"]["writes"] == 2
    # The stage's checkpoint settings: bf16 AdamW moments, model/ with every third checkpoint.
    assert (shape.moment_bytes, shape.export_share) == (2, pytest.approx(1 / 3))
    files = report["checkpoint_files"]
    fp32_adamw = files["after_fp32_moments"]["files_gb"]["adamw"]
    assert files["after"]["files_gb"]["adamw"] == pytest.approx(fp32_adamw / 2, rel=2e-3)
    exact = report["checkpoint_bytes_per_save_fp32_moments"]["after"]
    assert exact > report["checkpoint_bytes_per_save"]["after"]
    assert report["saved_activation_gb_without_checkpointing"] > report["saved_activation_gb"]["after"] > 0
    choice = report["checkpointing"]["budget_choice"]
    assert choice["chosen"] == [] and choice["units"]  # the tiny step fits 80 GB as it is


def test_stage1_config_checkpoints_units_of_the_full_model_chosen_for_a_budget(step_flops):
    _, after, _ = step_flops.stage_configs("stage1")
    assert after.gradient_checkpointing and after.checkpoint_modules and after.checkpoint_budget_gb > 0
    model = step_flops.build_model(after, "full")  # raises when a listed unit does not exist
    assert 0 < len(model.checkpointed_units) < len(step_flops.checkpoint_units(model))
    _, stage2, _ = step_flops.stage_configs("stage2")
    assert not stage2.gradient_checkpointing


def test_attention_is_counted_as_the_fused_kernel_without_the_score_matrix(step_flops):
    query = torch.empty(2, 4, 256, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    kept = {}
    for name, mode in (("math", contextlib.nullcontext()), ("fused", step_flops.FusedAttention())):
        sizes = []
        with (
            mode,
            torch.autograd.graph.saved_tensors_hooks(
                lambda t, sizes=sizes: sizes.append(t.nbytes) or t, lambda t: t
            ),
        ):
            out = F.scaled_dot_product_attention(query, query, query)
        kept[name] = sum(sizes)
        assert out.shape == query.shape
    scores = 2 * 4 * 256 * 256 * 2  # one bf16 attention matrix
    assert kept["fused"] < scores < kept["math"]


def test_stage1_list_is_what_the_chooser_picks_for_its_budget_at_full_size(step_flops):
    _, after, shape = step_flops.stage_configs("stage1")
    plain = step_flops.build_model(replace(after, gradient_checkpointing=False), "full")
    profile = step_flops.count_step(plain, shape, cached_latents=True, backward=False, profile_units=True)
    params = {**profile.params, "receive_gradient": profile.params["trainable"]}  # none unused at full size
    fixed = step_flops.fixed_memory(params, bucket_copy=False, ema=True)["total"]
    choice = step_flops.choose_for_budget(
        profile, fixed, after.checkpoint_budget_gb, step_flops.DEFAULT_HEADROOM_GB
    )
    assert choice["chosen"] == after.checkpoint_modules, choice
    assert choice["peak_without_checkpointing_gb"] > after.checkpoint_budget_gb
