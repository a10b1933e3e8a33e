"""`mptkit export --format gguf`: the file read back with gguf's own reader (metadata, tensor names
against gguf's TensorNameMap for MPT, the tokenizer's arrays, weights per outtype, the Q8_0 error
bound), refused configs; and, marked slow, parity with llama.cpp itself through llama-cpp-python
(`make llama-cpp`) and llama.cpp's own converter."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mptkit.data.tokenizer import bundled_tokenizer_path, load_tokenizer
from mptkit.export.commands import main as export_main
from mptkit.export.gguf import check_llama_cpp_runs, export_gguf, gguf_tensor_name, tensor_type
from mptkit.model import MPTConfig, MPTForCausalLM
from mptkit.model.alibi import alibi_slopes

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'mptkit[gguf]')")

REPO = Path(__file__).resolve().parents[1]
HELDOUT = sorted((REPO / "data/books/heldout").glob("*.txt.gz"))

# A config as a user writes it in YAML: integers where the hub has floats (clip_qkv: 6), 1e-5 read
# by YAML 1.1 as a string, every optional field spelled out. Values llama.cpp's converter can
# represent (it writes feed_forward_length 4*d_model and eps 1e-5 whatever the config says).
USER_YAML = """
d_model: 64
n_heads: 4
n_layers: 2
expansion_ratio: 4
max_seq_len: 256
vocab_size: 50432
layer_norm_epsilon: 1e-5
no_bias: true
norm_type: low_precision_layernorm
learned_pos_emb: true
logit_scale: null
embedding_fraction: 1.0
emb_pdrop: 0
resid_pdrop: 0
tie_word_embeddings: true
attn_config:
  attn_type: multihead_attention
  attn_impl: torch
  attn_pdrop: 0
  softmax_scale: null
  alibi: true
  alibi_bias_max: 16
  clip_qkv: 6
  qk_ln: false
  prefix_lm: false
  attn_uses_sequence_id: false
  sliding_window_size: -1
ffn_config:
  ffn_type: mptmlp
init_config:
  name: baseline_
  init_std: 0.3
"""


def user_config(**overrides) -> MPTConfig:
    fields = yaml.safe_load(USER_YAML)
    for key, value in overrides.items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) else value
    return MPTConfig(**fields)


def save_model(directory: Path, config: MPTConfig, tokenizer=None, bias_std: float = 0.0) -> Path:
    """A random model saved in HF format; biases (which MPT initialises to zero) drawn with `bias_std`."""
    torch.manual_seed(0)
    model = MPTForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(std=bias_std)
    model.save_pretrained(directory, tokenizer=tokenizer or load_tokenizer())
    return directory


@functools.cache
def reader(path: Path):
    """One parse per file: GGUFReader takes seconds over the 100k strings of the GPT-NeoX vocabulary."""
    return gguf.GGUFReader(path)


def fields(path: Path, *keys: str) -> dict:
    """Metadata values (`keys`, or every scalar one: the token arrays are read only when named)."""
    found = reader(path).fields
    keys = keys or [k for k, f in found.items() if not k.startswith("GGUF.") and len(f.data) == 1]
    return {key: found[key].contents() for key in keys if key in found}


def tensors(path: Path) -> dict:
    return {t.name: t for t in reader(path).tensors}


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in torch's (rows, columns) order."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """The user-YAML config with MPT's GPT-NeoX vocabulary."""
    return save_model(tmp_path_factory.mktemp("gguf-user") / "user-mpt", user_config())


