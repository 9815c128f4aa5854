"""Per-step schedules of the CLoVE recipe: learning rate, teacher momentum, linear lr scaling.

Every schedule is a pure function of the global step (a plain ``float`` out for an ``int`` in), so the
training loop reads it at the top of each step the way nanoGPT's ``get_lr(it)`` does, and a resumed run
needs nothing but the step counter to land on the same values.

Symbols used below: ``t`` is the step (counted from 0), ``T`` is ``total_steps``, ``W`` is ``warmup_steps``.

Step counting versus the reference (sthalles/CLoVE ``main_pretrain.py``): the reference tabulates its schedules
over data-loader iterations (micro-batches, ``epochs * len(loader)`` entries) and, with gradient accumulation, reads
them only at the last micro-batch of each accumulation window, so its k-th optimizer update uses entry
``k * accumulation_steps + accumulation_steps - 1``. Pass the micro-batch index and micro-batch totals here to
reproduce that exactly; counting optimizer steps instead shifts the curve by less than one optimizer step.
"""

import math
from numbers import Integral, Real

__all__ = ["learning_rate", "scaled_lr", "teacher_momentum"]


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__} ({step!r})")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_real(name: str, value: float, *, low: float, high: float = math.inf, include_low: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    above_low = value >= low if include_low else value > low
    if not above_low or value > high:
        low_bracket = "[" if include_low else "("
        high_text = f"{high}]" if math.isfinite(high) else "inf)"
        raise ValueError(f"{name} must lie in {low_bracket}{low}, {high_text}, got {value}")


