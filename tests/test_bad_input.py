"""Every misuse gets a clear error naming the argument (DESIGN.md, "Bad input").

Each test starts from a valid call and breaks one thing. Both public functions are checked where
the argument exists in both, and the raw ops are checked where a bad value could otherwise make
the C++ kernel read or write out of bounds.
"""

import math

import pytest
import torch

import fusedce

N, H, V = 5, 4, 7
ERRORS = (ValueError, RuntimeError, TypeError, IndexError)


def lce_args(device="cpu", dtype=torch.float32):
    """A valid fusedce.linear_cross_entropy call: (args, kwargs)."""
    x = torch.randn(N, H, device=device, dtype=dtype)
    w = torch.randn(V, H, device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), device=device)
    return [x, w, t], {}


def ce_args(device="cpu", dtype=torch.float32):
    """A valid fusedce.cross_entropy call: (args, kwargs)."""
    return [torch.randn(N, V, device=device, dtype=dtype), torch.randint(0, V, (N,), device=device)], {}


FUNCTIONS = {
    "linear_cross_entropy": (fusedce.linear_cross_entropy, lce_args),
    "cross_entropy": (fusedce.cross_entropy, ce_args),
}
BOTH = list(FUNCTIONS)


def call(which, device="cpu", *, change_args=None, **kwargs):
    fn, make = FUNCTIONS[which]
    args, base = make(device)
    if change_args:
        change_args(args)
    return fn(*args, **{**base, **kwargs})


def test_valid_calls_work(device):
    """The baseline that every test below breaks in one place."""
    for which in BOTH:
        assert torch.isfinite(call(which, device))


# --------------------------------------------------------------------------------------------
# target
# --------------------------------------------------------------------------------------------


def expect_bad_target(device, run, nan_of=lambda out: out):
    """An out-of-range target: the clear error in validation mode on every device, and always on
    the CPU; by default on CUDA a NaN loss instead (no host sync; fusedce/validation.py)."""
    with fusedce.validate_targets(), pytest.raises(ERRORS, match="target"):
        run()
    if device == "cpu":
        with pytest.raises(ERRORS, match="target"):
            run()
    else:
        assert torch.isnan(nan_of(run())).all()


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize(
    "bad",
    [
        V,  # one past the last class
        -1,  # negative, and not the ignore_index (-100)
        2**40,  # far out: would be an out-of-bounds read/write if not checked
    ],
)
def test_target_out_of_range(device, which, bad):
    def change(args):
        args[-1][2] = bad

    expect_bad_target(device, lambda: call(which, device, change_args=change))


@pytest.mark.parametrize("which", BOTH)
def test_target_out_of_range_with_custom_ignore_index(device, which):
    """-100 is only special when it is the ignore_index."""
    def change(args):
        args[-1][0] = -100

    expect_bad_target(device, lambda: call(which, device, change_args=change, ignore_index=-1))


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize(
    "shape",
    [
        (N + 1,),  # one token too many
        (N, 1),  # an extra trailing dimension
        (),  # a scalar
    ],
)
def test_target_shape_mismatch(device, which, shape):
    def change(args):
        args[-1] = torch.randint(0, V, shape, device=device)

    with pytest.raises(ERRORS, match="target"):
        call(which, device, change_args=change)


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,  # probabilities-style targets are not supported
        torch.int16,  # an integer type other than int64/int32
        torch.bool,  # a mask passed by mistake
    ],
    ids=str,
)
def test_target_dtype(device, which, dtype):
    def change(args):
        args[-1] = args[-1].to(dtype)

    with pytest.raises(ERRORS, match="target"):
        call(which, device, change_args=change)


# --------------------------------------------------------------------------------------------
# input / linear_weight / linear_bias / weight: shapes and dtypes
# --------------------------------------------------------------------------------------------


def test_hidden_size_mismatch(device):
    def change(args):
        args[1] = torch.randn(V, H + 1, device=device)

    with pytest.raises(ERRORS, match="linear_weight"):
        call("linear_cross_entropy", device, change_args=change)


def test_linear_weight_not_2d(device):
    def change(args):
        args[1] = torch.randn(V * H, device=device)

    with pytest.raises(ERRORS, match="linear_weight"):
        call("linear_cross_entropy", device, change_args=change)


def test_input_dtype_mismatch_with_linear_weight(device):
    def change(args):
        args[1] = args[1].double()

    with pytest.raises(ERRORS, match="linear_weight"):
        call("linear_cross_entropy", device, change_args=change)


