"""What the pretraining loop does about faults: preemption signals, non-finite values, skipped steps.

See ``training/pretrain.py`` for where each is used and ``docs/reliability.md`` for how each is tested.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable

import torch

_logger = logging.getLogger(__name__)

NONFINITE_WHAT = ("loss", "gradients", "batch-norm statistics")
"""What the loop's non-finite flags are about, in the order of its guard vector."""


class NonFiniteLossError(RuntimeError):
    """A loss, gradient or BatchNorm statistic became NaN or infinite; the run stops before the bad step touches
    any weight (``nonfinite_loss=stop``).

    Attributes:
        step: the optimizer step at which every process stopped.
    """

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class SkippedStepsError(RuntimeError):
    """``max_skipped_steps_in_row`` optimizer steps in a row were skipped; the run is not training any more."""


class StopRequest:
    """Context manager that turns preemption signals into a flag the loop agrees on at step boundaries.

    The handler only sets :attr:`requested`; the loop all-reduces it with the step's guard, so every process stops
    after the same step. Handlers are installed on entry and the previous ones restored on exit; signal handlers
    can only be set from the main thread, so elsewhere (a notebook thread) signals keep their default action.

    Args:
        signal_names: names of the signals, e.g. ``("SIGTERM", "SIGUSR1")``.
    """

    def __init__(self, signal_names: Iterable[str]) -> None:
        self.signals = [signal.Signals[name] for name in signal_names]
        self.requested = False
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def __enter__(self) -> StopRequest:
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            _logger.warning("not in the main thread: %s keep their default action", [s.name for s in self.signals])
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def any_nonfinite(tensors: Iterable[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """0-dim float on ``device``: 1.0 when any element of the floating-point ``tensors`` is NaN or infinite.

    One foreach max-abs pass (the inf-norm cannot overflow the way a sum of squares can), no host synchronization.
    """
    floats = [t.detach() for t in tensors if t is not None and t.is_floating_point()]
    if not floats:
        return torch.zeros((), device=device)
    norms = torch.stack([n.float() for n in torch._foreach_norm(floats, float("inf"))])
    return (~torch.isfinite(norms).all()).float().to(device)
