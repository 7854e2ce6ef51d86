"""Public functional ops (the names other code relies on)."""
from tempsoft.ops.cross_entropy import cross_entropy, log_softmax, softmax

__all__ = ["cross_entropy", "softmax", "log_softmax"]
