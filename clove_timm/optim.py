"""LARS over SGD with momentum, with the trust-ratio formula of the CLoVE reference code.

For each parameter tensor ``w`` with gradient ``g`` in a group that is not excluded from LARS:

    d = g + weight_decay * w
    d = d * trust_coefficient * ||w|| / (||d|| + eps)      (factor 1 when ||w|| == 0 or ||d|| == 0)
    buf = d on the first step, else momentum * buf + d
    w = w - lr * buf

Groups flagged ``lars_exclude=True`` (the reference puts every 1-D tensor there: BatchNorm weights and biases) skip
both the weight decay and the trust ratio and take a plain SGD-momentum step. This is the behaviour of the reference
``contrast/lars.py`` (a wrapper that rewrites ``.grad`` and then calls ``torch.optim.SGD(momentum=0.9)``, dampening 0,
no Nesterov) with ``add_weight_decay`` building the groups (method doc section 5). timm's ``Lars`` differs: it
scales by ``trust_coeff * ||w|| / (||g|| + wd * ||w|| + eps)`` and adds weight decay after the ratio.

Deviations from the reference, all without effect on the update:

- ``.grad`` is only read. The reference replaces ``p.grad`` with the decayed, rescaled gradient; here the direction
  lives in new tensors and the momentum buffer, so after ``step()`` every ``.grad`` holds what it held before the
  step (a GradScaler unscales it in place beforehand, as for any optimizer): gradient norms logged after the step
  are true ones, and a loop that keeps accumulating into ``.grad`` sums raw gradients, never rescaled ones.
- A group flagged ``lars_exclude=True`` cannot carry weight decay (an error), where the reference would add it;
  its ``add_weight_decay`` never builds such a group, so the CLoVE update is unchanged.
- The trust ratio is computed for all tensors of one device and dtype at once with ``torch._foreach_*`` ops and a
  ``torch.where`` for the zero-norm case: no host synchronisation per parameter, where the reference's
  ``if param_norm > 0 and grad_norm > 0`` waits on the device for every tensor.
"""

import logging
import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["LARS", "param_groups_for_lars"]

_logger = logging.getLogger(__name__)

_GROUP_KEYS = ("lr", "weight_decay", "momentum", "trust_coefficient", "eps", "lars_exclude")


def _check_number(name: str, value: Any, *, low: float, high: float = math.inf, include_high: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"LARS {name} must be a real number, got {type(value).__name__} ({value!r})")
    below_high = value <= high if include_high else value < high
    if not math.isfinite(value) or value < low or not below_high:
        high_text = ("inf" if math.isinf(high) else str(high)) + ("]" if include_high and math.isfinite(high) else ")")
        raise ValueError(f"LARS {name} must lie in [{low}, {high_text}, got {value}")


def _check_group(group: dict[str, Any]) -> None:
    """Validates the hyperparameters of one parameter group (at construction and again at every step)."""
    missing = [key for key in _GROUP_KEYS if key not in group]
    if missing:
        raise KeyError(f"LARS parameter group lacks {missing} (a state dict saved by another optimizer?)")
    _check_number("lr", group["lr"], low=0.0)
    _check_number("weight_decay", group["weight_decay"], low=0.0)
    _check_number("momentum", group["momentum"], low=0.0, high=1.0, include_high=False)
    _check_number("trust_coefficient", group["trust_coefficient"], low=0.0)
    _check_number("eps", group["eps"], low=0.0)
    if not isinstance(group["lars_exclude"], bool):
        raise TypeError(f"LARS lars_exclude must be a bool, got {type(group['lars_exclude']).__name__}")
    if group["lars_exclude"] and group["weight_decay"] != 0:
        raise ValueError(
            f"a LARS group with lars_exclude=True takes no weight decay, got weight_decay={group['weight_decay']}; "
            "put the parameters that need weight decay in a group with lars_exclude=False"
        )


