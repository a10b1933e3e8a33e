"""MPT written for vLLM's model interface: paged KV cache, tensor parallelism, LoRA.

The hub's parameter names are kept (`transformer.blocks.{i}.attn.Wqkv`, ...), so a checkpoint loads by
name and a PEFT adapter's `target_modules` match. What the layers compute is mptkit's model
(`mptkit/model/modeling_mpt.py`): the config is read by mptkit's `MPTConfig` (validated, typed),
the slopes come from `mptkit.model.alibi` and the norms are `MPTNorm`; only the parallel linear
layers, the embedding, the attention with its KV cache and the logits come from vLLM.

Tensor parallelism: Wqkv is split by heads (q, k and v each; KV heads are replicated when there are
fewer than ranks), out_proj and down_proj by input, up_proj and gate_proj by output, the embedding
(and the tied head) by vocabulary. qk_ln normalises over all heads, so a sharded q or k is gathered
for the norm and split again.
"""

# No `from __future__ import annotations`: vLLM reads forward()'s annotations as types (dynamic dims).
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    split_tensor_along_last_dim,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsLoRA
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from mptkit.model import MPTConfig
from mptkit.model.alibi import alibi_slopes
from mptkit.model.modeling_mpt import build_norm


class UnsupportedMPTConfig(ValueError):
    """A config field this vLLM model cannot run, named."""


def read_config(hf_config) -> MPTConfig:
    """vLLM's config object (mptkit's MPTConfig, transformers' MptConfig or a hub's remote-code
    class) as mptkit's validated MPTConfig, refusing what this model does not implement."""
    config = hf_config if isinstance(hf_config, MPTConfig) else MPTConfig(**hf_config.to_dict())
    attn = config.attn
    refused = {
        "attn_config.prefix_lm": (attn.prefix_lm, "prefix-LM attention (bidirectional over the prompt) is not "
                                                  "implemented by vLLM's causal attention"),
        "attn_config.rope": (attn.rope, "rotary positions are not implemented by this plugin (no published MPT "
                                        "uses them)"),
        "attn_config.sliding_window_size": (attn.sliding_window_size != -1, "sliding-window attention is not "
                                                                           "implemented by this plugin"),
    }
    for field, (used, why) in refused.items():
        if used:
            raise UnsupportedMPTConfig(f"mptkit's vLLM plugin cannot run this MPT config: {field}: {why}")
    return config


def _tensor_parallel() -> tuple[int, int]:
    return get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()


