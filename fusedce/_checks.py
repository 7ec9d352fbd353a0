"""The argument checks of every public function, in one place.

Each public function (fusedce/functional.py, fusedce/terms.py) runs its checks here BEFORE it
routes a call to the single-process op or to the vocab-parallel layer (fusedce/_parallel.py),
so both paths accept and refuse the same arguments with the same errors. The one check that
needs the whole vocabulary, the range of the targets, is made by the C++ ops on the single-process
path and by `check_global_targets` on the sharded path, where the global vocabulary size is only
known once the shards' sizes are combined. Every error names the public argument.
"""

from __future__ import annotations

import math
import numbers

import torch

from .validation import validation_enabled

_REDUCTIONS = ("mean", "sum", "none")
_INT64 = torch.iinfo(torch.int64)


def _check_tensor(x, name: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fusedce: {name} must be a torch.Tensor, got {type(x).__name__}")


def _check_float(x: torch.Tensor, name: str):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"fusedce: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str):
    if x.device != ref.device:
        raise ValueError(f"fusedce: {name} is on {x.device} but {ref_name} is on {ref.device}")


def _check_finite(value, name: str) -> float:
    # The common case first: a Python float or int (not bool: type() is exact), without the
    # slower isinstance checks against the numbers ABCs.
    if (type(value) is float or type(value) is int) and -math.inf < value < math.inf:
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"fusedce: {name} must be a finite number, got {value!r}")
    # A chained comparison rather than math.isfinite: it also traces under
    # torch.compile(dynamic=True), where the knob may be a symbolic float. False for nan.
    if not -math.inf < value < math.inf:
        raise ValueError(f"fusedce: {name} must be a finite number, got {value!r}")
    return value


def _check_nonnegative(value, name: str):
    _check_finite(value, name)
    if value < 0:
        raise ValueError(f"fusedce: {name} must be >= 0, got {value}")
    return value


def _check_positive(value, name):
    _check_finite(value, name)
    if not value > 0:
        raise ValueError(f"fusedce: {name} must be > 0, got {value!r}")
    return float(value)


def _check_softcap(softcap):
    if softcap is not None:
        _check_finite(softcap, "softcap")
        if softcap <= 0:
            raise ValueError(f"fusedce: softcap must be > 0 (or None for no softcap), got {softcap}")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fusedce: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_label_smoothing(label_smoothing):
    _check_finite(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fusedce: label_smoothing must be in [0, 1], got {label_smoothing}")


def _check_scalars(reduction, label_smoothing, z_loss, softcap, logit_scale):
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    _check_nonnegative(z_loss, "z_loss")
    _check_softcap(softcap)
    _check_finite(logit_scale, "logit_scale")


def _check_ignore_index(ignore_index, name: str = "ignore_index") -> int:
    """None means HF's -100. The ops take an int64: anything else is refused here by name."""
    if ignore_index is None:
        return -100
    if type(ignore_index) is int and _INT64.min <= ignore_index <= _INT64.max:
        return ignore_index  # the common case, before the slower isinstance checks below
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"fusedce: {name} must be an int (or None for -100), got {ignore_index!r}")
    if isinstance(ignore_index, numbers.Integral) and not _INT64.min <= ignore_index <= _INT64.max:
        raise ValueError(f"fusedce: {name} must fit in int64 [{_INT64.min}, {_INT64.max}], got {ignore_index}")
    return ignore_index


def _check_vocab_start(vocab_start, process_group):
    """vocab_start: None, or this rank's first global class id on the vocab-parallel path. A float
    or a string would be truncated / parsed by int() and used; without process_group it would be
    ignored, the call running on the whole vocabulary the caller thinks is a shard."""
    if vocab_start is None:
        return
    if process_group is None:
        raise ValueError(
            f"fusedce: vocab_start={vocab_start!r} is given without process_group: vocab_start is this "
            "rank's first vocabulary id on the vocab-parallel path (pass process_group=, or drop vocab_start)"
        )
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"fusedce: vocab_start must be an int (or None), got {vocab_start!r}")
    if isinstance(vocab_start, numbers.Integral) and not 0 <= vocab_start <= _INT64.max:
        raise ValueError(f"fusedce: vocab_start must be >= 0, got {vocab_start}")


