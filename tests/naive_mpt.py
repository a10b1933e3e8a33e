"""A float64 MPT written from the published definitions (llm-foundry's MPT, the ALiBi paper),
independent of mptkit's model code.

Slow and literal on purpose: explicit per-(batch, head) score matrices, masks from their
definitions, slopes from the closed form. Used as the oracle for features transformers' MPT lacks.
"""

from __future__ import annotations

import math

import torch


def closed_form_slopes(n_heads: int, bias_max: float) -> list[float]:
    padded = 2 ** math.ceil(math.log2(n_heads))
    m = [2.0 ** (-k * bias_max / padded) for k in range(1, padded + 1)]
    if padded == n_heads:
        return m
    return (m[1::2] + m[0::2])[:n_heads]


def _norm(x, weight, bias, kind, eps):
    if "rmsnorm" in kind:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _positions(batch, length, attention_mask, sequence_id):
    pos = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        for t in range(length):
            if sequence_id is not None:
                start = t
                while start > 0 and sequence_id[b, start - 1] == sequence_id[b, t]:
                    start -= 1
                pos[b, t] = t - start
            elif attention_mask is not None:
                pos[b, t] = max(int(attention_mask[b, : t + 1].sum()) - 1, 0)
            else:
                pos[b, t] = t
    return pos


def _rope(x, positions, theta):
    """x (S, D) for one head; rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D)."""
    dim = x.shape[-1]
    half = dim // 2
    out = x.clone()
    for i in range(half):
        angle = positions.double() * theta ** (-2.0 * i / dim)
        a, b = x[:, i], x[:, i + half]
        out[:, i] = a * torch.cos(angle) - b * torch.sin(angle)
        out[:, i + half] = b * torch.cos(angle) + a * torch.sin(angle)
    return out


def naive_logits(config, state_dict, input_ids, attention_mask=None, sequence_id=None, prefix_mask=None):
    sd = {k: v.detach().double() for k, v in state_dict.items()}
    attn = config.attn
    batch, length = input_ids.shape
    d, n_heads = config.d_model, config.n_heads
    head_dim = d // n_heads
    kv_heads = config.kv_n_heads
    eps = config.layer_norm_epsilon
    scale = attn.softmax_scale or 1.0 / math.sqrt(head_dim)
    slopes = closed_form_slopes(n_heads, attn.alibi_bias_max) if attn.alibi else None
    use_seq = sequence_id if attn.attn_uses_sequence_id else None
    positions = _positions(batch, length, attention_mask, use_seq)

    def get(name):
        return sd.get(name)

    x = sd["transformer.wte.weight"][input_ids]
    if "transformer.wpe.weight" in sd:
        x = x + sd["transformer.wpe.weight"][positions]
    for layer in range(config.n_layers):
        p = f"transformer.blocks.{layer}."
        h = _norm(x, sd[p + "norm_1.weight"], get(p + "norm_1.bias"), config.norm_type, eps)
        qkv = h @ sd[p + "attn.Wqkv.weight"].T
        if get(p + "attn.Wqkv.bias") is not None:
            qkv = qkv + sd[p + "attn.Wqkv.bias"]
        if attn.clip_qkv:
            qkv = qkv.clamp(-attn.clip_qkv, attn.clip_qkv)
        q, k, v = qkv[..., :d], qkv[..., d : d + kv_heads * head_dim], qkv[..., d + kv_heads * head_dim :]
        if attn.qk_ln:
            q = _norm(q, sd[p + "attn.q_ln.weight"], get(p + "attn.q_ln.bias"), config.norm_type, eps)
            k = _norm(k, sd[p + "attn.k_ln.weight"], get(p + "attn.k_ln.bias"), config.norm_type, eps)
        out = torch.zeros(batch, length, d, dtype=torch.float64)
        for b in range(batch):
            for head in range(n_heads):
                kv_head = head // (n_heads // kv_heads)
                qh = q[b, :, head * head_dim : (head + 1) * head_dim]
                kh = k[b, :, kv_head * head_dim : (kv_head + 1) * head_dim]
                vh = v[b, :, kv_head * head_dim : (kv_head + 1) * head_dim]
                if attn.rope:
                    qh, kh = _rope(qh, positions[b], attn.rope_theta), _rope(kh, positions[b], attn.rope_theta)
                scores = qh @ kh.T * scale
                for i in range(length):
                    for j in range(length):
                        allowed = j <= i or (attn.prefix_lm and prefix_mask is not None and bool(prefix_mask[b, j]))
                        if attn.sliding_window_size > 0 and abs(i - j) > attn.sliding_window_size:
                            allowed = False
                        if attention_mask is not None and not attention_mask[b, j]:
                            allowed = False
                        if use_seq is not None and use_seq[b, i] != use_seq[b, j]:
                            allowed = False
                        if i == j:
                            allowed = True
                        if not allowed:
                            scores[i, j] = -math.inf
                        elif slopes is not None:
                            distance = abs(i - j) if attn.prefix_lm else i - j
                            scores[i, j] -= slopes[head] * distance
                weights = torch.softmax(scores, dim=-1)
                out[b, :, head * head_dim : (head + 1) * head_dim] = weights @ vh
        attn_out = out @ sd[p + "attn.out_proj.weight"].T
        if get(p + "attn.out_proj.bias") is not None:
            attn_out = attn_out + sd[p + "attn.out_proj.bias"]
        x = x + attn_out
        h = _norm(x, sd[p + "norm_2.weight"], get(p + "norm_2.bias"), config.norm_type, eps)

        def linear(name, t):
            y = t @ sd[p + name + ".weight"].T
            return y + sd[p + name + ".bias"] if get(p + name + ".bias") is not None else y

        if get(p + "ffn.gate_proj.weight") is not None:
            hidden = _gelu(linear("ffn.gate_proj", h)) * linear("ffn.up_proj", h)
        else:
            hidden = _gelu(linear("ffn.up_proj", h))
        x = x + linear("ffn.down_proj", hidden)
    x = _norm(x, sd["transformer.norm_f.weight"], get("transformer.norm_f.bias"), config.norm_type, eps)
    head = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    logits = x @ head.T
    if config.logit_scale is not None:
        logits = logits * (1 / math.sqrt(d) if config.logit_scale == "inv_sqrt_d_model" else config.logit_scale)
    return logits
