"""Tiny random-init models of any transformers class, and the check of a patched forward against
the stock one (loss and the gradient of every parameter, fp32). Used by audit(verify=True) and the
tests; no download."""

from __future__ import annotations

import math

import torch

VOCAB = 256
FIRST_SPECIAL = 240  # special token ids go here; the inputs stay below
SEQ = 12

# attribute -> tiny value, applied wherever a config (or a sub-config) has the attribute
_SIZES = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "n_embed": 32, "embed_dim": 32, "dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "decoder_ffn_dim": 64, "ffn_hidden_size": 64,
    "head_dim": 8, "kv_channels": 8,
    "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_seq_len": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16,
    "rotary_dim": 4, "rotary_emb_base": 10000,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_d_conv": 4, "conv_kernel": 4,
    "mamba_n_heads": 8, "mamba_head_dim": 8, "mamba_headdim": 8, "mamba_d_ssm": 64, "mamba_n_groups": 1, "n_groups": 1, "time_step_rank": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "image_size": 32, "patch_size": 8, "num_channels": 3,
    "sliding_window": 8, "attention_chunk_size": 8,
    "vocab_size": VOCAB,
}
_ZERO = ("dropout", "pdrop", "drop_rate", "jitter", "drop_path")


def _shrink(cfg, depth=0):
    for k in list(vars(cfg)):
        v = getattr(cfg, k)
        if hasattr(v, "to_dict") and hasattr(v, "model_type") and depth < 3:
            _shrink(v, depth + 1)
        elif k in _SIZES and isinstance(v, int) and not isinstance(v, bool) and v > _SIZES[k]:
            setattr(cfg, k, _SIZES[k])
        elif isinstance(v, float) and any(z in k for z in _ZERO):
            setattr(cfg, k, 0.0)
    n = getattr(cfg, "num_hidden_layers", None)
    for k in ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types", "mlp_layer_types"):
        v = getattr(cfg, k, None)
        if isinstance(v, (list, tuple)) and n is not None and len(v) != n:
            kinds = list(dict.fromkeys(v))
            setattr(cfg, k, type(v)((kinds * n)[:n]))
    special = FIRST_SPECIAL
    for k in list(vars(cfg)):
        v = getattr(cfg, k)
        if (k.endswith(("_token_id", "_token_index", "_id")) and isinstance(v, int)
                and not isinstance(v, bool) and (v >= VOCAB or v < 0) and k != "pad_token_id" or
                k == "pad_token_id" and isinstance(v, int) and v >= VOCAB):
            setattr(cfg, k, special)
            special = min(special + 1, VOCAB - 1)
    if getattr(cfg, "output_router_logits", None) is False:
        cfg.output_router_logits = True  # the router auxiliary loss is part of what is compared
    return cfg


# per-family fixes: values a family's config needs to be consistent once shrunk
_FAMILY = {
    "mamba2": {"num_heads": 8},  # num_heads * head_dim = expand * hidden_size
}


_MROPE = ("qwen2_vl", "qwen2_5_vl", "glm4v", "glm_ocr", "paddleocr", "glm46v")  # mrope_section defaults in code


def _fix(cfg, depth=0):
    for k in list(vars(cfg)):
        v = getattr(cfg, k)
        if hasattr(v, "to_dict") and hasattr(v, "model_type") and depth < 3:
            _fix(v, depth + 1)
    if getattr(cfg, "kv_lora_rank", None) and hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = cfg.num_attention_heads  # multi-head latent attention: one kv head per head
    if "head_dim" in vars(cfg) and vars(cfg)["head_dim"] is None and getattr(cfg, "num_attention_heads", None):
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None)
    mt = getattr(cfg, "model_type", "") or ""
    if isinstance(rope, dict) and getattr(cfg, "hidden_size", None) and getattr(cfg, "num_attention_heads", None) and (
            isinstance(rope.get("mrope_section"), list) or any(f in mt for f in _MROPE)):
        # multimodal rope: the sections split the rotary half-dimension, which the shrink made small
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        half = int(hd * rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0) or 1.0)) // 2
        n = len(rope.get("mrope_section") or [0, 0, 0])
        rope["mrope_section"] = [half - (n - 1) * (half // n)] + [half // n] * (n - 1)
    for k, v in _FAMILY.get(getattr(cfg, "model_type", None), {}).items():
        setattr(cfg, k, v)
    return cfg


def tiny_config(cls, **overrides):
    cfg = _fix(_shrink(cls.config_class()))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if hasattr(cfg, "_attn_implementation"):
        try:
            cfg._attn_implementation = "eager"
        except Exception:  # noqa: BLE001
            pass
    return cfg


def tiny_model(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_config(cls, **overrides)).float()
    return model.train()


def batch(seed=1, batch=2, seq=SEQ, ignore=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, FIRST_SPECIAL - 16, (batch, seq), generator=g)
    labels = ids.clone()
    if ignore:
        labels[0, : seq // 3] = -100
    return ids, labels


def run(model, forward, ids, labels, seed=2, **kwargs):
    """(loss, {name: grad}, output) of forward(model, ...) with a fixed RNG state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = forward(model, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kwargs)
    loss = out.loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, out


def compare(stock, fused, rtol=1e-4):
    """None if the two runs agree (loss and every gradient), else a message naming the difference."""
    (l0, g0, _), (l1, g1, _) = stock, fused
    if not torch.isfinite(l0):
        return f"the stock loss is {l0.item()}"
    if abs(l0.item() - l1.item()) > rtol * max(1.0, abs(l0.item())):
        return f"loss {l1.item()!r} != stock {l0.item()!r}"
    if set(g0) != set(g1):
        return f"gradients for different parameters: {sorted(set(g0) ^ set(g1))[:4]}"
    for n in g0:
        a, b = g0[n], g1[n]
        scale = a.abs().max().item()
        err = (a - b).abs().max().item()
        if not math.isfinite(err) or err > 1e-6 + rtol * scale:
            return f"gradient of {n}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"
    return None


def verify(cls, fused_forward, stock_forward, **overrides):
    """('verified', None) | ('mismatch', why) | ('not constructible', why) | ('not runnable', why)."""
    try:
        model = tiny_model(cls, **overrides)
    except Exception as e:  # noqa: BLE001
        return "not constructible", f"{type(e).__name__}: {str(e)[:200]}"
    ids, labels = batch()
    try:
        stock = run(model, stock_forward, ids, labels)
    except Exception as e:  # noqa: BLE001
        return "not runnable", f"stock forward with text input: {type(e).__name__}: {str(e)[:200]}"
    try:
        fused = run(model, fused_forward, ids, labels)
    except Exception as e:  # noqa: BLE001
        return "mismatch", f"patched forward raised {type(e).__name__}: {str(e)[:300]}"
    if fused[2].logits is not None:
        return "mismatch", "the patched forward returned logits"
    why = compare(stock, fused)
    return ("verified", None) if why is None else ("mismatch", why)