def _lars_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    trust_coefficient: float,
    eps: float,
    lars_exclude: bool,
) -> list[torch.Tensor] | None:
    """Applies one LARS step in place to tensors that share a device and a dtype.

    Args:
        params: Parameter tensors, updated in place.
        grads: Their gradients; read, never written.
        momentum_buffers: The momentum buffer of each parameter, ``None`` where it has none yet; updated in place.
        lr: Learning rate.
        weight_decay: Coefficient of the ``weight_decay * w`` term added to the gradient.
        momentum: SGD momentum (0 disables the buffers).
        trust_coefficient: Factor of the trust ratio ``||w|| / (||d|| + eps)``.
        eps: Added to the norm of the decayed gradient.
        lars_exclude: Whether these parameters skip weight decay and the trust ratio.

    Returns:
        The momentum buffers after the step (new ones included), or ``None`` when ``momentum == 0``.
    """
    # ``directions`` may alias ``grads`` until the first out-of-place op; it is never written while it does.
    directions = grads
    if weight_decay != 0:
        directions = torch._foreach_add(grads, params, alpha=weight_decay)
    if not lars_exclude:
        # One 0-d norm per tensor, stacked to (N,), in at least fp32 so that fp16/bf16 norms cannot overflow.
        norm_dtype = torch.promote_types(params[0].dtype, torch.float32)
        param_norms = torch.stack(torch._foreach_norm(params, 2, dtype=norm_dtype))
        direction_norms = torch.stack(torch._foreach_norm(directions, 2, dtype=norm_dtype))
        trust_ratios = torch.where(
            (param_norms > 0) & (direction_norms > 0),
            trust_coefficient * param_norms / (direction_norms + eps),
            torch.ones_like(param_norms),
        )
        scales = list(trust_ratios.to(params[0].dtype).unbind(0))
        if directions is grads:
            directions = torch._foreach_mul(grads, scales)
        else:
            torch._foreach_mul_(directions, scales)

    if momentum == 0:
        torch._foreach_add_(params, directions, alpha=-lr)
        return None

    # First step: buf = d, as torch.optim.SGD initialises it; afterwards buf = momentum * buf + d.
    existing = [i for i, buf in enumerate(momentum_buffers) if buf is not None]
    if existing:
        old_buffers = [momentum_buffers[i] for i in existing]
        torch._foreach_mul_(old_buffers, momentum)
        torch._foreach_add_(old_buffers, [directions[i] for i in existing])
    buffers = [buf if buf is not None else directions[i].detach().clone() for i, buf in enumerate(momentum_buffers)]
    torch._foreach_add_(params, buffers, alpha=-lr)
    return buffers


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling over SGD with momentum, as in the CLoVE reference ``contrast/lars.py``.

    Parameter groups accept the keys ``lr``, ``weight_decay``, ``momentum``, ``trust_coefficient``, ``eps`` and
    ``lars_exclude``; missing keys take the constructor's values, except that a group with ``lars_exclude=True``
    gets ``weight_decay=0`` (an excluded group with a non-zero weight decay is an error). Build the groups of the
    reference with :func:`param_groups_for_lars`. The training loop may overwrite ``group["lr"]`` before each step.

    Optimizer state is one ``momentum_buffer`` per parameter (the key ``torch.optim.SGD`` uses), so
    ``state_dict``/``load_state_dict``, ``torch.amp.GradScaler`` and accelerate's ``AcceleratedOptimizer`` work as for
    any ``torch.optim.Optimizer``. ``.grad`` is read, never modified (see the module docstring).

    Args:
        params: Parameters or parameter groups (dicts with a ``params`` entry).
        lr: Learning rate of every group that does not set its own; the recipe sets it per step from
            :func:`clove_timm.schedules.learning_rate`.
        weight_decay: Weight decay of the groups not excluded from LARS; no default on purpose. The recipe of
            record uses 2e-5 (method doc section 5, reference ``tools/clove_base_r50_400ep.sh``).
        momentum: SGD momentum, in ``[0, 1)``; 0.9 (reference ``--momentum``).
        trust_coefficient: Trust coefficient of the layer-wise ratio; 0.001 (reference ``LARS(trust_coef=0.001)``).
        eps: Added to the gradient norm in the ratio; 1e-8 (reference ``LARS(eps=1e-8)``).

    Raises:
        TypeError: If a hyperparameter is not a number or ``lars_exclude`` is not a bool.
        ValueError: If a hyperparameter is negative or not finite, ``momentum >= 1``, or an excluded group has
            weight decay.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float,
        momentum: float = 0.9,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_exclude": False,
        }
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group; an excluded group without ``weight_decay`` gets 0 rather than the default.

        Args:
            param_group: Dict with ``params`` and optionally any of the per-group hyperparameters.

        Raises:
            TypeError, ValueError: If the group's hyperparameters (after filling in defaults) are invalid.
        """
        if param_group.get("lars_exclude", False) is True:
            param_group.setdefault("weight_decay", 0.0)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"LARS does not support complex parameters (got one of shape {tuple(p.shape)})")
        except (KeyError, TypeError, ValueError):
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Performs one optimisation step on every parameter that has a gradient.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None`` without a closure.

        Raises:
            RuntimeError: If a gradient is sparse.
            TypeError, ValueError: If a group's hyperparameters were set to invalid values.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            _check_group(group)
            # Foreach kernels need tensors on one device with one dtype.
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"LARS does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                        "use dense gradients, e.g. nn.Embedding(sparse=False)"
                    )
                buckets.setdefault((p.device, p.dtype), []).append(p)

            for params in buckets.values():
                buffers = _lars_update(
                    params,
                    [p.grad for p in params],
                    [self.state[p].get("momentum_buffer") for p in params],
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    trust_coefficient=group["trust_coefficient"],
                    eps=group["eps"],
                    lars_exclude=group["lars_exclude"],
                )
                if buffers is not None:
                    for p, buf in zip(params, buffers, strict=True):
                        self.state[p]["momentum_buffer"] = buf
        return loss


def param_groups_for_lars(
    model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
    *,
    skip_names: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Splits trainable parameters into the two LARS groups of the reference ``add_weight_decay``.

    Tensors with ``ndim <= 1`` (BatchNorm weights, biases) and those named in ``skip_names`` go to a group with
    ``lars_exclude=True`` and ``weight_decay=0``; all others to a group with ``lars_exclude=False`` and
    ``weight_decay``. Parameters with ``requires_grad=False`` (a frozen teacher) are left out. The excluded group
    comes first, as in the reference, so group indices (and optimizer state dicts) line up with it.

    Deviation from the reference: it tests ``ndim == 1``, which would put a 0-d parameter (a learnable scalar such
    as a temperature) under weight decay and the trust ratio; here it is excluded like a bias. The CLoVE model has
    no 0-d parameters, so the groups are the reference's.

    Args:
        model_or_named_params: A module, or ``(name, parameter)`` pairs such as ``module.named_parameters()``.
        weight_decay: Weight decay of the non-excluded group (recipe: 2e-5, method doc section 5).
        skip_names: Further parameter names to exclude (reference ``skip_list``); each must name a parameter.

    Returns:
        ``[{"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
        {"params": others, "weight_decay": weight_decay, "lars_exclude": False}]``, either list possibly empty.

    Raises:
        TypeError: If an item is not a ``(str, tensor)`` pair.
        ValueError: If ``weight_decay`` is invalid, a name repeats, a name in ``skip_names`` matches no parameter,
            or there is no trainable parameter at all.
    """
    _check_number("weight_decay", weight_decay, low=0.0)
    if isinstance(model_or_named_params, nn.Module):
        named_params = list(model_or_named_params.named_parameters())
    else:
        named_params = list(model_or_named_params)
    skip = set(skip_names)

    excluded: list[torch.Tensor] = []
    others: list[torch.Tensor] = []
    seen: set[str] = set()
    for item in named_params:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"expected (name, parameter) pairs, got {item!r:.80}")
        name, param = item
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(param).__name__}, not a tensor")
        if name in seen:
            raise ValueError(f"parameter name {name!r} appears twice")
        seen.add(name)
        if not param.requires_grad:
            skip.discard(name)
            continue
        if param.ndim <= 1 or name in skip:
            excluded.append(param)
            skip.discard(name)
        else:
            others.append(param)

    if skip:
        raise ValueError(f"skip_names not found among the parameters: {sorted(skip)}")
    if not excluded and not others:
        raise ValueError("no trainable parameters (all have requires_grad=False or none were given)")
    _logger.debug("LARS groups: %d tensors excluded, %d tensors with trust ratio", len(excluded), len(others))
    return [
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
        {"params": others, "weight_decay": float(weight_decay), "lars_exclude": False},
    ]