def learning_rate(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float = 0.01,
    final_factor: float = 0.01,
) -> float:
    """Learning rate at ``step``: linear warm-up, then half a cosine down to a floor.

    With ``lr0 = base_lr * warmup_start_factor`` and ``lr1 = base_lr * final_factor``:

    - warm-up, ``0 <= t < W``: ``lr0 + (base_lr - lr0) * t / (W - 1)`` (``lr0`` when ``W == 1``), so the first step
      runs at ``lr0`` and step ``W - 1`` at ``base_lr``;
    - cosine, ``W <= t < T``: ``lr1 + (base_lr - lr1) * (1 + cos(pi * (t - W) / (T - W))) / 2``, which starts at
      ``base_lr`` and reaches ``lr1`` at ``t == T``;
    - ``t >= T``: ``lr1``.

    For ``0 <= t < T`` this equals, entry for entry, the table built by ``cosine_scheduler`` in the reference
    ``main_pretrain.py`` (``np.linspace`` warm-up including both ends, then cosine over the remaining ``T - W``
    entries), including its quirk that ``base_lr`` appears at both ``W - 1`` and ``W``. The reference table has
    exactly ``T`` entries; values past it clamp to the floor here instead of raising ``IndexError``.

    Args:
        step: Global step ``t``, counted from 0.
        base_lr: Peak learning rate, reached at the end of warm-up; the recipe uses
            ``scaled_lr(1.0, global_batch_size)`` (method doc section 5).
        total_steps: Length ``T`` of the schedule in steps (epochs times steps per epoch).
        warmup_steps: Length ``W`` of the warm-up in steps, ``0 <= W < T``; the recipe uses 5 epochs
            (reference ``--warmup-epoch 5``). ``W == 0`` starts the cosine at step 0.
        warmup_start_factor: ``lr0 / base_lr``; 0.01 is the reference's ``1 / --warmup-multiplier`` (100).
        final_factor: ``lr1 / base_lr``; 0.01 is hard-coded in the reference ``main_pretrain.py``.

    Returns:
        The learning rate for this step.

    Raises:
        TypeError: If ``step``, ``total_steps`` or ``warmup_steps`` is not an int, or a rate is not a number.
        ValueError: If ``step < 0``, ``total_steps <= 0``, ``warmup_steps`` is outside ``[0, total_steps)``, or a
            rate or factor is negative or not finite.
    """
    _check_step(step)
    _check_real("base_lr", base_lr, low=0.0)
    _check_positive_int("total_steps", total_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, Integral):
        raise TypeError(f"warmup_steps must be an int, got {type(warmup_steps).__name__} ({warmup_steps!r})")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must lie in [0, total_steps) = [0, {total_steps}), got {warmup_steps}; "
            "shorten the warm-up or lengthen the run"
        )
    _check_real("warmup_start_factor", warmup_start_factor, low=0.0)
    _check_real("final_factor", final_factor, low=0.0)

    start_lr = base_lr * warmup_start_factor
    final_lr = base_lr * final_factor
    if step < warmup_steps:
        if warmup_steps == 1:
            return float(start_lr)
        return float(start_lr + (base_lr - start_lr) * step / (warmup_steps - 1))
    if step >= total_steps:
        return float(final_lr)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return float(final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def teacher_momentum(
    step: int,
    *,
    total_steps: int,
    base_momentum: float = 0.99,
    final_momentum: float = 1.0,
) -> float:
    """EMA momentum of the teacher at ``step``, raised from ``base_momentum`` to ``final_momentum`` by a cosine.

    ``m(t) = m1 - (m1 - m0) * (1 + cos(pi * t / T)) / 2`` for ``0 <= t <= T`` (``m0 = base_momentum``,
    ``m1 = final_momentum``), and ``m1`` for ``t > T``. With the defaults this is
    ``1 - (1 - 0.99) * (1 + cos(pi * t / T)) / 2`` (method doc section 2; reference ``main_pretrain.py``
    ``cosine_scheduler(args.clove_momentum, 1.0, ...)`` without warm-up, equal entry for entry for ``t < T``).

    Args:
        step: Global step ``t``, counted from 0 (the teacher is updated once per optimizer step).
        total_steps: Length ``T`` of the schedule in steps.
        base_momentum: ``m0``, the momentum at step 0; 0.99 in the paper and reference ``--clove-momentum``.
        final_momentum: ``m1``, the momentum at step ``T``; 1.0 in the paper and reference.

    Returns:
        The momentum ``m`` in ``[0, 1]``; the teacher update is ``teacher <- m * teacher + (1 - m) * student``.

    Raises:
        TypeError: If ``step`` or ``total_steps`` is not an int, or a momentum is not a number.
        ValueError: If ``step < 0``, ``total_steps <= 0``, or a momentum lies outside ``[0, 1]``.
    """
    _check_step(step)
    _check_positive_int("total_steps", total_steps)
    _check_real("base_momentum", base_momentum, low=0.0, high=1.0)
    _check_real("final_momentum", final_momentum, low=0.0, high=1.0)

    progress = min(step, total_steps) / total_steps
    return float(final_momentum - (final_momentum - base_momentum) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def scaled_lr(base_lr: float, global_batch_size: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: ``base_lr * global_batch_size / reference_batch``.

    The reference ``main_pretrain.py`` computes ``batch_size * world_size / 256 * base_lr * accumulation_steps``,
    so ``global_batch_size`` counts every sample behind one optimizer step: per-device batch times devices times
    gradient-accumulation steps. The recipe of record (method doc section 5) is base lr 1.0 at
    4 x 256 x 2 = 2048 samples, giving 8.0.

    Args:
        base_lr: Learning rate at ``reference_batch`` samples per step (1.0 for CLoVE with LARS).
        global_batch_size: Samples per optimizer step over all devices and accumulation steps.
        reference_batch: Batch size at which ``base_lr`` applies (256, as in the reference).

    Returns:
        The scaled learning rate.

    Raises:
        TypeError: If a batch size is not an int or ``base_lr`` is not a number.
        ValueError: If ``base_lr`` is negative or not finite, or a batch size is not positive.
    """
    _check_real("base_lr", base_lr, low=0.0)
    _check_positive_int("global_batch_size", global_batch_size)
    _check_positive_int("reference_batch", reference_batch)
    return float(base_lr * global_batch_size / reference_batch)
