"""tempsoft: fused temperature-scaled softmax cross-entropy and adversarial attacks.

    >>> import tempsoft
    >>> loss = tempsoft.cross_entropy(logits, labels, T=2.0)   # == F.cross_entropy(logits / 2, labels)
"""
from tempsoft._dispatch import backends as _backend_table
from tempsoft.functional import cross_entropy, log_softmax, softmax
from tempsoft.nn import TemperatureCrossEntropyLoss

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
    "backends",
    "Availability",
    "__version__",
]
