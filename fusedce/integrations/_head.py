"""Running a fused head loss inside the head module's own call.

Wrappers of a module act around its call: FSDP2/FSDP1 gather the weight in a forward pre-hook,
free it in a post-hook and reduce its gradient from hooks that the post-hook puts on the outputs;
DeepSpeed ZeRO-3 gathers the partitioned parameters the same way; accelerate's offload hooks load
the weights around the call. A loss that reads ``head.weight`` outside that call sees a shard, a
[0]-shaped placeholder or an offloaded tensor. So the loss is computed by calling the module:
``head(hidden)`` runs with every hook, and its ``F.linear(x, weight, bias)`` (the one call that
would have produced the logits) is answered with the fused loss computed from the very ``x``,
``weight`` and ``bias`` it was given (after the wrapper's casts). The loss is the module's output,
so the wrappers' backward hooks are attached to it: a recomputing backward finds the weight
gathered again before it runs.

The override is a torch function mode: per call and per thread (the mode stack is thread-local),
nothing on the module changes. Where a library has replaced ``F.linear`` itself (DeepSpeed ZeRO-3),
that replacement is wrapped by a thread-aware pass-through (``_wrap_replaced_linear``).
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.overrides import TorchFunctionMode

from .. import functional

_LINEAR = torch._C._nn.linear


_TLS = threading.local()
_SHIM_LOCK = threading.Lock()


class _LinearOverride(TorchFunctionMode):
    """Answers the first ``F.linear`` whose weight is ``linear.weight`` (as the module holds it at
    that moment) with ``compute(x, weight, bias)``; every other call runs as usual."""

    def __init__(self, linear, compute):
        super().__init__()
        self.linear = linear
        self.compute = compute
        self.done = False

    def claims(self, weight) -> bool:
        return not self.done and weight is getattr(self.linear, "weight", None)

    def answer(self, x, w, b):
        self.done = True
        return self.compute(x, w, b)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR or func is torch.nn.functional.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if self.claims(w):
                return self.answer(x, w, b)
        return func(*args, **kwargs)


def _wrap_replaced_linear():
    """A library may have replaced ``torch.nn.functional.linear`` by a Python function that the
    function mode cannot see (DeepSpeed ZeRO-3's memory-efficient linear does, for good). Such a
    replacement is wrapped once by a pass-through that answers only this thread's fusedce head
    call and otherwise calls the replacement."""
    with _SHIM_LOCK:
        current = torch.nn.functional.linear
        if current is _LINEAR or getattr(current, "_fusedce_passthrough", False):
            return

        @functools.wraps(current)
        def linear(input, weight, bias=None):
            override = getattr(_TLS, "override", None)
            if override is not None and override.claims(weight):
                return override.answer(input, weight, bias)
            return current(input, weight, bias)

        linear._fusedce_passthrough = True
        torch.nn.functional.linear = linear


def _cast_like_linear(x, w, b):
    """What F.linear does under autocast: the three operands in the autocast dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x, w = x.to(dt), w.to(dt)
        b = None if b is None else b.to(dt)
    return x, w, b


def call_head(head: torch.nn.Module, hidden: torch.Tensor, compute, linear=None):
    """``head(hidden)`` with the ``F.linear(x, weight, bias)`` of ``linear`` (the head itself, or
    the linear layer a wrapper module holds) replaced by ``compute(x, weight, bias)`` (operands
    cast as autocast casts F.linear's); returns what the module's call returns (compute's result,
    through the module's hooks)."""
    def run(x, w, b):
        return compute(*_cast_like_linear(x, w, b))

    _wrap_replaced_linear()
    mode = _LinearOverride(head if linear is None else linear, run)
    previous = getattr(_TLS, "override", None)
    _TLS.override = mode
    try:
        with mode:
            out = head(hidden)
    finally:
        _TLS.override = previous
    if not mode.done:
        raise RuntimeError(
            f"fusedce: calling the head ({type(head).__name__}) did not reach "
            "torch.nn.functional.linear(input, head.weight, head.bias), so the fused loss was not "
            "computed; the head must be a linear layer whose forward calls F.linear with its own weight")
    return out


def head_loss(head: torch.nn.Module, input: torch.Tensor, target: torch.Tensor, *, function=None,
              **kwargs):
    """A fused head loss computed through the head module's own call, so that whatever wraps it
    (FSDP2 ``fully_shard``, FSDP1, DeepSpeed ZeRO-3, accelerate offload hooks) gathers its weight
    and reduces its gradient exactly as for ``head(input)``.

    ``head`` is an ``nn.Linear`` (possibly wrapped), ``input`` its input [..., H], ``target`` the
    third argument of ``function`` (default :func:`fusedce.linear_cross_entropy`; also
    :func:`fusedce.token_logprobs`, :func:`fusedce.distillation_loss`, :func:`fusedce.policy_loss`
    with their other arguments by keyword). Returns what ``function(x, weight, target,
    linear_bias=bias, **kwargs)`` returns, where ``x``, ``weight`` and ``bias`` are what the head's
    forward would have passed to ``F.linear``. Under autocast the operands are cast as F.linear
    casts them.
    """
    if function is None:
        function = functional.linear_cross_entropy
    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"fusedce: head must be a torch.nn.Module (the head layer), got {type(head).__name__}")
    if "linear_bias" in kwargs:
        raise TypeError("fusedce: head_loss takes the bias from the head module; do not pass linear_bias")
    return call_head(head, input, lambda x, w, b: function(x, w, target, linear_bias=b, **kwargs))
