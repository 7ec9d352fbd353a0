"""``fusedce.nn``: the loss modules (defined in fusedce/modules.py)."""

from .modules import FusedLMHeadLoss, LinearCrossEntropyLoss

__all__ = ["FusedLMHeadLoss", "LinearCrossEntropyLoss"]