def _fits(dtype: torch.dtype, value) -> bool:
    """Whether the int `value` is representable in the integer `dtype` (a traced int: assumed)."""
    if dtype == torch.int64 or not isinstance(value, numbers.Integral):
        return True
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def _not_ignored(target: torch.Tensor, ignore_index) -> torch.Tensor:
    """target != ignore_index compared as int64, as the C++ ops compare (they widen the target):
    an int32 target never equals an ignore_index outside the int32 range, so nothing is ignored.
    (Comparing in the int32 dtype would wrap the ignore_index and count the wrong tokens.)"""
    if not _fits(target.dtype, ignore_index):
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _check_target(target, leading: torch.Size, ref: torch.Tensor, ref_name: str, name: str = "target"):
    _check_tensor(target, name)
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fusedce: {name} must hold int64 or int32 class indices, got {target.dtype}")
    if target.shape != leading:
        raise ValueError(
            f"fusedce: {name} must have shape {tuple(leading)} (the leading dimensions of "
            f"{ref_name}), got {tuple(target.shape)}"
        )
    _check_device(target, name, ref, ref_name)


def _check_class_weight(weight, vocab: int, ref: torch.Tensor, ref_name: str):
    if weight is None:
        return
    _check_tensor(weight, "weight")
    _check_float(weight, "weight")
    if weight.shape != (vocab,):
        raise ValueError(f"fusedce: weight (class weights) must have shape ({vocab},), got {tuple(weight.shape)}")
    _check_device(weight, "weight", ref, ref_name)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("fusedce: weight (class weights) cannot require grad: the loss is not differentiated with respect to it")


def _check_gathered(x, name: str):
    """DeepSpeed ZeRO-3 leaves a partitioned parameter as a [0]-shaped placeholder (ds_shape holds
    its real shape) outside its module's forward."""
    if hasattr(x, "ds_shape") and isinstance(x, torch.Tensor) and x.numel() == 0:
        raise ValueError(
            f"fusedce: {name} is a DeepSpeed ZeRO-3 partitioned parameter (shape {tuple(x.shape)}, "
            f"full shape {tuple(x.ds_shape)}): it is gathered only inside its module's forward. "
            "Compute the loss through the head module with fusedce.integrations.head_loss(head, "
            "input, target, ...) (the transformers integration does so), or gather it with "
            "deepspeed.zero.GatheredParameters.")


def _check_head(input, linear_weight, linear_bias, input_name="input", weight_name="linear_weight",
                vocab_shard=False):
    """input [..., H], linear_weight [V, H], linear_bias [V]: returns (V, H). `vocab_shard`: the
    weight is one rank's vocabulary shard (process_group given), which may be empty when the
    vocabulary is split over more ranks than it has rows; refusing it on that rank alone would
    leave the others waiting in a collective."""
    _check_tensor(input, input_name)
    _check_tensor(linear_weight, weight_name)
    _check_gathered(linear_weight, weight_name)
    _check_gathered(linear_bias, weight_name.replace("weight", "bias"))
    _check_float(input, input_name)
    _check_float(linear_weight, weight_name)
    if input.dim() < 1:
        raise ValueError(f"fusedce: {input_name} must have shape [..., H], got a 0-d tensor")
    if linear_weight.dim() != 2:
        raise ValueError(f"fusedce: {weight_name} must be 2-D [V, H], got shape {tuple(linear_weight.shape)}")
    V, H = linear_weight.shape
    if input.shape[-1] != H:
        raise ValueError(
            f"fusedce: {input_name} has hidden size {input.shape[-1]} but {weight_name} is "
            f"{tuple(linear_weight.shape)} (expected [V, {input.shape[-1]}])"
        )
    if V == 0 and not vocab_shard:
        raise ValueError(f"fusedce: {weight_name} must have at least one row (V > 0)")
    if H == 0:
        # F.linear would give all-zero logits (the bias alone); a head without features is
        # almost surely a mistake (an unsharded placeholder, a wrong slice), so it is refused.
        raise ValueError(f"fusedce: {input_name} and {weight_name} have hidden size H = 0; the head needs H > 0")
    if input.dtype != linear_weight.dtype:
        hint = ""
        if torch.is_autocast_enabled(input.device.type):
            # F.linear would cast both to the autocast dtype; the fused ops take their operands
            # as given (a float32 head computes in float32), so the mismatch surfaces here.
            hint = (" (autocast does not apply to fusedce's functions: cast both to one dtype, or "
                    "compute the loss through the head module with "
                    "fusedce.integrations.head_loss(head, input, target, ...), which casts them "
                    "as F.linear does under autocast)")
        raise TypeError(f"fusedce: {input_name} is {input.dtype} but {weight_name} is "
                        f"{linear_weight.dtype}; they must match{hint}")
    _check_device(linear_weight, weight_name, input, input_name)
    if linear_bias is not None:
        bias_name = weight_name.replace("weight", "bias")
        _check_tensor(linear_bias, bias_name)
        if linear_bias.shape != (V,):
            raise ValueError(f"fusedce: {bias_name} must have shape ({V},), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"fusedce: {bias_name} is {linear_bias.dtype} but {input_name} is {input.dtype}")
        _check_device(linear_bias, bias_name, input, input_name)
    return V, H


def _check_num_items(num_items_in_batch, name="num_items_in_batch"):
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"fusedce: {name} must be a single number, got shape {tuple(num_items_in_batch.shape)}"
            )
        # A CUDA value is not read back (that would synchronize); a CPU one is checked, except
        # a batched one under torch.vmap (one count per sample: vmap refuses .item()).
        if (num_items_in_batch.device.type == "cpu" and not torch.compiler.is_compiling()
                and not torch._C._functorch.is_functorch_wrapped_tensor(num_items_in_batch)):
            value = num_items_in_batch.item()
        else:
            return
    else:
        value = num_items_in_batch
    # A chained comparison, not math.isfinite: under torch.compile an int that changes between
    # calls (or dynamic=True) is a symbolic int, which math.isfinite cannot take. False for nan.
    if (isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))
            or not 0 < value < math.inf):
        raise ValueError(f"fusedce: {name} must be a finite number > 0, got {value!r}")


