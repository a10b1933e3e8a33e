"""The MPT causal language model, readable top to bottom: Norm -> Attention -> MLP -> Block -> Model.

Parameter names mirror the hub checkpoints (`transformer.blocks.{i}.attn.Wqkv.weight`, ...), so a
published MPT state dict loads without renaming. This file and its siblings travel beside every
saved checkpoint as remote code: they import only torch, transformers and each other.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .alibi import DEFAULT_ALIBI_BIAS_MAX, alibi_slopes
from .attention import MaskSpec, attend
from .configuration_mpt import DEFAULT_EXPANSION_RATIO, MPTConfig

# transformers 5.x renamed the KV cache `past_key_values` -> `cache` in inputs and outputs.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# ----------------------------------------------------------------------------------------------
# Norms


class MPTNorm(nn.Module):
    """LayerNorm or RMSNorm, optionally "low precision": run in the autocast dtype, as MPT does.

    Low precision matters only under autocast: there torch would otherwise upcast LayerNorm to
    fp32. Outside autocast it is the ordinary norm.
    """

    def __init__(self, dim: int, kind: str, eps: float, bias: bool):
        super().__init__()
        self.rms = kind.endswith("rmsnorm")
        self.low_precision = kind.startswith("low_precision")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # RMSNorm has no bias in MPT; LayerNorm has one unless no_bias.
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and not self.rms else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.low_precision and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._norm(x, weight, bias)
        return self._norm(x, weight, bias)

    def _norm(self, x, weight, bias):
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)


def build_norm(config: MPTConfig, dim: int) -> MPTNorm:
    return MPTNorm(dim, config.norm_type, config.layer_norm_epsilon, bias=not config.no_bias)


# ----------------------------------------------------------------------------------------------
# Positions (only when ALiBi is off: RoPE and learned embeddings exist for comparison studies)


def token_positions(
    batch: int, length: int, past_length: int, attention_mask, sequence_id, device
) -> torch.Tensor:
    """Position of each new token, (B, S): restarts per packed document, skips left padding."""
    if sequence_id is not None:
        index = torch.arange(length, device=device).expand(batch, length)
        starts = torch.ones_like(sequence_id, dtype=torch.bool)
        starts[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
        first_of_document = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        return index - first_of_document
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return positions[:, -length:]
    return torch.arange(past_length, past_length + length, device=device).expand(batch, length)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32):
    """cos, sin of shape (B, 1, S, head_dim) for rotate-half (GPT-NeoX style) RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq  # (B, S, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention


class MPTAttention(nn.Module):
    """Fused-QKV attention: MHA, GQA or MQA, with clip_qkv, qk_ln and any position scheme."""

    def __init__(self, config: MPTConfig, layer_idx: int):
        super().__init__()
        attn = config.attn
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.kv_n_heads = config.kv_n_heads
        self.head_dim = config.head_dim
        self.attn_impl = attn.attn_impl
        self.clip_qkv = attn.clip_qkv
        self.dropout_p = attn.attn_pdrop
        self.softmax_scale = attn.softmax_scale or 1.0 / math.sqrt(self.head_dim)
        q_dim, kv_dim = config.d_model, self.kv_n_heads * self.head_dim
        self.split_sizes = (q_dim, kv_dim, kv_dim)
        # rows [0, d) = Q, then K, then V: the hub layout
        self.Wqkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=not config.no_bias)
        if attn.qk_ln:
            self.q_ln = build_norm(config, q_dim)
            self.k_ln = build_norm(config, kv_dim)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=not config.no_bias)
        self.out_proj._is_residual = True

    def forward(self, x, *, mask: MaskSpec, alibi_slopes, rope, cache: Cache | None):
        batch, length, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        if hasattr(self, "q_ln"):
            q, k = self.q_ln(q).to(v.dtype), self.k_ln(k).to(v.dtype)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = k.view(batch, length, self.kv_n_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(batch, length, self.kv_n_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = attend(
            q,
            k,
            v,
            impl=self.attn_impl,
            mask=mask,
            alibi_slopes=alibi_slopes,
            softmax_scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(batch, length, -1)  # (B, S, d)
        return self.out_proj(y)


# ----------------------------------------------------------------------------------------------
# Feed-forward


class MPTMLP(nn.Module):
    """up_proj -> exact (erf) GELU -> down_proj; with `glu`, a gated variant with gate_proj."""

    def __init__(self, config: MPTConfig):
        super().__init__()
        hidden, bias = config.ffn_hidden_size, not config.no_bias
        self.up_proj = nn.Linear(config.d_model, hidden, bias=bias)
        if config.ffn.ffn_type == "mptglu":
            self.gate_proj = nn.Linear(config.d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, config.d_model, bias=bias)
        self.down_proj._is_residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


# ----------------------------------------------------------------------------------------------
# Block


class MPTBlock(nn.Module):
    """Pre-LN transformer block: x + attn(norm_1(x)), then + ffn(norm_2(x)).

    Activation checkpointing, the one mechanism: with `gradient_checkpointing` on (set by
    transformers' `gradient_checkpointing_enable`, or by the trainer's parallelize) a training
    forward keeps only the block's input and reruns inside backward. It wraps `forward`, inside the
    module's call, so FSDP's hooks stay outside the recomputed region and a compiled block traces it.
    """

    # transformers' switch replaces the function (with its own checkpoint arguments) when it enables it.
    _gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def __init__(self, config: MPTConfig, layer_idx: int):
        super().__init__()
        self.norm_1 = build_norm(config, config.d_model)
        self.attn = MPTAttention(config, layer_idx)
        self.norm_2 = build_norm(config, config.d_model)
        self.ffn = MPTMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.gradient_checkpointing = False

    def forward(self, x, mask, alibi_slopes, rope, cache):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(self._layers, x, mask, alibi_slopes, rope, cache)
        return self._layers(x, mask, alibi_slopes, rope, cache)

    def _layers(self, x, mask, alibi_slopes, rope, cache):
        attn_out = self.attn(self.norm_1(x), mask=mask, alibi_slopes=alibi_slopes, rope=rope, cache=cache)
        x = x + self.resid_dropout(attn_out)
        return x + self.resid_dropout(self.ffn(self.norm_2(x)))


# ----------------------------------------------------------------------------------------------
# Initialisation (llm-foundry's param_init_fns, re-derived from the config semantics)


@torch.no_grad()
def init_mpt_module(module: nn.Module, config: MPTConfig) -> None:
    init = config.init
    small_std = math.sqrt(2 / (5 * config.d_model))
    if init.name == "neox_init_":
        residual_div = config.n_layers / math.sqrt(10)
    elif init.init_div_is_residual is True:
        residual_div = math.sqrt(2 * config.n_layers)
    else:
        residual_div = float(init.init_div_is_residual or 1.0)

    def init_weight(weight: torch.Tensor) -> None:
        if init.name == "kaiming_normal_":
            nn.init.kaiming_normal_(weight, a=init.init_gain, mode=init.fan_mode, nonlinearity=init.init_nonlinearity)
        elif init.name == "kaiming_uniform_":
            nn.init.kaiming_uniform_(weight, a=init.init_gain, mode=init.fan_mode, nonlinearity=init.init_nonlinearity)
        elif init.name == "xavier_normal_":
            nn.init.xavier_normal_(weight, gain=init.init_gain or 1.0)
        elif init.name == "xavier_uniform_":
            nn.init.xavier_uniform_(weight, gain=init.init_gain or 1.0)
        elif init.name == "baseline_":
            nn.init.normal_(weight, std=init.init_std)
        else:  # small_init_, neox_init_
            nn.init.normal_(weight, std=small_std)

    if isinstance(module, nn.Linear):
        init_weight(module.weight)
        if getattr(module, "_is_residual", False):
            module.weight.div_(residual_div)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        if init.emb_init_std is not None:
            nn.init.normal_(module.weight, std=init.emb_init_std)
        elif init.emb_init_uniform_lim is not None:
            limit = init.emb_init_uniform_lim
            low, high = (-limit, limit) if isinstance(limit, (int, float)) else limit
            nn.init.uniform_(module.weight, low, high)
        else:
            init_weight(module.weight)
    elif isinstance(module, MPTNorm):
        module.weight.fill_(1.0)
        if module.bias is not None:
            module.bias.zero_()


# ----------------------------------------------------------------------------------------------
# Models


class MPTPreTrainedModel(PreTrainedModel):
    config_class = MPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["MPTBlock"]
    supports_gradient_checkpointing = True
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        init_mpt_module(module, self.config)

    def reset_parameters(self) -> None:
        """MPT's initialisation of every parameter (after `to_empty()` of a meta-built model)."""
        for module in self.modules():
            init_mpt_module(module, self.config)


class MPTModel(MPTPreTrainedModel):
    def __init__(self, config: MPTConfig):
        super().__init__(config)
        attn = config.attn
        self.alibi = attn.alibi
        self.alibi_bias_max = attn.alibi_bias_max
        self.prefix_lm = attn.prefix_lm
        self.attn_uses_sequence_id = attn.attn_uses_sequence_id
        self.sliding_window = attn.sliding_window_size if attn.sliding_window_size > 0 else None
        self.rope_theta = attn.rope_theta if attn.rope else None
        self.embedding_fraction = config.embedding_fraction
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.uses_learned_positions:
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList(MPTBlock(config, i) for i in range(config.n_layers))
        self.norm_f = build_norm(config, config.d_model)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    # The forward pass in pieces, so that the static-cache decoder composes the same steps.
    @property
    def needs_positions(self) -> bool:
        return hasattr(self, "wpe") or self.rope_theta is not None

    def embed(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, S, d) -> block input: learned positions, embedding_fraction, dropout."""
        if hasattr(self, "wpe"):
            x = x + self.wpe(positions)
        if self.embedding_fraction < 1:
            # MPT's gradient shrink on the embedding (GLM-130B's stabiliser)
            x = x * self.embedding_fraction + x.detach() * (1 - self.embedding_fraction)
        return self.emb_drop(x)

    def run_blocks(self, x: torch.Tensor, mask: MaskSpec, positions: torch.Tensor | None, cache) -> torch.Tensor:
        """Every block, then the final norm. ALiBi slopes and RoPE angles are made once per pass."""
        wide = torch.promote_types(x.dtype, torch.float32)
        slopes = alibi_slopes(self.config.n_heads, self.alibi_bias_max, device=x.device, dtype=wide) if self.alibi else None
        rope = rope_angles(positions, self.config.head_dim, self.rope_theta, wide) if self.rope_theta is not None else None
        for block in self.blocks:
            x = block(x, mask, slopes, rope, cache)
        return self.norm_f(x)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sequence_id: torch.LongTensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, d)
        batch, length = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else past_key_values  # the name before transformers 5.x
        if use_cache and cache is None:
            cache = DynamicCache()
        past_length = cache.get_seq_length() if cache is not None else 0
        num_keys = past_length + length

        if attention_mask is not None and attention_mask.shape[-1] != num_keys:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens; expected {num_keys} "
                f"({past_length} cached + {length} new)"
            )
        if not self.attn_uses_sequence_id:
            sequence_id = None
        if sequence_id is not None and past_length:
            raise ValueError("sequence_id (packed documents) is for full-sequence passes, not KV-cached decoding")
        if self.prefix_lm and prefix_mask is not None and prefix_mask.shape[-1] != num_keys:
            raise ValueError(f"prefix_mask covers {prefix_mask.shape[-1]} tokens; expected {num_keys}")

        positions = None
        if self.needs_positions:
            positions = token_positions(batch, length, past_length, attention_mask, sequence_id, x.device)
        if hasattr(self, "wpe") and num_keys > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {num_keys} tokens exceeds max_seq_len={self.config.max_seq_len}: learned "
                "position embeddings cannot extrapolate (ALiBi can)"
            )
        x = self.embed(x, positions)

        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask.bool()
        mask = MaskSpec(
            query_start=past_length,
            causal=True,
            key_padding=key_padding,
            sequence_id=sequence_id,
            prefix=prefix_mask.bool() if self.prefix_lm and prefix_mask is not None else None,
            sliding_window=self.sliding_window,
        )
        x = self.run_blocks(x, mask, positions, cache)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache if use_cache else None})


class MPTForCausalLM(MPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: MPTConfig):
        super().__init__(config)
        self.transformer = MPTModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.logit_multiplier = config.logit_multiplier
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return getattr(self, "lm_head", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits: the tied embedding (or an lm_head module) and logit_scale."""
        head = getattr(self, "lm_head", None)
        logits = head(hidden) if head is not None else F.linear(hidden, self.transformer.wte.weight)
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        sequence_id: torch.LongTensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            sequence_id=sequence_id,
            prefix_mask=prefix_mask,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.compute_logits(hidden)  # (B, S, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    # ---- hub format ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory, tokenizer=None, **kwargs):
        """Hub MPT layout: config.json with auto_map, safetensors weights, the model's own source
        files (so `trust_remote_code=True` works without mptkit installed), and the tokenizer."""
        unsupported = transformers_mpt_ignores(self.config)
        if unsupported:
            warnings.warn(
                "transformers' built-in MptForCausalLM would silently ignore: " + "; ".join(unsupported)
                + ". Load this checkpoint with trust_remote_code=True (mptkit's code, saved beside it).",
                stacklevel=2,
            )
        self.config.architectures = ["MPTForCausalLM"]
        self.config.auto_map = {
            "AutoConfig": "configuration_mpt.MPTConfig",
            "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
        }
        super().save_pretrained(save_directory, **kwargs)
        for source in remote_code_files():
            shutil.copyfile(source, os.path.join(save_directory, os.path.basename(source)))
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)


def remote_code_files() -> list[str]:
    """The source files that make up the model: this package, minus its package marker."""
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(
        os.path.join(here, name) for name in os.listdir(here) if name.endswith(".py") and name != "__init__.py"
    )


def transformers_mpt_ignores(config: MPTConfig) -> list[str]:
    """Features of `config` that transformers' own MptForCausalLM does not implement."""
    attn = config.attn
    checks = [
        (config.kv_n_heads != config.n_heads, f"grouped/multi-query attention (kv_n_heads={config.kv_n_heads})"),
        (attn.qk_ln, "qk_ln"),
        (attn.alibi and attn.alibi_bias_max != DEFAULT_ALIBI_BIAS_MAX, f"alibi_bias_max={attn.alibi_bias_max}"),
        (not attn.alibi, "ALiBi being off (rope or learned positions)"),
        (config.logit_scale is not None, f"logit_scale={config.logit_scale}"),
        (config.expansion_ratio != DEFAULT_EXPANSION_RATIO or config.ffn.ffn_hidden_size,
         f"an FFN width other than {DEFAULT_EXPANSION_RATIO}*d_model"),
        (config.ffn.ffn_type != "mptmlp", f"ffn_type={config.ffn.ffn_type}"),
        (not config.no_bias, "biases (no_bias=false)"),
        ("rmsnorm" in config.norm_type, f"norm_type={config.norm_type}"),
        (not config.tie_word_embeddings, "an untied lm_head"),
        (attn.prefix_lm, "prefix_lm"),
        (attn.attn_uses_sequence_id, "attn_uses_sequence_id"),
        (attn.sliding_window_size > 0, "sliding_window_size"),
        (config.embedding_fraction != 1.0, "embedding_fraction"),
    ]
    return [message for failed, message in checks if failed]