def test_input_dtype_mismatch_under_autocast_says_so(device):
    """Under autocast the hidden states come out of the model in the autocast dtype while the head
    weight stays float32; F.linear would cast both, fusedce's functions do not. The error named
    the dtypes only: it also says that autocast does not apply and how to get its casts."""
    x, w, t = lce_args(device)[0]
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"linear_weight.*autocast.*head_loss"):
            fusedce.linear_cross_entropy(x.bfloat16(), w, t)
    with pytest.raises(TypeError) as err:  # outside autocast: the plain message
        fusedce.linear_cross_entropy(x.bfloat16(), w, t)
    assert "autocast" not in str(err.value)


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize(
    "dtype",
    [
        torch.int64,  # token ids passed instead of hidden states / logits
        torch.complex64,  # a floating-like type that is not supported
    ],
    ids=str,
)
def test_input_dtype_unsupported(device, which, dtype):
    def change(args):
        args[0] = args[0].to(dtype)

    with pytest.raises(ERRORS, match="input"):
        call(which, device, change_args=change)


@pytest.mark.parametrize(
    "bias",
    [
        lambda d: torch.randn(V + 1, device=d),  # one class too many
        lambda d: torch.randn(1, V, device=d),  # 2-D
        lambda d: torch.randn(V, device=d, dtype=torch.float64),  # dtype differs from input
    ],
    ids=["length", "2d", "dtype"],
)
def test_linear_bias_mismatch(device, bias):
    with pytest.raises(ERRORS, match="linear_bias"):
        call("linear_cross_entropy", device, linear_bias=bias(device))


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize(
    "weight",
    [
        lambda d: torch.rand(V + 1, device=d),  # one class too many
        lambda d: torch.rand(V - 1, device=d),  # one class too few (would read out of bounds)
        lambda d: torch.rand(V, 1, device=d),  # 2-D
        lambda d: torch.ones(V, device=d, dtype=torch.int64),  # integer class weights
    ],
    ids=["long", "short", "2d", "int"],
)
def test_class_weight_mismatch(device, which, weight):
    # \bweight\b: the class weights' own name, not "linear_weight".
    with pytest.raises(ERRORS, match=r"\bweight\b"):
        call(which, device, weight=weight(device))


# --------------------------------------------------------------------------------------------
# Devices: a meta tensor mixed with CPU tensors stands in for a CUDA/CPU mix on a CPU machine.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "position,name",
    [
        (1, "linear_weight"),  # the head weight on another device than the hidden states
        (2, "target"),  # the labels left on another device
    ],
)
def test_meta_tensor_mixed_with_cpu(position, name):
    def change(args):
        args[position] = args[position].to("meta")

    with pytest.raises(ERRORS, match=name) as info:
        call("linear_cross_entropy", "cpu", change_args=change)
    assert "meta" in str(info.value) and "cpu" in str(info.value), str(info.value)


def test_meta_target_mixed_with_cpu_logits():
    def change(args):
        args[1] = args[1].to("meta")

    with pytest.raises(ERRORS, match="target"):
        call("cross_entropy", "cpu", change_args=change)


@pytest.mark.parametrize("which", BOTH)
def test_meta_class_weight_mixed_with_cpu(which):
    with pytest.raises(ERRORS, match=r"\bweight\b"):
        call(which, "cpu", weight=torch.rand(V, device="meta"))


