"""Every recipe loads into its config dataclass and passes the config checks."""

from pathlib import Path

import pytest

from moe2edge.demo import DemoConfig
from moe2edge.distill.config import load_config
from moe2edge.distill.student import build_student
from moe2edge.distill.train import TrainConfig, check_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_demo_recipe_loads():
    cfg = load_config(DemoConfig, RECIPES / "demo.yaml")
    assert cfg.loss == "fkl" and cfg.teacher_steps > 0


@pytest.mark.parametrize("name", ["distill-demo.yaml", "deepseek-v3-to-dense13b-8gpu.yaml"])
def test_training_recipes_are_valid(name):
    cfg = load_config(TrainConfig, RECIPES / name)
    check_config(cfg, has_teacher=cfg.teacher is not None)
    assert cfg.teacher or cfg.teacher_cache


def test_draft_and_finetune_recipes_are_valid():
    from moe2edge.distill.draft import DraftConfig
    from moe2edge.distill.finetune import FinetuneConfig

    draft = load_config(DraftConfig, RECIPES / "draft-demo.yaml")
    check_config(draft, has_teacher=draft.teacher is not None)
    assert draft.draft_for and build_student(draft.student_preset, device="meta").config
    tune = load_config(FinetuneConfig, RECIPES / "finetune-demo.yaml")
    check_config(tune, has_teacher=False)
    assert tune.student_init and sum(tune.stage_steps) == tune.max_steps


def test_production_recipe_describes_the_13b_job():
    cfg = load_config(TrainConfig, RECIPES / "deepseek-v3-to-dense13b-8gpu.yaml", ["max_steps=10"])
    assert cfg.max_steps == 10  # overrides apply on top of the YAML
    assert cfg.teacher is None and cfg.teacher_cache  # the 671B teacher is served, then cached
    assert cfg.activation_checkpointing and cfg.device == "cuda" and cfg.bf16
    assert cfg.param_dtype == "bfloat16" and cfg.reduce_dtype == "float32"  # FSDP2 mixed precision
    assert cfg.batch_size % (8 * cfg.grad_accum_steps) == 0  # splits over 8 ranks x accumulation
    student = build_student(cfg.student_preset, device="meta")
    params = sum(p.numel() for p in student.parameters())
    assert 12.5e9 < params < 13.5e9