@pytest.fixture(scope="module")
def neox_f16(user_model, tmp_path_factory):
    return export_gguf(user_model, tmp_path_factory.mktemp("gguf-neox") / "m.gguf", "f16")[1]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A 320-token BPE of the GPT-NeoX kind: files of small models read back in milliseconds."""
    from mptkit.data.tokenizer import train_tokenizer

    return train_tokenizer([str(HELDOUT[0])], 320, tmp_path_factory.mktemp("small-tokenizer"), progress=False)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, small_tokenizer):
    return save_model(tmp_path_factory.mktemp("gguf-small") / "small-mpt", user_config(vocab_size=384), small_tokenizer)


@pytest.fixture(scope="module")
def small_files(small_model, tmp_path_factory):
    """outtype -> GGUF file of the small model."""
    out = tmp_path_factory.mktemp("gguf-small-files")
    return {outtype: export_gguf(small_model, out / f"{outtype}.gguf", outtype)[1]
            for outtype in ("f32", "bf16", "q8_0")}


def state_of(directory: Path) -> dict:
    from mptkit.loading import load_model

    return load_model(directory, dtype="float32")[0].state_dict()


# ---- metadata, names, tokenizer -----------------------------------------------------------------


def test_metadata_is_what_llama_cpps_mpt_loader_reads(neox_f16, small_files):
    meta = fields(neox_f16)
    assert meta["general.architecture"] == "mpt"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    expected = {
        "mpt.context_length": 256, "mpt.embedding_length": 64, "mpt.block_count": 2,
        "mpt.feed_forward_length": 256, "mpt.attention.head_count": 4, "mpt.attention.head_count_kv": 4,
        "mpt.attention.clamp_kqv": 6.0, "mpt.attention.max_alibi_bias": 16.0,
    }
    assert {key: meta[key] for key in expected} == expected
    assert meta["mpt.attention.layer_norm_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    assert fields(small_files["q8_0"])["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_tensor_names_are_ggufs_own_mpt_mapping(neox_f16, user_model):
    """Every hub tensor under the name gguf's TensorNameMap gives it for MPT, in GGML's reversed shape;
    1-D tensors F32, matrices in the outtype."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.MPT, 2)
    written = tensors(neox_f16)
    state = state_of(user_model)
    expected = {names.get_name(key, try_suffixes=(".weight", ".bias")): tuple(reversed(t.shape))
                for key, t in state.items()}
    assert {name: tuple(int(n) for n in t.shape) for name, t in written.items()} == expected
    assert "output.weight" not in written  # tied: llama.cpp reuses token_embd
    for name, t in written.items():
        Q = gguf.GGMLQuantizationType
        assert t.tensor_type == (Q.F32 if len(t.shape) == 1 else Q.F16), name
    for key, tensor in state.items():  # f16 is torch's rounding, 1-D tensors unrounded
        expected = tensor if tensor.ndim == 1 else tensor.half().float()
        np.testing.assert_array_equal(dequantized(written[gguf_tensor_name(key)]), expected.numpy(), err_msg=key)


