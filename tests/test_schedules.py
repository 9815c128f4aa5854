"""Tests for clove_timm.schedules: hand-derived values, shape of the curves, parity with the reference table."""

import itertools
import math

import numpy as np
import pytest

from clove_timm.schedules import learning_rate, scaled_lr, teacher_momentum

# Recipe-like numbers chosen so that the hand arithmetic comes out round:
# base 8.0 -> start and floor 0.08; warm-up slope (8.0 - 0.08) / (100 - 1) = 0.08 per step.
_LR = {"base_lr": 8.0, "total_steps": 1000, "warmup_steps": 100}


def test_learning_rate_warmup_values():
    assert learning_rate(0, **_LR) == pytest.approx(0.08, rel=1e-12)
    assert learning_rate(50, **_LR) == pytest.approx(0.08 + 50 * 0.08, rel=1e-12)  # 4.08
    assert learning_rate(99, **_LR) == pytest.approx(8.0, rel=1e-12)  # end of warm-up


def test_learning_rate_cosine_values():
    # Step W starts the cosine at the peak (the reference repeats the peak at W - 1 and W).
    assert learning_rate(100, **_LR) == pytest.approx(8.0, rel=1e-12)
    # (400 - 100) / 900 = 1/3 of the cosine: cos(pi/3) = 1/2 -> 0.08 + 7.92 * 3/4.
    assert learning_rate(400, **_LR) == pytest.approx(0.08 + 7.92 * 0.75, rel=1e-12)
    # Half-way: cos(pi/2) = 0 -> 0.08 + 7.92 / 2.
    assert learning_rate(550, **_LR) == pytest.approx(4.04, rel=1e-12)
    # Last step of the schedule: just above the floor, 7.92 * (1 - cos(pi/900)) / 2 ~= 2.41e-5 above it.
    last = learning_rate(999, **_LR)
    assert 0.08 < last < 0.08 + 3e-5
    assert last == pytest.approx(0.08 + 7.92 * (math.pi / 900) ** 2 / 4, rel=1e-4)


def test_learning_rate_end_and_clamp():
    assert learning_rate(1000, **_LR) == pytest.approx(0.08, rel=1e-12)
    assert learning_rate(10**6, **_LR) == pytest.approx(0.08, rel=1e-12)


def test_learning_rate_factors_and_short_warmups():
    assert learning_rate(0, base_lr=2.0, total_steps=10, warmup_steps=0) == pytest.approx(2.0)
    assert learning_rate(10, base_lr=2.0, total_steps=10, warmup_steps=0, final_factor=0.0) == 0.0
    # One warm-up step: the start value, then the peak.
    assert learning_rate(0, base_lr=2.0, total_steps=10, warmup_steps=1) == pytest.approx(0.02)
    assert learning_rate(1, base_lr=2.0, total_steps=10, warmup_steps=1) == pytest.approx(2.0)
    # warmup_start_factor 0.5 on base 2.0 with 3 warm-up steps: 1.0, 1.5, 2.0.
    values = [learning_rate(t, base_lr=2.0, total_steps=10, warmup_steps=3, warmup_start_factor=0.5) for t in range(3)]
    assert values == pytest.approx([1.0, 1.5, 2.0])


def test_learning_rate_monotonic():
    lrs = [learning_rate(t, **_LR) for t in range(1100)]
    warmup, cosine = lrs[:100], lrs[100:]
    assert all(a < b for a, b in itertools.pairwise(warmup))
    assert all(a > b for a, b in itertools.pairwise(cosine[:901]))  # steps 100..1000
    assert all(a == b for a, b in itertools.pairwise(cosine[900:]))  # clamped after step 1000
    assert min(lrs) == pytest.approx(0.08) and max(lrs) == pytest.approx(8.0)


def _reference_table(base, final, epochs, iters_per_epoch, warmup_epochs, start_warmup):
    """The reference's table as its main_pretrain.py describes it: linspace warm-up, then cosine over the rest."""
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    n = epochs * iters_per_epoch - warmup_iters
    cosine = [final + (base - final) * (1 + math.cos(math.pi * i / n)) / 2 for i in range(n)]
    return np.concatenate([warmup, np.array(cosine)])


