"""Any model mptkit reads, as one GGUF file for llama.cpp and the tools built on it (Ollama, LM Studio):
`mptkit export SOURCE OUT --format gguf --outtype f32|f16|bf16|q8_0`.

Written with the `gguf` package alone (no llama.cpp checkout), in the layout llama.cpp's own
converter gives an MPT model (architecture "mpt"), so that llama.cpp's MPT graph
(`src/models/mpt.cpp`) runs it. What that graph computes, and so what this module accepts:
- pre-LN blocks with LayerNorm (weight, optional bias) and a fused `attn_qkv` of n_embd + 2 *
  n_embd_kv rows (multi-head, grouped- or multi-query), clamped to +-clamp_kqv before the Q/K/V
  split (MPT's clip_qkv), scale 1/sqrt(head_dim), ALiBi from max_alibi_bias (ggml's slopes are
  MPT's for every head count), a learned `position_embd` table when present, an up -> GELU -> down
  FFN of any width, optional biases everywhere, an untied `output` or the tied `token_embd`;
- nothing else: no RoPE, no gated FFN, no RMSNorm, no logit scale, no prefix-LM or sliding-window
  mask, no other softmax scale, and no qk_ln (its q/k norm branch aborts on a batch of more than one
  token in the llama.cpp of llama-cpp-python 0.3.36). Such configs are refused naming the field
  (`unsupported_fields`).
One difference no config can avoid: ggml's CPU GELU is the tanh approximation looked up from an
fp16-rounded input (ggml-cpu/vec.h), MPT's the exact erf GELU; it bounds f32 parity (docs/benchmarks.md).

Tensors are converted and written one at a time, after the header, so peak memory is the model as
loaded (in the dtype it is stored in) plus one converted tensor.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mptkit.files import staged
from mptkit.loading import ModelSource, find_source, load, read_model_config

from .defaults import DEFAULT_OUTTYPE, OUTTYPES
from .model_card import CARD_FILE, Export, model_card

ARCHITECTURE = "mpt"
# llama.cpp's name for the GPT-NeoX/MPT byte-level BPE pre-tokenizer (the GPT-2 regex): what its
# converter writes for mosaicml/mpt-7b's tokenizer (src/llama-vocab.cpp maps it to PRE_TYPE_MPT).
TOKENIZER_PRE = "mpt"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'mptkit[gguf]'") from None
    return gguf


# ---- what llama.cpp's MPT graph cannot run -------------------------------------------------------


def unsupported_fields(config) -> list[tuple[str, str]]:
    """(config field, why) for each feature of `config` that llama.cpp's MPT graph does not compute."""
    attn, ffn = config.attn, config.ffn
    default_scale = 1.0 / math.sqrt(config.head_dim)
    checks = [
        (attn.rope, "attn_config.rope", "llama.cpp's MPT graph applies no rotary embedding"),
        (ffn.ffn_type != "mptmlp", "ffn_config.ffn_type",
         f"{ffn.ffn_type}: llama.cpp's MPT FFN is up -> GELU -> down, without a gate"),
        ("rmsnorm" in config.norm_type, "norm_type", f"{config.norm_type}: llama.cpp's MPT graph uses LayerNorm"),
        (config.logit_scale is not None, "logit_scale",
         f"{config.logit_scale!r}: llama.cpp's MPT graph does not scale the logits"),
        # mpt.cpp reshapes the Q/K views of the fused QKV output with ggml_reshape_2d, which asserts a
        # contiguous tensor: loading a qk_ln model aborts (GGML_ASSERT(ggml_is_contiguous(a)), ggml.c)
        # as soon as a batch has more than one token; and its k-norm spans n_embd, not the key width.
        (attn.qk_ln, "attn_config.qk_ln", "llama.cpp's MPT graph aborts on q/k LayerNorms (ggml_reshape_2d of "
                                          "a non-contiguous view)"),
        (attn.prefix_lm, "attn_config.prefix_lm", "llama.cpp attends causally only (no bidirectional prefix)"),
        (attn.sliding_window_size > 0, "attn_config.sliding_window_size",
         f"{attn.sliding_window_size}: llama.cpp's MPT graph has no sliding-window attention"),
        (attn.softmax_scale is not None and not math.isclose(attn.softmax_scale, default_scale, rel_tol=1e-6),
         "attn_config.softmax_scale", f"{attn.softmax_scale}: llama.cpp's MPT graph scales by 1/sqrt(head_dim)"),
    ]
    return [(field, why) for failed, field, why in checks if failed]


def check_llama_cpp_runs(config) -> None:
    """Raise ValueError naming the first config field llama.cpp's MPT graph cannot run."""
    problems = unsupported_fields(config)
    if problems:
        field, why = problems[0]
        raise ValueError(f"GGUF export: {field}: {why}, so llama.cpp would compute another model")


# ---- tensors --------------------------------------------------------------------------------------

# hub name (without .weight/.bias) -> GGUF name, as gguf's TensorNameMap for MPT maps them.
_GLOBAL_TENSORS = {
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.norm_f": "output_norm",
    "lm_head": "output",
}
_BLOCK_TENSORS = {
    "norm_1": "attn_norm",
    "attn.Wqkv": "attn_qkv",
    "attn.out_proj": "attn_output",
    "norm_2": "ffn_norm",
    "ffn.up_proj": "ffn_up",
    "ffn.down_proj": "ffn_down",
}