@pytest.mark.parametrize("overrides, extra", [
    ({"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}}, set()),
    ({"no_bias": False}, {"blk.0.attn_qkv.bias", "blk.0.attn_norm.bias", "blk.1.ffn_down.bias", "output_norm.bias"}),
    ({"tie_word_embeddings": False}, {"output.weight"}),
    ({"attn_config": {"alibi": False}}, {"position_embd.weight"}),
], ids=["gqa", "biases", "untied", "learned-positions"])
def test_features_llama_cpp_runs_are_written_under_its_names(tmp_path, small_tokenizer, overrides, extra):
    config = user_config(vocab_size=384, **overrides)
    path = export_gguf(save_model(tmp_path / "m", config, small_tokenizer), tmp_path, "q8_0")[1]
    written, meta = tensors(path), fields(path)
    assert path.name == "model-q8_0.gguf"
    assert extra <= set(written)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.MPT, 2)
    assert set(written) == {names.get_name(key, try_suffixes=(".weight", ".bias")) for key in state_of(tmp_path / "m")}
    assert meta["mpt.attention.head_count_kv"] == config.kv_n_heads
    assert meta["mpt.attention.max_alibi_bias"] == (16.0 if config.attn.alibi else 0.0)
    if "position_embd.weight" in written:  # llama.cpp's converter keeps the position table in F32
        assert written["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_tokenizer_arrays_are_the_tokenizers_vocabulary_and_merges(neox_f16):
    tokenizer = load_tokenizer()
    meta = fields(neox_f16, "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    meta.update(fields(neox_f16))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 50432  # one per embedding row, beyond the tokenizer's 50279 ids too
    assert tokens[: len(by_id)] == [by_id[i] for i in range(len(by_id))]
    assert tokens[len(by_id):] == [f"[PAD{i}]" for i in range(len(by_id), 50432)]
    assert meta["tokenizer.ggml.merges"] == json.loads(bundled_tokenizer_path().read_text())["model"]["merges"]
    types = meta["tokenizer.ggml.token_type"]
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert [types[i] for i in (0, 1, im_start, im_end)] == [gguf.TokenType.CONTROL] * 4
    assert types[tokenizer.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    assert types[50276] == gguf.TokenType.USER_DEFINED  # GPT-NeoX's added run of two spaces
    assert types[len(by_id)] == gguf.TokenType.UNUSED
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "mpt"
    ids = [meta[f"tokenizer.ggml.{role}_token_id"] for role in ("bos", "eos", "unknown", "padding")]
    assert ids == [0, 0, 0, 0]
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_every_hub_tensor_name_maps_and_others_fail():
    assert gguf_tensor_name("transformer.blocks.11.ffn.down_proj.weight") == "blk.11.ffn_down.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    with pytest.raises(ValueError, match="ffn.gate_proj"):
        gguf_tensor_name("transformer.blocks.0.ffn.gate_proj.weight")


# ---- weights ------------------------------------------------------------------------------------


def test_f32_and_bf16_weights_are_torchs_conversion(small_files, small_model):
    state = state_of(small_model)
    for outtype, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        written = tensors(small_files[outtype])
        for key, tensor in state.items():
            expected = tensor if tensor.ndim == 1 else tensor.to(dtype).float()
            np.testing.assert_array_equal(dequantized(written[gguf_tensor_name(key)]), expected.numpy(), err_msg=key)
    assert written["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.BF16


def test_q8_0_error_is_within_half_a_step_of_each_block(small_files, small_model):
    """Q8_0: blocks of 32 values, one fp16 scale d = max|x|/127 each, values rounded to d*q. So every
    value is within d/2, plus the scale's own fp16 rounding times |q| <= 127."""
    state, written = state_of(small_model), tensors(small_files["q8_0"])
    for key in ("transformer.wte.weight", "transformer.blocks.1.ffn.down_proj.weight"):
        assert written[gguf_tensor_name(key)].tensor_type == gguf.GGMLQuantizationType.Q8_0
        x = state[key].numpy().reshape(-1, 32)
        error = np.abs(dequantized(written[gguf_tensor_name(key)]).reshape(-1, 32) - x)
        scale = np.abs(x).max(axis=1, keepdims=True) / 127
        scale16 = scale.astype(np.float16).astype(np.float32)
        bound = scale / 2 + 127 * np.abs(scale - scale16) + 1e-7
        assert (error <= bound).all(), key
        assert 0 < error.mean() < 0.3 * scale.mean()  # quantized, and not worse than rounding


def test_tensor_types_follow_llama_cpps_converter():
    Q = gguf.GGMLQuantizationType
    assert tensor_type("blk.0.ffn_up.weight", (256, 64), "q8_0") == Q.Q8_0
    assert tensor_type("blk.0.ffn_up.weight", (256, 48), "q8_0") == Q.F16  # rows not whole 32-blocks
    assert tensor_type("blk.0.ffn_up.bias", (256,), "bf16") == Q.F32
    assert tensor_type("position_embd.weight", (256, 64), "f16") == Q.F32


def test_ggml_alibi_slopes_are_mpts_for_every_head_count():
    """ggml's soft_max ALiBi (ggml-cpu/ops.cpp): n = 2^floor(log2 H), m0 = 2^(-b/n), m1 = 2^(-b/2/n),
    head h < n gets m0^(h+1), the others m1^(2(h-n)+1). mptkit's (MPT's) slopes are the same."""
    for heads in range(1, 65):
        for bias_max in (8, 16):
            n = 2 ** math.floor(math.log2(heads))
            m0, m1 = 2.0 ** (-bias_max / n), 2.0 ** (-bias_max / 2 / n)
            ggml = [m0 ** (h + 1) if h < n else m1 ** (2 * (h - n) + 1) for h in range(heads)]
            np.testing.assert_allclose(alibi_slopes(heads, bias_max, dtype=torch.float64).numpy(), ggml, rtol=1e-12)


# ---- refused configs and the command --------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    ({"attn_config": {"alibi": False, "rope": True}}, "attn_config.rope"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_config.ffn_type"),
    ({"norm_type": "rmsnorm"}, "norm_type"),
    ({"logit_scale": "inv_sqrt_d_model"}, "logit_scale"),
    ({"attn_config": {"qk_ln": True}}, "attn_config.qk_ln"),
    ({"attn_config": {"prefix_lm": True}}, "attn_config.prefix_lm"),
    ({"attn_config": {"sliding_window_size": 64}}, "attn_config.sliding_window_size"),
    ({"attn_config": {"softmax_scale": 0.5}}, "attn_config.softmax_scale"),
])
def test_configs_llama_cpp_cannot_run_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"GGUF export: {field.replace('.', '[.]')}: "):
        check_llama_cpp_runs(user_config(**overrides))


def test_the_command_writes_into_a_directory_and_refuses_before_writing(tmp_path, small_model, small_tokenizer, capsys):
    assert export_main("export", [str(small_model), str(tmp_path), "--format", "gguf", "--outtype", "q8_0"]) == 0
    assert (tmp_path / "model-q8_0.gguf").is_file()
    assert str(tmp_path / "model-q8_0.gguf") in capsys.readouterr().out
    glu = save_model(tmp_path / "glu", user_config(vocab_size=384, ffn_config={"ffn_type": "mptglu"}), small_tokenizer)
    assert export_main("export", [str(glu), str(tmp_path / "glu.gguf"), "--format", "gguf"]) == 2
    assert "ffn_config.ffn_type" in capsys.readouterr().err and not (tmp_path / "glu.gguf").exists()
    with pytest.raises(SystemExit):
        export_main("export", [str(small_model), str(tmp_path / "hf"), "--outtype", "f16"])
    assert "--outtype is for --format gguf" in capsys.readouterr().err


# ---- llama.cpp itself (slow: `make llama-cpp` builds llama-cpp-python) ------------------------------
#
# Recorded runs: docs/benchmarks.md, "GGUF / llama.cpp parity". A trained model makes the greedy and
# perplexity checks meaningful: MPTKIT_GGUF_PARITY_MODEL names one (an export or a training run);
# without it a tiny model is trained here for a few seconds.

F32_CACHE = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32 KV cache: llama.cpp's default is f16
# Where the extracted llama-cpp-python sdist holds llama.cpp's converter (LLAMA_CPP_CONVERTER overrides).
SDIST_CONVERTER = "/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp is not importable: `make llama-cpp` builds llama-cpp-python")
    return llama_cpp


def llama(path: Path, n_ctx: int = 256, **options):
    """llama.cpp on `path`, without its extra (repacked) weight buffers: on a Xeon with AMX, q8_0
    with them died with a general protection fault (llama-cpp-python 0.3.36), which would take
    pytest with it. They only re-lay the weights out for speed."""
    llama_cpp = _llama_cpp()
    bindings = llama_cpp.llama.llama_cpp  # the module whose defaults Llama() reads
    default = bindings.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                               seed=0, **options)
    finally:
        bindings.llama_model_default_params = default


