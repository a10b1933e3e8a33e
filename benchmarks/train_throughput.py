"""Training throughput: one optimizer step (forward + backward + AdamW) of mptkit's MPT against
transformers' MptForCausalLM with the same config, weights, batch, loss and optimizer, in one run.

    .venv/bin/python benchmarks/train_throughput.py                       # mpt-125m, seq 512, batch 4
    .venv/bin/python benchmarks/train_throughput.py --preset mpt-1b --seq-len 2048 --precisions bf16  # GPU

Both models go through mptkit's own training step (`mptkit.train.loop.forward_backward`: autocast,
fp32 token cross-entropy, backward) and `build_optimizer` (AdamW with MPT's decay groups).
Reported: median step time over --steps timed steps (after --warmup), tokens/s, and MFU =
(6N + 12 * n_layers * d_model * seq_len) * tokens/s / peak, the peak being a GEMM of the step's dtype
measured in the same run (CPU) or the datasheet bf16 peak (known GPUs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import MptConfig, MptForCausalLM  # noqa: E402

from mptkit.model import MPTConfig, MPTForCausalLM  # noqa: E402
from mptkit.train.config import OptimizerConfig  # noqa: E402
from mptkit.train.loop import forward_backward, target_count  # noqa: E402
from mptkit.train.metrics import flops_per_token, measure_gemm_tflops, peak_tflops  # noqa: E402
from mptkit.train.optim import build_optimizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mpt-125m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--attn-impl", default="sdpa", help="mptkit's attention backend (torch, sdpa, flex)")
    p.add_argument("--compile", action="store_true", help="torch.compile each of mptkit's blocks (as train.compile)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def build_models(args, device: torch.device) -> dict[str, torch.nn.Module]:
    config = MPTConfig.from_preset(args.preset, max_seq_len=max(args.seq_len, 2048),
                                   attn_config={"attn_impl": args.attn_impl})
    torch.manual_seed(0)
    ours = MPTForCausalLM(config)
    ours.reset_parameters()
    models = {"mptkit": ours}
    if not args.skip_transformers:
        twin = MptForCausalLM(MptConfig(
            d_model=config.d_model, n_heads=config.n_heads, n_layers=config.n_layers, vocab_size=config.vocab_size,
            max_seq_len=config.max_seq_len, expansion_ratio=config.expansion_ratio,
            attn_config={"alibi_bias_max": int(config.attn.alibi_bias_max)}))
        missing, unexpected = twin.load_state_dict(ours.state_dict(), strict=False)
        assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # tied in transformers
        twin.tie_weights()
        models["transformers"] = twin
    if args.compile:
        for block in ours.transformer.blocks:
            block.compile()
    return {name: model.to(device).train() for name, model in models.items()}


class Stepper:
    """One model's training step with its own fresh AdamW (so both models pay the same first step)."""

    def __init__(self, model, batch, precision: str, device: torch.device):
        self.model, self.batch, self.device = model, batch, device
        self.optimizer = build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-4, weight_decay=0.0))
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.scale = 1.0 / target_count(batch["labels"]).float()
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        forward_backward(self.model, self.batch, self.autocast, self.scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if timed:
            self.times.append(time.perf_counter() - start)


def time_steps(models: dict, batch, precision: str, device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per optimizer step of each model. The models take turns step by step, so a
    change in the machine's load (other jobs) hits both alike."""
    steppers = {name: Stepper(model, batch, precision, device) for name, model in models.items()}
    for i in range(warmup + steps):
        for stepper in steppers.values():
            stepper.step(timed=i >= warmup)
    return {name: statistics.median(stepper.times) for name, stepper in steppers.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"# {args.preset}, seq {args.seq_len}, batch {args.batch}, device {device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}, attn_impl {args.attn_impl}{', compiled blocks' if args.compile else ''}")
    models = build_models(args, device)
    ours = models["mptkit"]
    n_params = sum(p.numel() for p in ours.parameters())
    config = ours.config
    per_token = flops_per_token(n_params, config.n_layers, config.d_model, args.seq_len)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50277, (args.batch, args.seq_len), generator=generator).to(device)
    batch = {"input_ids": tokens, "labels": tokens}

    rows = []
    for precision in args.precisions.split(","):
        peak, source = peak_tflops(precision, device, None)
        seconds_per_step = time_steps(models, batch, precision, device, args.steps, args.warmup)
        if device.type == "cpu":  # the better of two measurements, before and after the steps
            peak = max(peak, measure_gemm_tflops(torch.bfloat16 if precision == "bf16" else torch.float32, device))
        results = {}
        for name, seconds in seconds_per_step.items():
            tokens_per_s = args.batch * args.seq_len / seconds
            results[name] = tokens_per_s
            mfu = per_token * tokens_per_s / (peak * 1e12)
            rows.append((precision, name, seconds, tokens_per_s, mfu, peak, source))
            print(f"{precision:5} {name:13} {seconds:8.3f} s/step {tokens_per_s:10,.0f} tok/s  MFU {mfu:6.1%} "
                  f"(peak {peak:.2f} TFLOP/s, {source})", flush=True)
        if "transformers" in results:
            print(f"{precision:5} mptkit / transformers tokens/s: {results['mptkit'] / results['transformers']:.2f}x")

    print(f"\n# load average at the end: {os.getloadavg()[0]:.2f}")
    print("\n| precision | model | s/step | tokens/s | MFU | peak TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for precision, name, seconds, tokens_per_s, mfu, peak, _ in rows:
        print(f"| {precision} | {name} | {seconds:.3f} | {tokens_per_s:,.0f} | {mfu:.1%} | {peak:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