def test_meta_bias_mixed_with_cpu():
    with pytest.raises(ERRORS, match="linear_bias"):
        call("linear_cross_entropy", "cpu", linear_bias=torch.rand(V, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to mix CUDA and CPU")
@pytest.mark.parametrize(
    "position,name",
    [
        (1, "linear_weight"),  # head weight left on the CPU
        (2, "target"),  # labels left on the CPU (the most common mistake)
    ],
)
def test_cuda_cpu_mix(position, name):
    def change(args):
        args[position] = args[position].cpu()

    with pytest.raises(ERRORS, match=name):
        call("linear_cross_entropy", "cuda", change_args=change)


# --------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "logit_scale", "softcap"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])  # every non-finite kind
def test_non_finite_scalar(device, which, name, value):
    with pytest.raises(ERRORS, match=name):
        call(which, device, **{name: value})


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize("value", [-0.1, 1.5])  # below 0 and above 1
def test_label_smoothing_out_of_range(device, which, value):
    with pytest.raises(ERRORS, match="label_smoothing"):
        call(which, device, label_smoothing=value)


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize("value", ["avg", "batchmean", None])  # a typo, KL-div's, and None
def test_unknown_reduction(device, which, value):
    with pytest.raises(ERRORS, match="reduction"):
        call(which, device, reduction=value)


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize("value", [0.0, -30.0])  # zero would divide by zero; negative flips
def test_softcap_not_positive(device, which, value):
    with pytest.raises(ERRORS, match="softcap"):
        call(which, device, softcap=value)


@pytest.mark.parametrize("which", BOTH)
def test_z_loss_negative(device, which):
    with pytest.raises(ERRORS, match="z_loss"):
        call(which, device, z_loss=-1e-4)


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize(
    "value",
    [
        0,  # an empty accumulation window: division by zero
        -3,  # negative int
        torch.tensor(0),  # the tensor HF Trainer passes, zero
        torch.tensor(-2.0),  # a negative float tensor
    ],
    ids=["0", "-3", "tensor0", "tensor-2.0"],
)
def test_num_items_in_batch_not_positive(device, which, value):
    with pytest.raises(ERRORS, match="num_items_in_batch"):
        call(which, device, num_items_in_batch=value)


@pytest.mark.parametrize("name", ["chunk_size", "vocab_chunk_size"])
@pytest.mark.parametrize("value", [0, -1])  # not a usable chunk (None means automatic)
def test_chunk_sizes_not_positive(device, name, value):
    with pytest.raises(ERRORS, match=name):
        call("linear_cross_entropy", device, **{name: value})


# --------------------------------------------------------------------------------------------
# The raw ops check too: they are public (torch.ops.fusedce.*) and index memory directly.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [V, -1, 2**40])  # just past the end, negative, far out
def test_raw_loss_op_target_out_of_range(device, bad):
    x, w, t = lce_args(device)[0]
    t[1] = bad
    expect_bad_target(device, lambda: torch.ops.fusedce.loss(x, w, t), lambda out: out[1][1])


@pytest.mark.parametrize("bad", [V, -1, 2**40])  # just past the end, negative, far out
def test_raw_cross_entropy_op_target_out_of_range(device, bad):
    logits, t = ce_args(device)[0]
    t[1] = bad
    expect_bad_target(device, lambda: torch.ops.fusedce.cross_entropy(logits, t),
                      lambda out: out[0][1])


@pytest.mark.parametrize(
    "change",
    [
        lambda x, w, t: (x, torch.randn(V, H + 1, device=x.device), t),  # hidden size mismatch
        lambda x, w, t: (x, w, t[:-1]),  # target shorter than hidden
        lambda x, w, t: (x.reshape(N, H, 1), w, t),  # hidden not 2-D
    ],
    ids=["hidden_size", "target_length", "hidden_3d"],
)
def test_raw_loss_op_shape_mismatch(device, change):
    args = change(*lce_args(device)[0])
    with pytest.raises(RuntimeError):
        torch.ops.fusedce.loss(*args)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(class_weight=torch.rand(V - 1)),  # too short: would read past its end
        dict(bias=torch.rand(V - 1)),  # too short: would read past its end
    ],
    ids=["class_weight", "bias"],
)
def test_raw_loss_op_short_vectors(device, kwargs):
    x, w, t = lce_args(device)[0]
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    with pytest.raises(RuntimeError):
        torch.ops.fusedce.loss(x, w, t, **kwargs)


def test_raw_loss_op_mean_with_grad_scale(device):
    """mean=True computes its own scale: a grad_scale beside it is refused by name, by the op and
    by its fake kernel (so a traced call fails the same way)."""
    x, w, t = lce_args(device)[0]
    gs = torch.ones((), device=device)
    with pytest.raises(RuntimeError, match="mean=True or a grad_scale"):
        torch.ops.fusedce.loss(x, w, t, grad_scale=gs, mean=True)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fw, ft, fgs = (mode.from_tensor(a) for a in (x, w, t, gs))
        with pytest.raises(RuntimeError, match="mean=True or a grad_scale"):
            torch.ops.fusedce.loss(fx, fw, ft, grad_scale=fgs, mean=True)


def test_raw_cross_entropy_backward_lse_too_short(device):
    """The backward op indexes lse and grad_token_loss per row: short ones must be refused."""
    logits, t = ce_args(device)[0]
    lse, g = torch.zeros(N - 1, device=device), torch.ones(N - 1, device=device)
    with pytest.raises(RuntimeError):
        torch.ops.fusedce.cross_entropy_backward(logits, t, None, lse, g)
