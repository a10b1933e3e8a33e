"""What the vLLM plugin tests share: the separate vLLM environment, tiny exports vLLM's CPU attention
accepts (head dimension 32), mptkit's own generation as the reference, and one vLLM process per
batch of jobs (tests/vllm_runner.py)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from mptkit.data.tokenizer import load_tokenizer
from mptkit.export.hf import export_hf
from mptkit.inference.decode import Decoder
from mptkit.inference.sampling import SamplingParams
from mptkit.loading import load_model
from mptkit.model import MPTConfig, MPTForCausalLM

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
RUNNER = Path(__file__).with_name("vllm_runner.py")
# vLLM's CPU attention kernels take head dimensions 32, 64, 80, ...: 128 / 4 heads.
SHAPE = {"d_model": 128, "n_heads": 4, "n_layers": 2, "max_seq_len": 256}
NEW_TOKENS = 64
LOGPROB_TOLERANCE = 1e-3


def vllm_python() -> Path:
    """The vLLM environment's interpreter; a missing environment fails the test (it is not optional)."""
    if not VLLM_PYTHON.is_file():
        raise AssertionError(f"{VLLM_PYTHON} is missing: `make vllm-env` builds the vLLM environment "
                             "(`make test` does it first)")
    return VLLM_PYTHON


def export_model(directory: Path, seed: int = 0, **fields) -> Path:
    """A random tiny MPT with these config fields, exported as `mptkit export` writes it."""
    fields.setdefault("init_config", {"name": "baseline_", "init_std": 0.35})  # greedy output wanders
    torch.manual_seed(seed)
    config = MPTConfig.from_preset("tiny", **{**SHAPE, **fields})
    MPTForCausalLM(config).save_pretrained(directory / "model", tokenizer=load_tokenizer())
    export_hf(directory / "model", directory / "export")
    return directory / "export"


def prompts(count: int = 4, seed: int = 0, shortest: int = 5, longest: int = 40) -> list[list[int]]:
    """Prompts of different lengths (token ids of the bundled tokenizer's ordinary range)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(shortest, longest, count).round().int().tolist()
    return [torch.randint(100, 50000, (length,), generator=generator).tolist() for length in lengths]


@dataclass
class Reference:
    tokens: list[list[int]]  # greedy continuation of each prompt, run alone
    prompt_logprobs: list[list[float]]  # log p(token i | tokens before it), i >= 1
    margins: list[list[float]]  # top-1 minus top-2 logit at each greedy step (to name near-ties)


@torch.no_grad()
def mptkit_reference(model_dir: Path, batch: list[list[int]], new_tokens: int = NEW_TOKENS,
                     max_seq_len: int | None = None, adapter: Path | None = None) -> Reference:
    """mptkit's own generation in fp32 (the `mptkit generate` decoder; an adapter merged on load)."""
    model, _ = load_model(model_dir, dtype="float32", max_seq_len=max_seq_len, adapter=adapter)
    decoder = Decoder(model)
    result = Reference([], [], [])
    for ids in batch:
        steps = decoder.generate([ids], [SamplingParams(max_new_tokens=new_tokens)])
        generated = [int(token[0]) for token in steps]
        logits = model(torch.tensor([ids + generated])).logits[0].double()
        log_probs = logits[: len(ids) - 1].log_softmax(-1)
        result.tokens.append(generated)
        result.prompt_logprobs.append(log_probs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist())
        top2 = logits[len(ids) - 1: -1].topk(2, dim=-1).values
        result.margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return result


def run_vllm(jobs: dict[str, dict], workdir: Path, env: dict[str, str] | None = None,
             timeout: float = 900) -> dict[str, dict]:
    """Run the jobs in one process of the vLLM environment; results by job name."""
    jobs_file, results_file = workdir / "vllm-jobs.json", workdir / "vllm-results.json"
    jobs_file.write_text(json.dumps(jobs))
    done = subprocess.run([str(vllm_python()), str(RUNNER), str(jobs_file), str(results_file)],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    missing = set(jobs) - set(results)
    assert done.returncode == 0 and not missing, (
        f"vLLM runner exited {done.returncode}, no result for {sorted(missing)}:\n{done.stderr[-6000:]}")
    return results


def compare(reference: Reference, result: dict) -> list[str]:
    """Where vLLM's output differs from mptkit's: greedy tokens, then prompt log-probabilities."""
    assert "error" not in result, result["error"]
    problems = []
    for row, (expected, got) in enumerate(zip(reference.tokens, result["outputs"])):
        if got["tokens"] != expected:
            first = next(i for i, (a, b) in enumerate(zip(expected + [None], got["tokens"] + [None])) if a != b)
            margin = reference.margins[row][first] if first < len(reference.margins[row]) else float("nan")
            problems.append(f"prompt {row}: greedy tokens differ from position {first} (mptkit's top-2 logit "
                            f"margin there {margin:.2e}): mptkit {expected[first:first + 4]}, vLLM "
                            f"{got['tokens'][first:first + 4]}")
        difference = max(abs(a - b) for a, b in zip(reference.prompt_logprobs[row], got["prompt_logprobs"]))
        if difference > LOGPROB_TOLERANCE:
            problems.append(f"prompt {row}: prompt log-probabilities differ by up to {difference:.2e}")
    return problems