class MPTAttention(nn.Module):
    def __init__(self, config: MPTConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        attn = config.attn
        world, rank = _tensor_parallel()
        total_heads, total_kv_heads, self.head_dim = config.n_heads, config.kv_n_heads, config.head_dim
        if total_heads % world:
            raise UnsupportedMPTConfig(f"n_heads={total_heads} is not divisible by the tensor-parallel size {world}")
        if (total_kv_heads % world) if total_kv_heads >= world else (world % total_kv_heads):
            raise UnsupportedMPTConfig(f"kv_n_heads={total_kv_heads} and the tensor-parallel size {world}: one "
                                       "must divide the other")
        self.n_heads = total_heads // world
        self.kv_n_heads = max(1, total_kv_heads // world)
        self.kv_sharded = total_kv_heads >= world and world > 1
        self.clip_qkv = attn.clip_qkv
        bias = not config.no_bias
        self.Wqkv = QKVParallelLinear(config.d_model, self.head_dim, total_heads, total_kv_heads, bias=bias,
                                      quant_config=quant_config, prefix=f"{prefix}.Wqkv")
        if attn.qk_ln:  # over all heads, as trained: replicated weights, sharded activations gathered
            self.q_ln = build_norm(config, total_heads * self.head_dim)
            self.k_ln = build_norm(config, total_kv_heads * self.head_dim)
        self.out_proj = RowParallelLinear(config.d_model, config.d_model, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.out_proj")
        slopes = None
        if attn.alibi:
            slopes = alibi_slopes(total_heads, attn.alibi_bias_max)[rank * self.n_heads:(rank + 1) * self.n_heads]
            slopes = slopes.tolist()
        self.attn = Attention(self.n_heads, self.head_dim, attn.softmax_scale or self.head_dim ** -0.5,
                              num_kv_heads=self.kv_n_heads, alibi_slopes=slopes, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")
        backend = self.attn.attn_backend
        if not backend.supports_head_size(self.head_dim):  # else the first request fails inside the kernel
            raise UnsupportedMPTConfig(
                f"head dimension d_model/n_heads = {self.head_dim}: vLLM's {backend.get_name()} attention supports "
                f"{backend.get_supported_head_sizes()}")

    def _norm_heads(self, norm: nn.Module, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        world, rank = _tensor_parallel()
        if not sharded or world == 1:
            return norm(x)
        whole = norm(tensor_model_parallel_all_gather(x.contiguous()))
        return split_tensor_along_last_dim(whole, world)[rank]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.Wqkv(hidden)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_size = self.kv_n_heads * self.head_dim
        q, k, v = qkv.split([self.n_heads * self.head_dim, kv_size, kv_size], dim=-1)
        if hasattr(self, "q_ln"):
            q = self._norm_heads(self.q_ln, q, sharded=True).to(v.dtype)
            k = self._norm_heads(self.k_ln, k, sharded=self.kv_sharded).to(v.dtype)
        out, _ = self.out_proj(self.attn(q, k, v))
        return out


class MPTMLP(nn.Module):
    """up_proj -> exact (erf) GELU -> down_proj; with mptglu, gated by gate_proj."""

    def __init__(self, config: MPTConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        bias, hidden = not config.no_bias, config.ffn_hidden_size
        self.up_proj = ColumnParallelLinear(config.d_model, hidden, bias=bias, quant_config=quant_config,
                                            prefix=f"{prefix}.up_proj")
        if config.ffn.ffn_type == "mptglu":
            self.gate_proj = ColumnParallelLinear(config.d_model, hidden, bias=bias, quant_config=quant_config,
                                                  prefix=f"{prefix}.gate_proj")
        self.down_proj = RowParallelLinear(hidden, config.d_model, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _ = self.up_proj(x)
        if hasattr(self, "gate_proj"):
            gate, _ = self.gate_proj(x)
            hidden = F.gelu(gate) * up
        else:
            hidden = F.gelu(up)
        out, _ = self.down_proj(hidden)
        return out


class MPTBlock(nn.Module):
    def __init__(self, config: MPTConfig, cache_config, quant_config, prefix: str):
        super().__init__()
        self.norm_1 = build_norm(config, config.d_model)
        self.attn = MPTAttention(config, cache_config, quant_config, prefix=f"{prefix}.attn")
        self.norm_2 = build_norm(config, config.d_model)
        self.ffn = MPTMLP(config, quant_config, prefix=f"{prefix}.ffn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.ffn(self.norm_2(x))


@support_torch_compile
class MPTModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = read_config(vllm_config.model_config.hf_config)
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.wte = VocabParallelEmbedding(config.vocab_size, config.d_model, prefix=f"{prefix}.wte")
        if config.uses_learned_positions:
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(
            MPTBlock(config, cache_config, quant_config, prefix=f"{prefix}.blocks.{i}") for i in range(config.n_layers))
        self.norm_f = build_norm(config, config.d_model)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        if hasattr(self, "wpe"):
            x = x + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)


class MPTForCausalLM(nn.Module, SupportsLoRA):
    # Wqkv is one module on disk and in PEFT adapters: LoRA applies to it whole, not per q/k/v. vLLM
    # wraps a QKV layer for LoRA only when it is listed, as packed from one module (itself).
    packed_modules_mapping: dict[str, list[str]] = {"Wqkv": ["Wqkv"]}
    embedding_modules: dict[str, str] = {}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = read_config(vllm_config.model_config.hf_config)
        self.config = config  # vLLM's LoRA manager reads model.config
        self.tied = config.tie_word_embeddings
        self.transformer = MPTModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer"))
        if self.tied:
            self.lm_head = self.transformer.wte
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.d_model, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=config.logit_multiplier or 1.0)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Hub / mptkit names to parameters; each parallel layer's own loader takes its shard."""
        parameters = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.tied:
                continue  # some exports store the tied head too: it is wte
            if name not in parameters:
                raise ValueError(f"mptkit's vLLM plugin: the checkpoint has {name!r} (shape {tuple(tensor.shape)}), "
                                 "which this MPT config does not have")
            parameter = parameters[name]
            getattr(parameter, "weight_loader", default_weight_loader)(parameter, tensor)
            loaded.add(name)
        return loaded
