"""Decode speed: mptkit's static-cache compiled decoder vs transformers' MptForCausalLM.generate
and llama.cpp (through llama-cpp-python, `make llama-cpp`) on a GGUF export of the same weights.

Batch 1, a 64-token prompt, 256 new tokens, greedy, the mpt-125m shape with random weights (the
speed of decoding does not depend on what the weights are). All hold the same weights in the same
dtype (llama.cpp: bf16 or f32 GGUF; with --quantize int8 also q8_0 beside mptkit's int8), in this
one process, with the same number of threads. The roofline is the memory-bandwidth bound: every new token
reads all weights once, so tokens/s <= bandwidth / weight bytes; the bandwidth is measured here,
now, by summing a tensor much larger than the caches.

    .venv/bin/python benchmarks/generate.py                      # bf16, mptkit vs transformers
    .venv/bin/python benchmarks/generate.py --quantize int8      # adds the int8 / q8_0 rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mptkit.inference.decode import Decoder, quantize_int8  # noqa: E402
from mptkit.inference.sampling import SamplingParams  # noqa: E402
from mptkit.model import MPTConfig, MPTForCausalLM  # noqa: E402


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of reading a `gib` GiB fp32 tensor (a sum: one read, almost no compute), best of `repeats`."""
    data = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer once (the tied embedding
    as the LM head), except the embedding rows looked up, which are negligible."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    if getattr(model, "int8_head", None) is not None:
        total -= model.transformer.wte.weight.numel() * model.transformer.wte.weight.element_size()
    return total


def hf_mpt(config: MPTConfig, state_dict: dict, dtype: torch.dtype):
    from transformers import MptConfig, MptForCausalLM

    hf_config = MptConfig(
        d_model=config.d_model, n_heads=config.n_heads, n_layers=config.n_layers, expansion_ratio=config.expansion_ratio,
        max_seq_len=config.max_seq_len, vocab_size=config.vocab_size, no_bias=config.no_bias,
        layer_norm_epsilon=config.layer_norm_epsilon, attn_config={"alibi": True, "alibi_bias_max": 8},
    )
    model = MptForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.to(dtype).eval()