def llama_logits(model, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (one fresh evaluation)."""
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def mptkit_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@functools.cache
def ggml_gelu_table() -> torch.Tensor:
    """ggml's fp16 GELU table (ggml-cpu.c, ggml_cpu_init): for every fp16 x, fp16(ggml_gelu_f32(x)), the
    tanh approximation evaluated in float32 in C's order with the C library's tanhf."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.tanhf.restype, libm.tanhf.argtypes = ctypes.c_float, [ctypes.c_float]
    f = np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
        inner = f(0.79788456080286535587989211986876) * x * (f(1) + f(0.044715) * x * x)
        tanh = np.array([libm.tanhf(float(v)) for v in inner], dtype=np.float32)
        table = (f(0.5) * x * (f(1) + tanh)).astype(np.float16)
    return torch.from_numpy(table.astype(np.float32))


def ggml_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """ggml's CPU GELU on f32 (ggml_vec_gelu_f32 under GGML_GELU_FP16, ggml-cpu/vec.h): the table at the
    fp16-rounded input; x itself from 10 up, 0 from -10 down."""
    index = x.half().view(torch.int16).long() & 0xFFFF
    looked_up = ggml_gelu_table()[index].to(x.dtype)
    return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), looked_up))


@pytest.fixture(scope="module")
def parity_model(tmp_path_factory):
    """(HF directory, loaded fp32 model, tokenizer) of a trained model."""
    from mptkit.loading import load

    given = os.environ.get("MPTKIT_GGUF_PARITY_MODEL")
    if given:
        source = Path(given)
    else:
        from mptkit.train.config import load_run
        from mptkit.train.loop import train

        from .train_support import PRETRAIN_YAML, pretrain_overrides

        source = tmp_path_factory.mktemp("gguf-parity-run")
        train(load_run(PRETRAIN_YAML, pretrain_overrides(source, steps=40, **{"checkpoint.interval": 40})))
        source = source / "checkpoints"
    loaded = load(source, dtype="float32")
    return source, loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def parity_gguf(parity_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-parity")
    return {outtype: export_gguf(parity_model[0], out, outtype)[1] for outtype in ("f32", "f16", "q8_0")}


def heldout_ids(tokenizer, per_book: int) -> list[list[int]]:
    return [tokenizer.encode(gzip.open(path, "rt", encoding="utf-8").read())[:per_book] for path in HELDOUT]


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_heldout_books_as_mptkit_does(parity_gguf, parity_model):
    tokenizer = parity_model[2]
    vocab = _llama_cpp().Llama(model_path=str(parity_gguf["f32"]), vocab_only=True, verbose=False)
    for path in HELDOUT:
        text = gzip.open(path, "rt", encoding="utf-8").read()
        assert vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tokenizer.encode(text), path.name
    chat = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi  there\t\n"}],
                                         tokenize=False, add_generation_prompt=True)
    assert vocab.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer.encode(chat)