@pytest.mark.parametrize(("epochs", "iters", "warmup_epochs"), [(7, 13, 5), (3, 4, 1), (2, 5, 0), (4, 1, 1)])
def test_learning_rate_matches_reference_table(epochs, iters, warmup_epochs):
    table = _reference_table(8.0, 0.08, epochs, iters, warmup_epochs, 8.0 / 100)
    assert len(table) == epochs * iters
    ours = [
        learning_rate(t, base_lr=8.0, total_steps=epochs * iters, warmup_steps=warmup_epochs * iters)
        for t in range(epochs * iters)
    ]
    np.testing.assert_allclose(ours, table, rtol=1e-12, atol=0)


def test_teacher_momentum_values():
    assert teacher_momentum(0, total_steps=1000) == pytest.approx(0.99, abs=1e-15)
    assert teacher_momentum(500, total_steps=1000) == pytest.approx(0.995, abs=1e-15)
    # t/T = 1/3: 1 - 0.01 * (1 + 1/2) / 2.
    assert teacher_momentum(1000, total_steps=3000) == pytest.approx(0.9925, abs=1e-15)
    assert teacher_momentum(1000, total_steps=1000) == 1.0
    assert teacher_momentum(5000, total_steps=1000) == 1.0
    assert teacher_momentum(5, total_steps=10, base_momentum=0.996, final_momentum=1.0) == pytest.approx(0.998)
    assert teacher_momentum(10, total_steps=10, base_momentum=0.9, final_momentum=0.95) == pytest.approx(0.95)


def test_teacher_momentum_matches_reference_table():
    table = _reference_table(0.99, 1.0, 3, 7, 0, 0.0)
    ours = [teacher_momentum(t, total_steps=21) for t in range(21)]
    np.testing.assert_allclose(ours, table, rtol=0, atol=1e-15)


def test_teacher_momentum_monotonic():
    ms = [teacher_momentum(t, total_steps=200) for t in range(250)]
    assert all(a < b for a, b in itertools.pairwise(ms[:201]))
    assert all(m == 1.0 for m in ms[200:])


def test_scaled_lr():
    assert scaled_lr(1.0, 4 * 256 * 2) == 8.0  # recipe of record, method doc section 5
    assert scaled_lr(1.0, 32 * 1 * 2) == 0.25  # the reference's 1-GPU run: batch 32, 2 accumulation steps
    assert scaled_lr(0.3, 1024, reference_batch=512) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": -1}, ValueError, "step must be >= 0"),
        ({"step": 1.0}, TypeError, "step must be an int"),
        ({"step": True}, TypeError, "step must be an int"),
        ({"total_steps": 0}, ValueError, "total_steps must be > 0"),
        ({"warmup_steps": 1000}, ValueError, "warmup_steps must lie in"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps must lie in"),
        ({"warmup_steps": 5.0}, TypeError, "warmup_steps must be an int"),
        ({"base_lr": -1.0}, ValueError, "base_lr must lie in"),
        ({"base_lr": float("nan")}, ValueError, "base_lr must be finite"),
        ({"base_lr": "8"}, TypeError, "base_lr must be a real number"),
        ({"warmup_start_factor": -0.1}, ValueError, "warmup_start_factor"),
        ({"final_factor": float("inf")}, ValueError, "final_factor must be finite"),
    ],
)
def test_learning_rate_bad_arguments(kwargs, error, match):
    args = {"step": 0, **_LR, **kwargs}
    step = args.pop("step")
    with pytest.raises(error, match=match):
        learning_rate(step, **args)


@pytest.mark.parametrize(
    ("step", "kwargs", "error", "match"),
    [
        (-3, {"total_steps": 10}, ValueError, "step must be >= 0"),
        (0, {"total_steps": 0}, ValueError, "total_steps must be > 0"),
        (0, {"total_steps": 10.5}, TypeError, "total_steps must be an int"),
        (0, {"total_steps": 10, "base_momentum": 1.5}, ValueError, "base_momentum must lie in"),
        (0, {"total_steps": 10, "final_momentum": -0.1}, ValueError, "final_momentum must lie in"),
    ],
)
def test_teacher_momentum_bad_arguments(step, kwargs, error, match):
    with pytest.raises(error, match=match):
        teacher_momentum(step, **kwargs)


def test_scaled_lr_bad_arguments():
    with pytest.raises(ValueError, match="global_batch_size must be > 0"):
        scaled_lr(1.0, 0)
    with pytest.raises(TypeError, match="global_batch_size must be an int"):
        scaled_lr(1.0, 256.0)
    with pytest.raises(ValueError, match="reference_batch must be > 0"):
        scaled_lr(1.0, 256, reference_batch=-256)
    with pytest.raises(ValueError, match="base_lr must lie in"):
        scaled_lr(-1.0, 256)