def time_mptkit(decoder: Decoder, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    params = [SamplingParams(max_new_tokens=new_tokens)]
    start = time.perf_counter()
    tokens = [int(t) for t in decoder.generate([prompt], params)]
    return time.perf_counter() - start, tokens


@torch.no_grad()
def time_transformers(model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, out[0, len(prompt) :].tolist()


# llama.cpp runs in a child process: a crash inside ggml (seen: its AMX repacking of q8_0 weights,
# a general protection fault on a 2-core Xeon VM) costs that row, not the run.
_LLAMA_CPP_CHILD = """
import json, sys, time
import llama_cpp
path, prompt, new_tokens, repeats, threads, extra_buffers = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:])
if not extra_buffers:  # llama_model_params.use_extra_bufts, which llama-cpp-python does not expose
    default = llama_cpp.llama_model_default_params
    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params
    llama_cpp.llama_model_default_params = llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_buffers
llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt), n_threads=threads,
                      verbose=False)

def once():
    llm.reset()
    start, tokens = time.perf_counter(), []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    return time.perf_counter() - start, tokens

once()  # warm-up
best, tokens = min(once() for _ in range(repeats))
print(json.dumps({"seconds": best, "tokens": tokens}))
"""


def time_llama_cpp(model: MPTForCausalLM, outtype: str, prompt: list[int], new_tokens: int,
                   repeats: int) -> tuple[float, list[int], int, str]:
    """Seconds for prefill + `new_tokens` greedy tokens in llama.cpp (best of `repeats`), the tokens,
    the GGUF file's size (the weight bytes it reads per token, to within the metadata), and a note:
    when llama.cpp crashes with its defaults, it is run again without its extra (repacked) weight
    buffers, and the note says so."""
    from mptkit.export.gguf import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        _, path = export_gguf(Path(tmp) / "hf", Path(tmp) / "model.gguf", outtype=outtype)
        size = path.stat().st_size
        for extra_buffers, note in ((1, ""), (0, " (extra buffers off)")):
            child = subprocess.run(
                [sys.executable, "-c", _LLAMA_CPP_CHILD, str(path), json.dumps(prompt), str(new_tokens), str(repeats),
                 str(torch.get_num_threads()), str(extra_buffers)], capture_output=True, text=True)
            if child.returncode == 0:
                result = json.loads(child.stdout.strip().splitlines()[-1])
                return result["seconds"], result["tokens"], size, note
            print(f"llama.cpp {outtype}: exited with {child.returncode} with its default buffers "
                  f"({child.stderr.strip()[-300:] or 'no message'}); again without extra buffers", flush=True)
    raise RuntimeError(f"llama.cpp {outtype} failed both ways")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mpt-125m")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--quantize", choices=("int8",), help="also time int8 weight-only quantization")
    parser.add_argument("--no-compile", action="store_true", help="time the static-cache decoder without compiling")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="(skipped anyway when llama_cpp is missing)")
    parser.add_argument("--repeats", type=int, default=2, help="timed mptkit runs (best is kept)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    config = MPTConfig.from_preset(args.preset, attn_config={"attn_impl": "sdpa"})
    model = MPTForCausalLM(config).eval()
    prompt = torch.randint(2, config.vocab_size, (args.prompt_tokens,)).tolist()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(dtype)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")

    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.2f} GB/s (sum of a 1 GiB tensor)")

    rows = []

    def run_mptkit(label: str, decode_model) -> list[int]:
        decoder = Decoder(decode_model, compile=not args.no_compile)
        start = time.perf_counter()
        time_mptkit(decoder, prompt, args.new_tokens)  # compiles the step for these shapes
        print(f"{label}: warm-up (compilation) {time.perf_counter() - start:.1f}s", flush=True)
        best, tokens = min(time_mptkit(decoder, prompt, args.new_tokens) for _ in range(args.repeats))
        weight_bytes = weight_bytes_per_token(decode_model)
        rows.append((label, args.new_tokens / best, weight_bytes))
        return tokens

    ours = run_mptkit(f"mptkit {args.dtype}", model)
    theirs = None
    if not args.skip_transformers:
        # transformers' MPT in the same dtype, and in fp32 (its faster setting on CPU): the
        # speed-up is quoted against the faster of the two
        for hf_dtype in dict.fromkeys([dtype, torch.float32]):
            hf = hf_mpt(config, state, hf_dtype)
            time_transformers(hf, prompt, 8)  # warm-up
            seconds, tokens = time_transformers(hf, prompt, args.new_tokens)
            rows.append((f"transformers {str(hf_dtype)[6:]}", args.new_tokens / seconds, weight_bytes_per_token(hf)))
            theirs = tokens if hf_dtype == dtype else theirs
            del hf
    if args.quantize == "int8":
        run_mptkit("mptkit int8 weight-only", quantize_int8(model))
    llama_tokens = None
    if not args.skip_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: llama_cpp not importable (make llama-cpp builds it); its rows are left out")
        else:
            outtypes = ["bf16" if dtype == torch.bfloat16 else "f32"] + (["q8_0"] if args.quantize == "int8" else [])
            for outtype in outtypes:
                fp32 = MPTForCausalLM(config)
                fp32.load_state_dict(state)
                seconds, tokens, size, note = time_llama_cpp(fp32, outtype, prompt, args.new_tokens, args.repeats)
                rows.append((f"llama.cpp {outtype}{note}", args.new_tokens / seconds, size))
                llama_tokens = tokens if llama_tokens is None else llama_tokens

    # other jobs on the machine change the bandwidth available: measure again, keep the better
    bandwidth_after = read_bandwidth()
    print(f"read bandwidth at the end: {bandwidth_after / 1e9:.2f} GB/s")
    bandwidth = max(bandwidth, bandwidth_after)

    best_hf = max((speed for label, speed, _ in rows if label.startswith("transformers")), default=None)
    llama_same = next((speed for label, speed, _ in rows if label.startswith("llama.cpp") and "q8_0" not in label), None)
    print(f"\n{'':<36}{'tokens/s':>10}{'weight MB/token':>17}{'roofline tok/s':>16}{'% roofline':>12}"
          f"{'vs best transformers':>22}{'vs llama.cpp same dtype':>25}")
    for label, speed, weight_bytes in rows:
        roofline = bandwidth / weight_bytes
        ratio = f"{speed / best_hf:.2f}x" if best_hf else "-"
        llama_ratio = f"{speed / llama_same:.2f}x" if llama_same else "-"
        print(f"{label:<36}{speed:>10.1f}{weight_bytes / 1e6:>17.1f}{roofline:>16.1f}{100 * speed / roofline:>11.0f}%"
              f"{ratio:>22}{llama_ratio:>25}")
    if theirs is not None:
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        print(f"\ngreedy tokens identical to transformers' ({args.dtype}) for the first {agree} of {len(ours)} "
              "(in bf16 the two implementations round differently)")
    if llama_tokens is not None:
        agree = next((i for i, (a, b) in enumerate(zip(ours, llama_tokens)) if a != b), len(ours))
        print(f"greedy tokens identical to llama.cpp's for the first {agree} of {len(ours)}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
