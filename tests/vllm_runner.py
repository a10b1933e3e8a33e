"""Runs in the vLLM environment (`make vllm-env`, .venv-vllm), not under pytest: vLLM generates for the
jobs in a JSON file, one engine per job, and writes what it produced as JSON.

    .venv-vllm/bin/python tests/vllm_runner.py JOBS.json RESULTS.json

A job: {"model": DIR, "prompts": [[ids], ...], "max_tokens": N, "max_model_len": N, "dtype": "float32",
"tensor_parallel_size": 1, "hf_overrides": {...}, "lora": DIR or null, "kv_cache_bytes": N}. The KV
cache is sized in bytes, not as a share of memory: vLLM subtracts this process's memory in use from
the share, and engines run one after another here. A result: per prompt the greedy
token ids and the log-probability of each prompt token after the first. Engines run in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) unless tensor parallel needs workers: start-up is ~13 s instead of ~40.
"""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = job.get("lora")
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True, seed=0,
              kv_cache_memory_bytes=job.get("kv_cache_bytes", 1 << 26), max_model_len=job["max_model_len"],
              tensor_parallel_size=job.get("tensor_parallel_size", 1), hf_overrides=job.get("hf_overrides"),
              enable_lora=lora is not None, max_lora_rank=16, max_num_seqs=len(job["prompts"]))
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False,
                           lora_request=LoRARequest("adapter", 1, lora) if lora else None)
    results = []
    for ids, output in zip(job["prompts"], outputs):
        # prompt_logprobs[i] holds token i's log-probability given the tokens before it (None for the first)
        prompt_logprobs = [entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])]
        results.append({"tokens": list(output.outputs[0].token_ids), "prompt_logprobs": prompt_logprobs})
    del llm
    gc.collect()
    return {"outputs": results}


def main(jobs_path: str, results_path: str) -> None:
    with open(jobs_path) as file:
        jobs = json.load(file)
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = run_job(job)
        except Exception as exc:  # one job's failure is that job's result; the others still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        with open(results_path, "w") as file:  # written after each job: a crash keeps what finished
            json.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