@pytest.mark.slow
def test_llama_cpp_f32_logits_match_mptkits_at_every_position(parity_gguf, parity_model, monkeypatch):
    """256 positions of held-out text. With ggml's GELU put into mptkit, the oracle is mptkit in
    float64: llama.cpp's f32 is as close to it as mptkit's own f32 (within 3x). Against mptkit as it
    is (exact GELU), the GELU approximation shows: within 2e-3 of max|logit| (f32 KV cache) and 5e-3
    (llama.cpp's default f16 KV cache), and the argmax agrees at nearly every position."""
    model, tokenizer = parity_model[1:]
    ids = heldout_ids(tokenizer, 256)[0]
    theirs = llama_logits(llama(parity_gguf["f32"], **F32_CACHE), ids)
    default_cache = llama_logits(llama(parity_gguf["f32"]), ids)
    exact = mptkit_logits(model, ids)
    monkeypatch.setattr(torch.nn.functional, "gelu", ggml_gelu)
    emulated = mptkit_logits(model, ids)
    with torch.no_grad():
        reference = model.double()(torch.tensor([ids])).logits[0].numpy()
    model.float()
    scale = np.abs(exact).max()
    errors = {name: float(np.abs(a - b).max() / scale) for name, a, b in (
        ("llama.cpp f32 vs float64 (ggml GELU)", theirs, reference),
        ("mptkit f32 vs float64 (ggml GELU)", emulated, reference),
        ("llama.cpp f32 vs mptkit f32", theirs, exact), ("llama.cpp f16 KV cache vs mptkit f32", default_cache, exact))}
    agree = float((theirs.argmax(-1) == exact.argmax(-1)).mean())
    print(f"\n[gguf parity] {len(ids)} positions, max|logit| {scale:.2f}, argmax agreement {agree:.4f}, "
          "max |diff| / max|logit|: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["llama.cpp f32 vs float64 (ggml GELU)"] <= 3 * errors["mptkit f32 vs float64 (ggml GELU)"] + 1e-6
    assert errors["llama.cpp f32 vs mptkit f32"] < 2e-3
    assert errors["llama.cpp f16 KV cache vs mptkit f32"] < 5e-3
    assert agree > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"n_heads": 12, "d_model": 96},  # ALiBi slopes of a head count that is not a power of two
    {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
    {"attn_config": {"attn_type": "multiquery_attention"}},
    {"attn_config": {"alibi": False}},
    {"no_bias": False, "tie_word_embeddings": False, "expansion_ratio": 3},
], ids=["12-heads", "gqa", "mqa", "learned-positions", "biases-untied-ffn3x"])
def test_llama_cpp_runs_every_feature_it_accepts(tmp_path, overrides, monkeypatch):
    """Random weights (init std 0.3, so clip_qkv clamps), ggml's GELU put into mptkit. Such weights
    make f32 itself inexact (mptkit's f32 logits are ~1e-4 of max|logit| off its own float64 ones),
    so the oracle is mptkit in float64: llama.cpp's f32 must be about as close to it as mptkit's f32."""
    from mptkit.loading import load

    directory = save_model(tmp_path / "m", user_config(**overrides), bias_std=0.1)
    model = load(directory, dtype="float32").model
    ids = heldout_ids(load_tokenizer(), 128)[1]
    theirs = llama_logits(llama(export_gguf(directory, tmp_path, "f32")[1], **F32_CACHE), ids)
    monkeypatch.setattr(torch.nn.functional, "gelu", ggml_gelu)
    ours = mptkit_logits(model, ids)
    with torch.no_grad():
        reference = model.double()(torch.tensor([ids])).logits[0].numpy()
    ours_error, their_error = np.abs(ours - reference).max(), np.abs(theirs - reference).max()
    print(f"\n[gguf parity] {overrides}: max |logit - float64| mptkit f32 {ours_error:.2e}, "
          f"llama.cpp f32 {their_error:.2e}")
    assert their_error <= 3 * ours_error + 1e-6 * np.abs(reference).max(), (their_error, ours_error)


