"""Reading a *ForCausalLM forward's source and building its fused twin.

The patched forward is the stock forward's own code, recompiled with five calls swapped in:

    logits = self.lm_head(ARG)             ->  logits = _fce_head(_fce_state, self.lm_head, ARG)
    logits = logits * S  (or / S)          ->  logits = _fce_scale(_fce_state, logits, S, divide)
    softcap block (x / c, tanh, * c)       ->  logits = _fce_softcap(_fce_state, logits, c)
    self.loss_function(logits, labels,...) ->  _fce_loss(_fce_state, self.loss_function, logits, labels, ...)
    logits in the returned output          ->  _fce_out(_fce_state, logits)

With ``_fce_state.fused`` false (or None) every helper does exactly what the replaced expression did,
so the stock path is the stock code. With it true, ``_fce_head`` keeps the head's input and returns a
zero-stride placeholder of the logits' shape (no memory), the transforms only record their constants,
``_fce_loss`` calls the head on the kept input with its ``F.linear`` answered by fusedce's loss
(``fusedce.integrations._head.call_head``: the head's wrappers, FSDP, ZeRO-3, offload hooks, act as
for the logits), and the output carries ``logits=None``. Everything else (backbone call, router auxiliary loss, output
class) runs as written. A forward whose code between the head and the loss is not one of the
recognised forms is refused with the reason.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
import warnings

import torch
from torch import nn

from ... import functional as F_
from .._head import call_head

_DOC_DECORATORS = {
    "auto_docstring", "add_start_docstrings", "add_start_docstrings_to_model_forward",
    "replace_return_docstrings", "add_code_sample_docstrings",
}
_NOOP_METHODS = {"float", "contiguous"}
_TANH = {"torch.tanh", "nn.functional.tanh", "torch.nn.functional.tanh", "F.tanh"}


class Refused(Exception):
    """The class is left stock; the message says why."""


# ---------------------------------------------------------------------------------------------
# Runtime helpers (closure variables of the recompiled forward)
# ---------------------------------------------------------------------------------------------


class FusedState:
    """Per-call state of one patched forward."""

    __slots__ = ("fused", "hidden", "head", "placeholder", "scale", "softcap", "loss_done")

    def __init__(self, fused: bool):
        self.fused = fused
        self.hidden = None
        self.head = None
        self.placeholder = None
        self.scale = 1.0
        self.softcap = None
        self.loss_done = False


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _active(state) -> bool:
    return state is not None and state.fused


def _modules_to_save_target(wrapper):
    """The module a PEFT ModulesToSaveWrapper's forward calls now (its forward's own choice): the
    trainable copy of the active adapter, or the original module when the adapters are disabled or
    none is active. Should PEFT choose otherwise, call_head finds no F.linear with this module's
    weight and raises: never a loss from the wrong head."""
    active = list(getattr(wrapper, "active_adapters", None) or [])
    known = wrapper.__dict__.get("_adapters", set(wrapper.modules_to_save.keys()))
    if getattr(wrapper, "disable_adapters", False) or not active or any(a not in known for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _linear_of(head):
    """The nn.Linear inside the head: the head itself, the module an FSDP1
    (FullyShardedDataParallel) wrapper holds, whose forward calls it unchanged, or the one a PEFT
    ModulesToSaveWrapper (``modules_to_save=["lm_head"]``) calls."""
    inner = head
    while True:
        if type(inner).__name__ == "FullyShardedDataParallel" and hasattr(inner, "_fsdp_wrapped_module"):
            inner = inner._fsdp_wrapped_module
        elif ("modules_to_save" in inner._modules
              # by its class or a base: FSDP2's fully_shard subclasses it (FSDPModulesToSaveWrapper)
              and any(c.__name__ == "ModulesToSaveWrapper" for c in type(inner).__mro__)):
            inner = _modules_to_save_target(inner)
        else:
            break
    if type(inner).forward is not nn.Linear.forward:
        raise RuntimeError(
            f"fusedce: the language-model head is a {type(inner).__module__}.{type(inner).__qualname__}, "
            "not a plain torch.nn.Linear (a LoRA or another adapter on the head?): fusedce cannot fold it "
            "into the fused loss. Leave the head out of the adapter's target_modules (PEFT also wraps a "
            "tied head for trainable_token_indices; modules_to_save=['lm_head'] is supported), or run "
            "the stock forward with skip_logits=False.")
    return inner


def _classes(linear):
    """The number of logits the head's F.linear produces: the rows of its weight (a DTensor's
    global shape), not out_features, which PEFT's tied head copy (ensure_weight_tying) leaves at
    H: an nn.Linear(V, H) given the [V, H] embedding weight. Where the weight is not held whole
    outside the call (a ZeRO-3 placeholder, FSDP1's flat views) out_features is all there is."""
    w = getattr(linear, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] > 0:
        return w.shape[0]
    return linear.out_features


def _fce_head(state, head, x):
    if not _active(state):
        return head(x)
    linear = _linear_of(head)
    if state.head is not None:
        raise RuntimeError("fusedce: the head was called twice in one forward")
    state.hidden = x
    state.head = head
    state.placeholder = x.new_zeros(()).expand(*x.shape[:-1], _classes(linear))
    return state.placeholder


def _check_placeholder(state, x, what):
    if x is not state.placeholder:
        raise RuntimeError(f"fusedce: {what} got a tensor that is not the head's output")


def _fce_noop(state, x, method):
    if not _active(state):
        return getattr(x, method)()
    _check_placeholder(state, x, f".{method}()")
    return x


def _as_constant(value, what):
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise RuntimeError(f"fusedce: {what} is a tensor that requires grad; it cannot be folded")
        value = value.item()
    value = float(value)
    if not math.isfinite(value) or value == 0.0:
        raise RuntimeError(f"fusedce: {what} = {value} cannot be folded into logit_scale")
    return value


def _fce_scale(state, x, s, divide):
    if not _active(state):
        return x / s if divide else x * s
    _check_placeholder(state, x, "a logit scale")
    if state.softcap is not None:
        raise RuntimeError("fusedce: a logit scale after the softcap cannot be folded")
    s = _as_constant(s, "the logit scale")
    state.scale = state.scale / s if divide else state.scale * s
    return x


def _fce_softcap(state, x, c):
    if not _active(state):
        return torch.tanh(x / c) * c
    _check_placeholder(state, x, "the softcap")
    if state.softcap is not None:
        raise RuntimeError("fusedce: two softcaps cannot be folded")
    state.softcap = _as_constant(c, "the softcap")
    return x


def _fce_out(state, x):
    return None if _active(state) else x


def _fce_loss(state, loss_function, *args, **kwargs):
    if not _active(state):
        return loss_function(*args, **kwargs)
    from transformers.loss.loss_utils import ForCausalLMLoss

    bound = inspect.signature(ForCausalLMLoss).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    _check_placeholder(state, a["logits"], "the loss")
    head = state.head
    linear = _linear_of(head)
    if int(a["vocab_size"]) != _classes(linear):
        raise RuntimeError(f"fusedce: vocab_size={a['vocab_size']} given to the loss but the head has "
                           f"{_classes(linear)} outputs")
    hidden = state.hidden
    shift_labels = a["shift_labels"]
    if shift_labels is None:
        target, shift, name = a["labels"], True, "labels"
    else:
        target, shift, name = shift_labels, False, "shift_labels"
    if target.dtype not in (torch.int64, torch.int32):
        # The stock loss refuses them too; .long() would turn a float or boolean tensor given by
        # mistake into class indices and train on them.
        raise TypeError(f"fusedce: {name} must hold int64 or int32 class indices, got {target.dtype}")
    target = target.to(hidden.device)
    if target.shape != hidden.shape[:-1]:
        if target.numel() != hidden.shape[:-1].numel():
            raise ValueError(f"fusedce: labels of shape {tuple(target.shape)} do not match the hidden "
                             f"states of shape {tuple(hidden.shape)}")
        # ForCausalLMLoss shifts along the labels' own last dimension and pairs them with the
        # flattened logits (flat labels: a row's last token scores the next row's first label), so
        # the tokens take the labels' shape, not the other way round.
        hidden = hidden.reshape(*target.shape, hidden.shape[-1])

    def fused(x, weight, bias):
        if _is_dtensor(weight):
            # Inside the head's call a data-parallel wrapper (FSDP2/FSDP1, ZeRO-3) has gathered the
            # weight: a DTensor here is a tensor-parallel head, whose output hooks expect logits.
            raise RuntimeError(
                f"fusedce: {type(head).__name__}'s weight is still a DTensor (placements "
                f"{tuple(weight.placements)}) inside its call: a tensor-parallel head (e.g. "
                "from_pretrained(tp_plan=...)), which the patched forward does not fold. Pass "
                "skip_logits=False (the stock forward), leave this model unpatched, or compute the "
                "loss with fusedce.linear_cross_entropy(..., process_group=<the tensor-parallel group>).")
        return F_.linear_cross_entropy(
            x, weight, target.long(), linear_bias=bias, ignore_index=int(a["ignore_index"]),
            softcap=state.softcap, logit_scale=state.scale, num_items_in_batch=a["num_items_in_batch"],
            shift=shift)

    # Through the head's own call, so that its wrappers (FSDP, ZeRO-3, offload hooks) gather the
    # weight and reduce its gradient as they would for the logits (autocast casts as F.linear's).
    loss = call_head(head, hidden, fused, linear=linear)
    state.loss_done = True
    return loss


HELPERS = {
    "_fce_head": _fce_head, "_fce_noop": _fce_noop, "_fce_scale": _fce_scale,
    "_fce_softcap": _fce_softcap, "_fce_loss": _fce_loss, "_fce_out": _fce_out,
}


# ---------------------------------------------------------------------------------------------
# Static analysis
# ---------------------------------------------------------------------------------------------


def _is_self_attr(node, attr=None):
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self" and (attr is None or node.attr == attr))


def _names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _call(name, *args):
    return ast.Call(func=ast.Name(id=name, ctx=ast.Load()),
                    args=[ast.Name(id="_fce_state", ctx=ast.Load()), *args], keywords=[])


def _is_scalar_expr(node, L):
    """A constant, a name or an attribute chain (self.config.x): a value fusedce can fold."""
    if L in _names(node):
        return False
    n = node
    while isinstance(n, ast.Attribute):
        n = n.value
    if isinstance(n, (ast.Name, ast.Constant)):
        return True
    return False


def _tanh_arg(node):
    if isinstance(node, ast.Call) and ast.unparse(node.func) in _TANH and len(node.args) == 1 and not node.keywords:
        return node.args[0]
    return None


class _Plan:
    def __init__(self):
        self.head_attr = None
        self.logits = None
        self.transforms = []  # in program order: "scale" | "softcap" | "noop"


def _rewrite_logits_expr(node, L, plan, head_ok):
    """Rewrite an expression producing the logits from the head call (head_ok) or from L.
    Returns the new node; raises Refused for anything not recognised."""
    # head call
    if head_ok and isinstance(node, ast.Call) and _is_self_attr(node.func) and len(node.args) == 1 \
            and not node.keywords and L not in _names(node.args[0]):
        plan.head_attr = node.func.attr
        return _call("_fce_head", node.func, node.args[0]), True
    if not head_ok and isinstance(node, ast.Name) and node.id == L:
        return node, False
    # x.float() / x.contiguous()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _NOOP_METHODS \
            and not node.args and not node.keywords:
        inner, h = _rewrite_logits_expr(node.func.value, L, plan, head_ok)
        plan.transforms.append("noop")
        return _call("_fce_noop", inner, ast.Constant(node.func.attr)), h
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        # softcap: tanh(x / c) * c  or  c * tanh(x / c)
        for t, c in ((node.left, node.right), (node.right, node.left)):
            arg = _tanh_arg(t)
            if arg is not None and isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Div) \
                    and ast.unparse(arg.right) == ast.unparse(c) and _is_scalar_expr(c, L):
                inner, h = _rewrite_logits_expr(arg.left, L, plan, head_ok)
                plan.transforms.append("softcap")
                return _call("_fce_softcap", inner, c), h
        for x, s in ((node.left, node.right), (node.right, node.left)):
            if _is_scalar_expr(s, L):
                try:
                    inner, h = _rewrite_logits_expr(x, L, plan, head_ok)
                except Refused:
                    continue
                plan.transforms.append("scale")
                return _call("_fce_scale", inner, s, ast.Constant(False)), h
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _is_scalar_expr(node.right, L):
        inner, h = _rewrite_logits_expr(node.left, L, plan, head_ok)
        plan.transforms.append("scale")
        return _call("_fce_scale", inner, node.right, ast.Constant(True)), h
    raise Refused(f"`{ast.unparse(node)}` is not a recognised head or logit transform")


