"""Recipe loading, overrides, the batch plan and the use of every config field."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from clove_timm.schedules import scaled_lr
from training.config import PretrainConfig, load_config, plan_batches

TRAINING_DIR = Path(__file__).resolve().parents[1] / "training"


@pytest.mark.parametrize("epochs", [400, 200, 50])
def test_paper_recipes_hold_the_paper_values(epochs):
    c = load_config(f"clove_r50_in1k_{epochs}ep")
    assert c.epochs == epochs and c.backbone == "resnet50"
    assert c.global_batch_size == 2048 and scaled_lr(c.base_lr, 2048, c.lr_reference_batch) == 8.0
    assert (c.weight_decay, c.sgd_momentum, c.trust_coefficient) == (2e-5, 0.9, 0.001)
    assert (c.warmup_epochs, c.warmup_start_factor, c.final_lr_factor) == (5, 0.01, 0.01)
    assert (c.base_teacher_momentum, c.final_teacher_momentum) == (0.99, 1.0)
    assert (c.global_size, c.local_size, c.num_local) == (224, 96, 6)
    assert (c.global_scale, c.local_scale) == ((0.2, 1.0), (0.08, 0.3))
    assert (c.pos_ratio, c.pos_weight, c.margin, c.num_negatives) == (0.7, 2.0, 100.0, 10)
    assert c.normalize_qk and c.attn_temperature == 0.2 and c.num_heads == 8
    assert (c.proj_hidden_dim, c.embed_dim) == (4096, 256)
    assert c.export_name == {400: "resnet50.clove_in1k"}.get(epochs, f"resnet50.clove_ep{epochs}_in1k")


@pytest.mark.parametrize("processes", [1, 2, 4, 8, 16, 32])
def test_global_batch_and_lr_do_not_depend_on_the_process_count(processes):
    c = load_config("clove_r50_in1k_400ep")
    plan = plan_batches(c, processes)
    assert plan.global_batch == 2048
    assert plan.per_device_batch <= c.batch_size
    assert plan.per_device_batch * plan.grad_accum_steps * processes == 2048


def test_uneven_process_count_is_refused():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        plan_batches(load_config("clove_r50_in1k_400ep"), 3)


def test_without_global_batch_it_scales_with_processes():
    c = load_config(None, ["global_batch_size=null", "batch_size=16", "grad_accum_steps=3"])
    assert plan_batches(c, 2).global_batch == 96


def test_overrides_are_parsed_as_yaml_and_typed():
    c = load_config("demo", ["epochs=7", "global_scale=[0.3, 0.9]", "max_steps=null", "base_lr=2", "cpu=true"])
    assert c.epochs == 7 and c.global_scale == (0.3, 0.9) and c.max_steps is None
    assert c.base_lr == 2.0 and isinstance(c.base_lr, float) and c.cpu is True


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'epoch'"):
        load_config("demo", ["epoch=3"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config("demo", ["epochs"])
    with pytest.raises(FileNotFoundError, match="unknown recipe 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 3\n")
    with pytest.raises(ValueError, match=f"unknown config key 'lr' in {bad}"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="mixed_precision"):
        load_config("demo", ["mixed_precision=fp8"])
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text(f"inherit: {cyclic}\n")
    with pytest.raises(ValueError, match="inherits from itself"):
        load_config(str(cyclic))


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PretrainConfig().epochs = 3


def test_every_config_field_is_read_by_the_recipe():
    source = "\n".join(p.read_text() for p in TRAINING_DIR.glob("*.py") if p.name != "config.py")
    config_source = (TRAINING_DIR / "config.py").read_text()
    unread = []
    for f in dataclasses.fields(PretrainConfig):
        read_in_loop = re.search(rf"\bconfig\.{f.name}\b", source)
        read_in_plan = re.search(rf"\bconfig\.{f.name}\b", config_source)
        if not (read_in_loop or read_in_plan):
            unread.append(f.name)
    assert not unread, f"config fields never read: {unread}"
