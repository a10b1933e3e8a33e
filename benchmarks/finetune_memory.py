"""Fine-tuning memory: peak RSS and tokens/s of full fine-tuning vs LoRA vs LoRA on an int8 base,
and one LoRA optimizer step of the MPT-7B shape, on CPU; then predicted GPU peaks at seq 2048.

    .venv/bin/python benchmarks/finetune_memory.py                    # mpt-1b, seq 512, batch 1: 3 variants
    .venv/bin/python benchmarks/finetune_memory.py --mode 7b-step     # mpt-7b: 1 LoRA step, bf16 base, recompute
    .venv/bin/python benchmarks/finetune_memory.py --preset tiny --seq-len 64 --mode 7b-step   # smoke runs
    .venv/bin/python benchmarks/finetune_memory.py --preset tiny --seq-len 64

Each variant runs in its own process, so that its peak resident memory (ru_maxrss) is its own; the
process builds the model through the trainer's own `build_model` (preset weights drawn on the meta
device and materialised: for 7B, 13 GB of random bf16 weights), then runs `forward_backward` + AdamW
steps on random tokens. Reported per variant: parameters (all, trainable), RSS of the bare process
(torch imported), after the build, and at peak; median seconds per step and tokens/s.

Expect long runs on 2 CPU cores: an mpt-1b step at seq 512 is ~4 TFLOP (minutes), full fine-tuning
of mpt-1b needs ~21 GB for fp32 weights, gradients and AdamW moments (it may not fit in 24 GB; the
run reports a killed variant and goes on), and the mpt-7b step is ~20 TFLOP (the script prints its
estimate first). The 7B mode's base is bf16 (13 GB) computed in fp32 (`lora.base_quantization:
bf16`): on CPUs without native bf16, torch's bf16 matmuls took 5x (forward) and 70x (the input
gradient, a row-major right operand) fp32's time here; `--precision bf16` computes in bf16.

The GPU numbers at the end are predictions, not measurements: bytes per parameter of each base
(bf16 2; NF4 4.127 bits for block projections plus bf16 embedding and norms), 16 bytes per trainable
parameter (fp32 weight, gradient, two AdamW moments), and the activation bytes per token measured
here (peak - build, over the step's tokens; measured on another preset, all but the logits' share
is scaled to the 7B shape by d_model * n_layers), times 2048 tokens, plus 1 GiB of CUDA context. CPU attention
materialises its score matrices, so the per-token cost measured here bounds a flash-attention GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("full", "lora", "lora-int8", "lora-bf16")  # lora-bf16: bf16 base, computed in --precision
BASES = {"lora": "none", "lora-int8": "int8", "lora-bf16": "bf16"}
GIB = 1024**3
NF4_BITS = 4.127  # 4-bit codes + double-quantized absmax per 64 weights (QLoRA paper, section 3)
CUDA_CONTEXT = 1 * GIB
LOGIT_BYTES = 12  # per token and vocabulary entry: fp32 logits, their gradient, a bf16 copy and softmax temporaries
SEVEN_B = {"d_model": 4096, "n_layers": 32, "vocab": 50432}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("compare", "7b-step"), default="compare")
    p.add_argument("--preset", default=None, help="default: mpt-1b (compare), mpt-7b (7b-step)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (MPT's four projections)")
    p.add_argument("--variants", default="full,lora,lora-int8", help="which of " + ", ".join(VARIANTS) +
                   " (7b-step: lora-bf16)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="compute dtype (default fp32: CPUs without native bf16 run bf16 matmuls 5x, their "
                        "backward 70x slower; with bf16 the lora variant's base is bf16 too)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: off (compare), on (7b-step)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 2 compare, 1 7b-step)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 compare, 0 7b-step)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's job
    args = p.parse_args(argv)
    seven = args.mode == "7b-step"
    args.preset = args.preset or ("mpt-7b" if seven else "mpt-1b")
    if args.activation_checkpointing is None:
        args.activation_checkpointing = seven
    args.steps = args.steps if args.steps is not None else (1 if seven else 2)
    args.warmup = args.warmup if args.warmup is not None else (0 if seven else 1)
    return args


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def run_variant(args) -> dict:
    """In the child: build one variant with the trainer's code, step it, measure."""
    import torch

    from mptkit.adapters import BaseIdentity, LoraSpec
    from mptkit.model import MPTConfig
    from mptkit.train.config import ModelConfig, OptimizerConfig, ResolvedRun, RunConfig, TrainConfig
    from mptkit.train.loop import build_model, forward_backward, target_count
    from mptkit.train.optim import build_optimizer
    from mptkit.train.parallel import DistributedEnv

    bare = _current_rss_gib()
    lora = None
    if args.variant != "full":
        lora = LoraSpec(rank=args.rank, alpha=2 * args.rank, base_quantization=BASES[args.variant])
    config = RunConfig(model=ModelConfig(preset=args.preset), lora=lora, train=TrainConfig(
        precision=args.precision, activation_checkpointing=args.activation_checkpointing, seq_len=args.seq_len))
    model_config = MPTConfig.from_preset(args.preset, max_seq_len=max(args.seq_len, 128))
    # Built directly (no data files to check): the run's model is all this benchmark steps.
    run = ResolvedRun(config=config, model_config=model_config, seq_len=args.seq_len,
                      lora_base=None if lora is None else BaseIdentity(path=None, sha256="benchmark"))
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    started = time.perf_counter()
    model = build_model(run, env, initialize=True)
    build_seconds = time.perf_counter() - started
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
    built = _current_rss_gib()
    tokens = torch.randint(0, 50277, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens, "labels": tokens}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    scale = 1.0 / target_count(tokens).float()
    seconds, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(forward_backward(model, batch, autocast, scale).item() * scale.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds)
    return {
        "variant": args.variant, "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "d_model": model_config.d_model, "n_layers": model_config.n_layers,
        "rss_bare_gib": bare, "rss_built_gib": built, "peak_rss_gib": _rss_gib(), "build_s": build_seconds,
        "step_s": step, "tokens_per_s": args.batch * args.seq_len / step, "losses": losses,
    }