def _assign_to(stmt, L):
    return (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and stmt.targets[0].id == L)


def _softcap_block(stmt, L):
    """`if COND: L = L / c; L = tanh(L); L = L * c` (optionally L.float() / c). Returns (c, new body)."""
    if not isinstance(stmt, ast.If) or stmt.orelse or len(stmt.body) != 3 or L in _names(stmt.test):
        return None
    s1, s2, s3 = stmt.body
    if not all(_assign_to(s, L) for s in (s1, s2, s3)):
        return None
    v1, v2, v3 = s1.value, s2.value, s3.value
    if not (isinstance(v1, ast.BinOp) and isinstance(v1.op, ast.Div)):
        return None
    x, c = v1.left, v1.right
    noop = None
    if isinstance(x, ast.Call) and isinstance(x.func, ast.Attribute) and x.func.attr in _NOOP_METHODS \
            and not x.args and not x.keywords:
        noop, x = x.func.attr, x.func.value
    if not (isinstance(x, ast.Name) and x.id == L and _is_scalar_expr(c, L)):
        return None
    t = _tanh_arg(v2)
    if not (t is not None and isinstance(t, ast.Name) and t.id == L):
        return None
    if not (isinstance(v3, ast.BinOp) and isinstance(v3.op, ast.Mult)):
        return None
    ok = any(isinstance(a, ast.Name) and a.id == L and ast.unparse(b) == ast.unparse(c)
             for a, b in ((v3.left, v3.right), (v3.right, v3.left)))
    if not ok:
        return None
    src = ast.Name(id=L, ctx=ast.Load())
    if noop:
        src = _call("_fce_noop", src, ast.Constant(noop))
    return [ast.Assign(targets=[ast.Name(id=L, ctx=ast.Store())], value=_call("_fce_softcap", src, c),
                       lineno=s1.lineno)]


