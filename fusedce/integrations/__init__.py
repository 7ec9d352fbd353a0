"""Integrations of fusedce into other libraries (imported on demand: each one imports its library).

:func:`head_loss` (torch only) computes a fused head loss through the head module's own call, so
that the wrappers of the head (FSDP2, FSDP1, DeepSpeed ZeRO-3, offload hooks) act on it."""

from ._head import head_loss

__all__ = ["head_loss"]