def _child(args, variant: str) -> dict:
    argv = [sys.executable, __file__, "--variant", variant, "--mode", args.mode, "--preset", args.preset,
            "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--rank", str(args.rank),
            "--precision", args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--activation-checkpointing" if args.activation_checkpointing else "--no-activation-checkpointing"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        why = "killed (SIGKILL: out of memory?)" if done.returncode == -9 else f"exit {done.returncode}"
        print(f"# {variant}: did not finish: {why}\n{done.stderr[-1500:]}", flush=True)
        return {"variant": variant, "failed": why}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _estimate(args) -> str:
    """Seconds an optimizer step will take, from a GEMM measured now (for the 7B mode's banner)."""
    import torch

    from mptkit.model import MPTConfig
    from mptkit.train.metrics import measure_gemm_tflops

    config = MPTConfig.from_preset(args.preset)
    n = 12 * config.d_model**2 * config.n_layers + config.vocab_size * config.d_model
    # forward, recomputed forward (checkpointing) and the input-gradient backward: ~3 x 2N per token
    flops = (3 if args.activation_checkpointing else 2) * 2 * n * args.batch * args.seq_len
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    tflops = measure_gemm_tflops(dtype, torch.device("cpu"), size=1024, repeats=2)
    return f"~{flops / 1e12:.1f} TFLOP per step at a measured {tflops * 1e3:.1f} GFLOP/s ({args.precision}): " \
           f"expect ~{flops / (tflops * 1e12) / 60:.0f} min"


def predictions(measured: dict, tokens: int) -> list[str]:
    """Predicted GPU peaks of LoRA / QLoRA on the 7B shape at seq 2048, from this run's costs."""
    from mptkit.model import MPTConfig

    seven = MPTConfig.from_preset("mpt-7b")
    blocks = 12 * seven.d_model**2 * seven.n_layers
    others = seven.vocab_size * seven.d_model + (2 * seven.n_layers + 1) * seven.d_model
    adapters = seven.n_layers * 16 * 8 * seven.d_model  # rank 8 on Wqkv, out_proj, up_proj, down_proj
    per_token = (measured["peak_rss_gib"] - measured["rss_built_gib"]) * GIB / tokens
    scale = (seven.d_model * seven.n_layers) / (measured["d_model"] * measured["n_layers"])
    if scale != 1:  # the logits (same vocabulary in every preset) do not grow with the model
        per_token = max(per_token - LOGIT_BYTES * seven.vocab_size, 0.0) * scale + LOGIT_BYTES * seven.vocab_size
    # The same from first principles, for a flash-attention GPU: bf16 block inputs kept by recompute,
    # one block's recomputed tensors and their gradients (~18 d values), and the logits.
    analytic = 2 * seven.d_model * (seven.n_layers + 18) + LOGIT_BYTES * seven.vocab_size
    rows = []
    for name, base_bytes in (("LoRA, bf16 base", 2.0 * (blocks + others)),
                             ("QLoRA, NF4 base", blocks * NF4_BITS / 8 + 2.0 * others)):
        for source, activations in (("this run's per-token cost", per_token * 2048), ("analytic", analytic * 2048)):
            total = base_bytes + 16 * adapters + activations + CUDA_CONTEXT
            rows.append(f"| {name} | {source} | {base_bytes / GIB:.1f} | {16 * adapters / GIB:.2f} | "
                        f"{activations / GIB:.1f} | {total / GIB:.1f} |")
    where = (f"measured on {measured['variant']} of this run" if scale == 1 else
             f"all but the logits scaled x{scale:.0f} by d_model*n_layers from this run's shape: run --preset "
             "mpt-7b for the real cost")
    return [f"\n# PREDICTED (not measured) GPU peak, mpt-7b shape, seq 2048, batch 1, rank 8, recompute; activation "
            f"bytes per token {per_token / 1024**2:.2f} MiB ({where}); + {CUDA_CONTEXT / GIB:.0f} GiB CUDA "
            "context", "| predicted | activations from | base GiB | adapters + AdamW GiB | activations GiB | total GiB "
            "(goal: LoRA <= 24, QLoRA <= 12) |", "|---|---|---|---|---|---|", *rows]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return 0
    import torch

    variants = ["lora-bf16"] if args.mode == "7b-step" else args.variants.split(",")
    print(f"# {args.mode}: {args.preset}, seq {args.seq_len}, batch {args.batch}, {args.precision}, recompute "
          f"{'on' if args.activation_checkpointing else 'off'}, LoRA rank {args.rank}; {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.mode == "7b-step":
        print(f"# {_estimate(args)}", flush=True)
    results = [_child(args, variant) for variant in variants]
    print(f"\n# load average at the end: {os.getloadavg()[0]:.2f}")
    print("| variant | params | trainable | RSS bare GiB | RSS built GiB | peak RSS GiB | build s | s/step | "
          "tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['variant']} | | | | | {r['failed']} | | | |")
            continue
        print(f"| {r['variant']} | {r['params'] / 1e6:,.1f}M | {r['trainable'] / 1e6:,.2f}M | {r['rss_bare_gib']:.2f} | "
              f"{r['rss_built_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['build_s']:.1f} | {r['step_s']:.2f} | "
              f"{r['tokens_per_s']:,.0f} |")
    lora = next((r for r in results if r["variant"] in ("lora", "lora-bf16") and "failed" not in r), None)
    if lora is not None:
        print("\n".join(predictions(lora, args.batch * args.seq_len)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