def _find_init_assignment(cls, attr):
    """The expression assigned to self.<attr> in the first __init__ of the MRO that assigns it."""
    for c in cls.__mro__:
        init = c.__dict__.get("__init__")
        if init is None:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if _is_self_attr(t, attr):
                        return node.value
    return None


def _head_is_linear(cls, attr):
    value = _find_init_assignment(cls, attr)
    if value is None:
        raise Refused(f"the head self.{attr} is not assigned in __init__")
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("nn.Linear", "torch.nn.Linear", "Linear"):
        return
    raise Refused(f"the head self.{attr} is `{ast.unparse(value)[:80]}`, not an nn.Linear")


def forward_owner(cls):
    for c in cls.__mro__:
        if "forward" in c.__dict__:
            return c
    raise Refused("no forward")


def original_forward(cls):
    f = forward_owner(cls).__dict__["forward"]
    return getattr(f, "_fusedce_original", f)


def analyse(cls):
    """Return (decorated fused forward taking `_fce_state=`, plan) or raise Refused."""
    orig = original_forward(cls)
    params = inspect.signature(orig).parameters
    if "decoder_input_ids" in params:
        raise Refused("encoder-decoder model (its forward takes decoder_input_ids)")
    if "labels" not in params:
        raise Refused("the forward takes no labels")
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise Refused("the forward takes no **kwargs (no num_items_in_batch / shift_labels)")
    inner = inspect.unwrap(orig)
    if inner.__code__.co_freevars and inner.__code__.co_freevars != ("__class__",):
        raise Refused(f"the forward is a closure over {inner.__code__.co_freevars}")
    try:
        lines, first = inspect.getsourcelines(inner)
        filename = inspect.getsourcefile(inner)
    except (OSError, TypeError) as e:
        raise Refused(f"no source for the forward ({e})") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise Refused("the forward is not a plain function")
    ast.increment_lineno(tree, first - 1)
    body = fdef.body

    # 1. the loss: exactly one self.loss_function(...) call, alone in `if labels is not None:`
    loss_calls = [n for n in ast.walk(fdef) if isinstance(n, ast.Call) and _is_self_attr(n.func, "loss_function")]
    if not loss_calls:
        if any(isinstance(n, ast.Name) and n.id == "CrossEntropyLoss" for n in ast.walk(fdef)):
            raise Refused("the loss is its own CrossEntropyLoss on the logits, not self.loss_function")
        raise Refused("the forward does not compute its loss with self.loss_function")
    if len(loss_calls) > 1:
        raise Refused("self.loss_function is called more than once")
    loss_call = loss_calls[0]
    loss_idx = None
    for i, st in enumerate(body):
        if loss_call in list(ast.walk(st)):
            loss_idx = i
    st = body[loss_idx]
    if not (isinstance(st, ast.If) and ast.unparse(st.test) == "labels is not None" and not st.orelse
            and len(st.body) == 1 and isinstance(st.body[0], ast.Assign) and st.body[0].value is loss_call):
        raise Refused(f"the loss is computed in an unrecognised block: `{ast.unparse(st)[:160]}`")
    if loss_call.args:
        logits_arg = loss_call.args[0]
    else:
        logits_arg = next((k.value for k in loss_call.keywords if k.arg == "logits"), None)
    if not isinstance(logits_arg, ast.Name):
        raise Refused("the logits given to self.loss_function are not a plain variable")
    L = logits_arg.id
    other_refs = [a for a in loss_call.args[1:] + [k.value for k in loss_call.keywords if k.arg != "logits"]
                  if L in _names(a)]
    if other_refs:
        raise Refused(f"the loss call uses the logits beyond its logits argument: `{ast.unparse(other_refs[0])}`")

    # 2. from the loss back to the head
    plan = _Plan()
    plan.logits = L
    head_idx = None
    new_stmts = {}
    for i in range(loss_idx - 1, -1, -1):
        st = body[i]
        if L not in _names(st):
            continue
        block = _softcap_block(st, L)
        if block is not None:
            st2 = ast.If(test=st.test, body=block, orelse=[])
            ast.copy_location(st2, st)
            new_stmts[i] = st2
            plan.transforms.append("softcap")
            continue
        if not _assign_to(st, L):
            raise Refused(f"unrecognised statement between the head and the loss: `{ast.unparse(st)[:160]}`")
        reads_l = L in _names(st.value)
        tr_before = list(plan.transforms)
        plan.transforms = []
        value, is_head = _rewrite_logits_expr(st.value, L, plan, head_ok=not reads_l)
        plan.transforms = tr_before + plan.transforms[::-1]
        st2 = ast.Assign(targets=st.targets, value=value)
        ast.copy_location(st2, st)
        new_stmts[i] = st2
        if is_head:
            head_idx = i
            break
    if head_idx is None:
        raise Refused("no `logits = self.<head>(hidden)` statement before the loss")
    transforms = plan.transforms[::-1]  # program order
    kinds = [t for t in transforms if t != "noop"]
    if "softcap" in kinds and (kinds.count("softcap") > 1 or kinds[-1] != "softcap"):
        raise Refused(f"logit transforms in an order fusedce cannot fold: {kinds}")
    plan.transforms = kinds
    _head_is_linear(cls, plan.head_attr)

    # 3. after the loss: the logits only as a value of the output
    for i in range(loss_idx + 1, len(body)):
        st = body[i]
        parents = {}
        for p in ast.walk(st):
            for ch in ast.iter_child_nodes(p):
                parents[ch] = p
        for n in ast.walk(st):
            if isinstance(n, ast.Name) and n.id == L:
                par = parents.get(n)
                if isinstance(n.ctx, ast.Store):
                    raise Refused(f"the logits are reassigned after the loss: `{ast.unparse(st)[:160]}`")
                if not ((isinstance(par, ast.keyword) and par.arg == "logits") or isinstance(par, ast.Tuple)):
                    raise Refused(f"the logits are used after the loss: `{ast.unparse(par)[:160]}`")

    class _Out(ast.NodeTransformer):
        def visit_Name(self, n):
            if n.id == L and isinstance(n.ctx, ast.Load):
                return ast.copy_location(_call("_fce_out", n), n)
            return n

    for i in range(loss_idx + 1, len(body)):
        body[i] = _Out().visit(body[i])
    for i, st in new_stmts.items():
        body[i] = st
    loss_call.args.insert(0, loss_call.func)
    loss_call.args.insert(0, ast.Name(id="_fce_state", ctx=ast.Load()))
    loss_call.func = ast.Name(id="_fce_loss", ctx=ast.Load())

    # 4. the keyword-only _fce_state, the decorators, compile
    fdef.args.kwonlyargs.append(ast.arg(arg="_fce_state"))
    fdef.args.kw_defaults.append(ast.Constant(None))
    decorators = fdef.decorator_list
    fdef.decorator_list = []
    factory = ast.FunctionDef(
        name="_fce_factory",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=a) for a in [*HELPERS, "__class__"]],
                           kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=[fdef, ast.Return(value=ast.Name(id=fdef.name, ctx=ast.Load()))], decorator_list=[])
    module = ast.Module(body=[factory], type_ignores=[])
    ast.fix_missing_locations(module)
    code = compile(module, filename, "exec")
    ns = {}
    exec(code, inner.__globals__, ns)  # noqa: S102  (the stock forward's own code, rewritten)
    fn = ns["_fce_factory"](*HELPERS.values(), forward_owner(cls))
    fn.__qualname__ = inner.__qualname__
    fn.__module__ = inner.__module__
    for dec in reversed(decorators):
        target = dec.func if isinstance(dec, ast.Call) else dec
        if ast.unparse(target).split(".")[-1] in _DOC_DECORATORS:
            continue
        fn = eval(compile(ast.Expression(body=dec), filename, "eval"), inner.__globals__)(fn)  # noqa: S307
    return fn, plan


def warn_once(msg, _seen=set()):  # noqa: B006
    if msg not in _seen:
        _seen.add(msg)
        warnings.warn(msg, stacklevel=3)