def _check_chunk(value, name: str):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"fusedce: {name} must be a positive int or None, got {value!r}")


def _under_vmap() -> bool:
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)


def host_target_check(device: torch.device) -> bool:
    """Whether a target range check may read the device on the host: always on the CPU (free
    there). On CUDA only in the opt-in validation mode (fusedce.validation: validate_targets() /
    FUSEDCE_VALIDATE=1), so that a default CUDA call makes no host sync; never inside a compiled
    graph (a host read there is a graph break; the C++ op still checks in validation mode, at run
    time). Never under torch.vmap either: a host read of a batched tensor is a data-dependent
    branch vmap refuses; the op checks each sample's targets itself (on the CPU it raises)."""
    if not torch.compiler.is_compiling() and _under_vmap():  # dynamo cannot trace the stack read
        return False
    if device.type == "cpu":
        return True
    if torch.compiler.is_compiling():
        return False
    return validation_enabled()


def check_global_targets(target: torch.Tensor, vocab: torch.Tensor, valid: torch.Tensor, offset: int,
                         name: str = "target", ignore_desc: str = ""):
    """The sharded path's target range check, against the GLOBAL vocabulary size `vocab` (the sum
    of the shards' sizes; a 0-d or per-row tensor, the same on every rank). `valid` marks the rows
    that must hold a class id. Every rank holds the same targets and sizes, so every rank raises
    the same error at the same point: the collectives stay matched. Like the single-process op's
    own check, it reads one flag on the host (skipped while a CUDA graph is being captured)."""
    if target.numel() == 0 or torch.compiler.is_compiling():
        return
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = valid & ((target < 0) | (target >= vocab))
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    V = int(vocab.reshape(-1)[0]) if isinstance(vocab, torch.Tensor) else int(vocab)
    # RuntimeError and the wording of the C++ ops' check, so both paths fail alike.
    raise RuntimeError(f"fusedce: {name}[{offset + i}] = {int(target[i])} is outside [0, {V}){ignore_desc}")


def _check_autodiff(fn: str, *tensors):
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) and torch.func.grad /
    jacrev: the C++ ops define no tangent formula and are not functorch-transformable, so their
    outputs would carry a zero tangent (forward AD falls through to the kernel and drops the
    dual part) or fail deep inside functorch. Refuse them by name. torch.vmap batches through
    the ops correctly and is allowed; reverse mode (loss.backward(), torch.autograd.grad) is the
    supported way to differentiate."""
    if torch.compiler.is_compiling():
        return
    stack = torch._C._functorch.get_interpreter_stack() or ()
    for interpreter in stack:
        key = interpreter.key()
        if key == torch._C._functorch.TransformType.Jvp:
            raise NotImplementedError(
                f"fusedce: {fn} does not support forward-mode AD (torch.func.jvp / jacfwd / hessian); "
                "use reverse mode (loss.backward(), torch.autograd.grad)")
        if key == torch._C._functorch.TransformType.Grad:
            raise NotImplementedError(
                f"fusedce: {fn} does not support torch.func.grad / vjp / jacrev; use "
                "loss.backward() or torch.autograd.grad")
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", 0) < 0:  # no dual_level open: nothing can be dual
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"fusedce: {fn} does not support forward-mode AD (a dual tensor from "
                "torch.autograd.forward_ad); use reverse mode (loss.backward(), torch.autograd.grad)")