def gguf_tensor_name(hub_name: str) -> str:
    """`transformer.blocks.3.attn.Wqkv.weight` -> `blk.3.attn_qkv.weight` (llama.cpp's MPT names)."""
    stem, _, suffix = hub_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["transformer", "blocks"] and parts[3] in _BLOCK_TENSORS:
        return f"blk.{parts[2]}.{_BLOCK_TENSORS[parts[3]]}.{suffix}"
    raise ValueError(f"GGUF export: no llama.cpp MPT tensor for {hub_name!r}")


@dataclass(frozen=True)
class TensorPlan:
    hub_name: str
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (rows, columns); GGUF stores it reversed
    qtype: object  # gguf.GGMLQuantizationType


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type llama.cpp's converter picks: 1-D tensors, norms and the position table stay F32;
    a Q8_0 tensor whose rows are not whole 32-value blocks falls back to F16."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or gguf_name.startswith("position_embd."):
        return Q.F32
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return Q.F16 if shape[-1] % block_size else qtype


def _byte_count(shape: tuple[int, ...], qtype) -> int:
    block_size, type_size = _gguf().GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def _converted(tensor: torch.Tensor, qtype) -> np.ndarray:
    data = tensor.detach().to("cpu", torch.float32).numpy()
    return _gguf().quants.quantize(data, qtype)


# ---- metadata -------------------------------------------------------------------------------------


def _file_type(outtype: str):
    F = _gguf().LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype]


def write_model_metadata(writer, config, outtype: str, name: str) -> None:
    """The hyperparameters llama.cpp's MPT loader reads (llama-model.cpp's general keys, mpt.cpp's own)."""
    attn = config.attn
    writer.add_type(_gguf().GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_n_heads)
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
    if attn.clip_qkv is not None:
        writer.add_clamp_kqv(float(attn.clip_qkv))
    writer.add_max_alibi_bias(float(attn.alibi_bias_max) if attn.alibi else 0.0)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)


def _check_byte_level_bpe(backend: dict) -> None:
    pre = backend.get("pre_tokenizer") or {}
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        raise ValueError(
            "GGUF export: the tokenizer must be a byte-level BPE with GPT-NeoX's pre-tokenizer (ByteLevel, regex, "
            f"no prefix space) for llama.cpp's {TOKENIZER_PRE!r} pre-tokenizer; got model {model.get('type')!r}, "
            f"pre_tokenizer {pre.get('type')!r}"
        )


def tokenizer_arrays(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges as llama.cpp's converter writes a GPT-2-style BPE: one entry per
    embedding row (ids the tokenizer lacks are `[PAD{id}]`, UNUSED), added special tokens CONTROL,
    other added tokens USER_DEFINED, the rest NORMAL."""
    TokenType = _gguf().TokenType
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    _check_byte_level_bpe(backend)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
            continue
        if index in added and not added[index].normalized:
            # llama.cpp takes control and user-defined tokens as already normalized (the converter's rule)
            token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
        if index in added:
            special = added[index].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    return tokens, types, merges


def write_tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """The GPT-NeoX BPE (tokens, types, merges), MPT's special-token ids, no BOS/EOS added to prompts,
    and the tokenizer's chat template: mpt-7b-chat's ChatML (`CHATML_CHAT_TEMPLATE`), which
    mptkit's tokenizer loader sets unless the tokenizer brings a template of its own."""
    tokens, types, merges = tokenizer_arrays(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ---- the export -----------------------------------------------------------------------------------


def gguf_path(out: str | Path, outtype: str) -> Path:
    """`out` itself, or `model-<outtype>.gguf` inside it when it is a directory (or ends with /)."""
    if str(out).endswith(("/", os.sep)) or Path(out).is_dir():  # the slash before Path() drops it
        return Path(out) / f"model-{outtype}.gguf"
    return Path(out)


def export_gguf(source: str | Path, out: str | Path, outtype: str = DEFAULT_OUTTYPE,
                tokenizer: str | None = None, revision: str | None = None) -> tuple[ModelSource, Path]:
    """Write the model at `source` (anything `mptkit.loading` reads) as one GGUF file for llama.cpp;
    returns what was read and the file written. A config llama.cpp's MPT graph cannot run fails
    before anything is written (ValueError naming the field). Written into a directory, the file
    gets a model card (README.md) beside it, unless one is there already."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    found = find_source(source, revision)
    check_llama_cpp_runs(read_model_config(found))
    # the stored dtype: loading neither copies nor rounds; the conversion happens tensor by tensor
    loaded = load(found.reference, dtype=found.stored_dtype(), tokenizer=tokenizer)
    model, config = loaded.model, loaded.model.config
    state = model.state_dict()
    plan = [TensorPlan(key, name := gguf_tensor_name(key), tuple(t.shape), tensor_type(name, tuple(t.shape), outtype))
            for key, t in state.items()]
    path = gguf_path(out, outtype)
    with staged(path, sum(_byte_count(item.shape, item.qtype) for item in plan)) as temp:
        writer = gguf.GGUFWriter(temp, ARCHITECTURE)
        try:
            write_model_metadata(writer, config, outtype, loaded.source.name)
            write_tokenizer_metadata(writer, loaded.tokenizer, config.vocab_size)
            for item in plan:
                writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32),
                                       _byte_count(item.shape, item.qtype), raw_dtype=item.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for item in plan:
                writer.write_tensor_data(_converted(state[item.hub_name], item.qtype))
        finally:
            writer.close()
    card = path.parent / CARD_FILE
    if path != Path(out) and not card.exists():  # written into a directory: the card goes beside it
        export = Export("gguf", str(path.parent), f"{outtype} GGUF ({path.name})", gguf_file=path.name)
        text = model_card(model, loaded.tokenizer, loaded.source, export).encode()
        with staged(card, len(text)) as temp:
            temp.write_bytes(text)
    return loaded.source, path