def _greedy(parity_model, gguf_file: Path, prompts: list[list[int]], new_tokens: int) -> tuple[list, list]:
    from mptkit.inference.decode import Decoder
    from mptkit.inference.sampling import SamplingParams

    decoder = Decoder(parity_model[1])
    ours = [[int(step[0]) for step in decoder.generate([p], [SamplingParams(max_new_tokens=new_tokens)], pad_id=0)]
            for p in prompts]
    model, theirs = llama(gguf_file), []
    for prompt in prompts:
        model.reset()
        model.eval(prompt)
        row = []
        for _ in range(new_tokens):
            row.append(int(np.argmax(model.scores[model.n_tokens - 1])))
            model.eval([row[-1]])
        theirs.append(row)
    return ours, theirs


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llama_cpp_greedy_tokens_follow_mptkits(parity_gguf, parity_model, outtype):
    """llama.cpp as users run it (f16 KV cache): 8 prompts from the held-out books, 32 greedy tokens.
    A row may part ways only where mptkit's own two candidates are within 0.05 of each other (the
    size of the logit change f16/q8_0 weights make); until then the tokens are the same."""
    model, tokenizer = parity_model[1:]
    prompts = [book[start : start + 48] for book in heldout_ids(tokenizer, 4096) for start in (0, 1000, 2000, 3000)]
    ours, theirs = _greedy(parity_model, parity_gguf[outtype], prompts, 32)
    agree, margins = [], []
    for prompt, mine, other in zip(prompts, ours, theirs):
        agree.append(next((i for i, (a, b) in enumerate(zip(mine, other)) if a != b), len(mine)))
        if agree[-1] < len(mine):
            logits = mptkit_logits(model, prompt + mine[: agree[-1]])[-1]
            margins.append(float(logits[mine[agree[-1]]] - logits[other[agree[-1]]]))
    print(f"\n[gguf parity] {outtype} greedy: identical tokens before the first difference, per prompt: {agree}; "
          f"mptkit's logit margin where they part: {[round(m, 4) for m in margins]}")
    assert all(0 <= margin < 0.05 for margin in margins)


