"""tempsoft: fused temperature-scaled softmax cross-entropy and adversarial attacks.

    >>> import tempsoft
    >>> loss = tempsoft.cross_entropy(logits, labels, T=2.0)   # == F.cross_entropy(logits / 2, labels)
"""
from tempsoft._dispatch import backends as _backend_table
from tempsoft.functional import cross_entropy, log_softmax, softmax
from tempsoft.nn import TemperatureCrossEntropyLoss
from tempsoft.ops.pgd import pgd_step_, random_start
from tempsoft.cpu_cache import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from tempsoft import attacks  # noqa: E402  (after the ops it uses)

__version__ = "0.1.0"


class Availability:
    """Whether a backend can run here: truthy when it can, with ``.reason`` when it cannot."""

    __slots__ = ("available", "reason")

    def __init__(self, available: bool, reason: str = "") -> None:
        self.available = bool(available)
        self.reason = reason

    def __bool__(self) -> bool:
        return self.available

    def __eq__(self, other) -> bool:
        if isinstance(other, Availability):
            return self.available == other.available
        return self.available == other

    def __hash__(self) -> int:
        return hash(self.available)

    def __repr__(self) -> str:
        return "True" if self.available else f"False ({self.reason})"


def check_errors() -> None:
    """Raise the IndexError for a bad target that a GPU kernel recorded, and clear it.

    Only needed with TEMPSOFT_DEFERRED_CHECKS=1 (without it every call checks its targets).
    Waits for the kernels queued so far: the CUDA kernels' records (also raised by the next
    CUDA call) and the Triton kernels' (raised only here).
    """
    import sys

    import torch

    if _backend_table()["cuda"][0]:
        from tempsoft._dispatch import native_ops

        native_ops().check_errors(True)
        torch.cuda.synchronize()
    triton_ce = sys.modules.get("tempsoft.kernels.triton_ce")  # no record before it is used
    if triton_ce is not None:
        triton_ce.raise_recorded_errors()


def backends() -> dict:
    """Backend name -> availability (truthy or not), with the reason when it cannot run.

    Example: ``{'cpu': True, 'cuda': False (not built (torch has no CUDA)), 'triton': ...,
    'torch': True}``; ``bool(tempsoft.backends()["cuda"])`` says whether it can run.
    """
    return {name: Availability(ok, why) for name, (ok, why) in _backend_table().items()}


__all__ = [
    "cross_entropy",
    "softmax",
    "log_softmax",
    "TemperatureCrossEntropyLoss",
    "pgd_step_",
    "random_start",
    "attacks",
    "backends",
    "check_errors",
    "cpu_cache_info",
    "empty_cpu_cache",
    "set_cpu_cache_limit",
    "Availability",
    "__version__",
]