def perplexity(logits_of, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in windows:
        logits = torch.from_numpy(logits_of(ids)).double()
        total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return math.exp(total / count)


@pytest.mark.slow
def test_q8_0_changes_heldout_perplexity_by_under_half_a_percent(parity_gguf, parity_model):
    """Nonoverlapping 256-token windows, 8 from each held-out book."""
    model, tokenizer = parity_model[1:]
    windows = [book[i : i + 256] for book in heldout_ids(tokenizer, 8 * 256) for i in range(0, 8 * 256, 256)]
    result = {"mptkit f32": perplexity(lambda ids: mptkit_logits(model, ids), windows)}
    for outtype in ("f32", "f16", "q8_0"):
        runner = llama(parity_gguf[outtype])
        result[f"llama.cpp {outtype}"] = perplexity(lambda ids: llama_logits(runner, ids), windows)
    print(f"\n[gguf parity] held-out perplexity, {len(windows)} x 256 tokens: "
          + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    assert abs(result["llama.cpp f32"] / result["mptkit f32"] - 1) < 1e-3
    assert abs(result["llama.cpp q8_0"] / result["llama.cpp f32"] - 1) < 5e-3


def _converter() -> Path:
    candidates = [os.environ.get("LLAMA_CPP_CONVERTER"), SDIST_CONVERTER]
    for candidate in filter(None, candidates):
        if Path(candidate).is_file():
            return Path(candidate)
    pytest.skip("llama.cpp's convert_hf_to_gguf.py not found: set LLAMA_CPP_CONVERTER (e.g. vendor/llama.cpp/ of "
                "the extracted llama-cpp-python sdist)")


@pytest.mark.slow
def test_llama_cpps_own_converter_reads_the_export_and_agrees_with_ours(user_model, tmp_path):
    """The HF export of the user-YAML config through convert_hf_to_gguf.py (which reads config.json
    with transformers' strict MptConfig): the same tensors, tokenizer arrays and logits as ours."""
    converter = _converter()
    out = tmp_path / "converter-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
    done = subprocess.run([sys.executable, str(converter), str(user_model), "--outtype", "f32", "--outfile", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Failed to load model config" not in done.stderr, "transformers' MptConfig refused config.json"
    ours_file = export_gguf(user_model, tmp_path / "ours-f32.gguf", "f32")[1]
    theirs, ours = tensors(out), tensors(ours_file)
    assert set(theirs) == set(ours)
    for name in ours:
        np.testing.assert_array_equal(theirs[name].data, ours[name].data, err_msg=name)
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template",
            "mpt.attention.clamp_kqv", "mpt.attention.max_alibi_bias", "mpt.feed_forward_length",
            "mpt.attention.layer_norm_epsilon", "mpt.context_length")
    assert fields(out, *keys) == fields(ours_file, *keys)
    tokenizer = load_tokenizer(str(user_model))
    ids = heldout_ids(tokenizer, 200)[0]
    np.testing.assert_array_equal(llama_logits(llama(out, **F32_CACHE), ids),
                                  llama_logits(llama(ours_file, **F32_CACHE), ids))
