"""`mptkit generate` and `mptkit chat` on a saved tiny checkpoint, against transformers' generate
(the model-card code path) on the same files."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mptkit.data.templates import DEFAULT_SYSTEM_PROMPT, format_chatml, format_instruct
from mptkit.data.tokenizer import load_tokenizer
from mptkit.inference.commands import main
from mptkit.inference.prompts import chat_prompt_ids, stop_token_ids
from mptkit.loading import TrainingCheckpoint, load
from mptkit.model import MPTConfig, MPTForCausalLM


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def card_model(checkpoint):
    """Loaded exactly as the MPT model card does (remote code from the checkpoint directory)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, torch_dtype="auto",
                                                 device_map="auto")
    return tokenizer, model


def card_generate(card_model, text: str, max_new_tokens: int, stops=()) -> str:
    tokenizer, model = card_model
    inputs = tokenizer(text, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_ids = output[0][inputs["input_ids"].shape[1] :].tolist()
    for position, token in enumerate(new_ids):
        if token in stops:
            new_ids = new_ids[:position]
            break
    return tokenizer.decode(new_ids)


def test_model_card_snippet_and_generate_give_the_same_text(checkpoint, card_model, capsys):
    prompt = "MosaicML's MPT models use ALiBi because"
    expected = card_generate(card_model, prompt, 24)
    assert len(expected) > 20
    assert main("generate", [str(checkpoint), "--prompt", prompt, "--max-new-tokens", "24", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_prompts_file_runs_batched_with_the_instruct_template(checkpoint, card_model, tmp_path, capsys):
    prompts = ["Name a prime.", "Write one sentence about the sea, then stop.", "Ünïcödé?"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    argv = [str(checkpoint), "--prompts-file", str(path), "--template", "instruct", "--batch-size", "2",
            "--max-new-tokens", "12", "--dtype", "float32"]
    assert main("generate", argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    eos = {card_model[0].eos_token_id}
    for record, prompt in zip(records, prompts):
        assert record["prompt"] == prompt
        assert record["completion"] == card_generate(card_model, format_instruct(prompt), 12, eos)


def test_prompts_file_errors_name_the_line(checkpoint, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert main("generate", [str(checkpoint), "--prompts-file", str(path)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_chat_repl_keeps_history_and_stops_at_im_end(checkpoint, card_model, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\nAnd then?\n/exit\n"))
    assert main("chat", [str(checkpoint), "--max-new-tokens", "10", "--dtype", "float32"]) == 0
    replies = capsys.readouterr().out.splitlines()
    stops = stop_token_ids(card_model[0], "chat")
    system = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    first = card_generate(card_model, format_chatml(system + [{"role": "user", "content": "Hello!"}], True), 10, stops)
    history = system + [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": first},
                        {"role": "user", "content": "And then?"}]
    second = card_generate(card_model, format_chatml(history, True), 10, stops)
    assert first and second and replies == [first, second]


def test_chat_history_is_trimmed_oldest_exchange_first():
    tokenizer = load_tokenizer()
    history = []
    for i in range(3):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    system = "Be brief."
    keep_last = [{"role": "system", "content": system}] + history[4:] + [{"role": "user", "content": "new"}]
    budget = len(tokenizer(format_chatml(keep_last, add_generation_prompt=True))["input_ids"])
    ids = chat_prompt_ids(tokenizer, system, history, "new", budget)
    assert ids == tokenizer(format_chatml(keep_last, add_generation_prompt=True))["input_ids"]
    assert [m["content"] for m in history] == ["question 2 " * 5, "answer 2 " * 5]
    assert chat_prompt_ids(tokenizer, system, history, "too long " * 100, budget) is None


def test_chat_stops_include_im_end():
    tokenizer = load_tokenizer()
    assert stop_token_ids(tokenizer, "chat") == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert stop_token_ids(tokenizer, "none") == {tokenizer.eos_token_id}


def test_training_checkpoint_loads_with_the_same_weights(tmp_path):
    from mptkit.train.checkpoint import Checkpointer
    from mptkit.train.parallel import DistributedEnv

    config = MPTConfig.from_preset("tiny", vocab_size=512)
    torch.manual_seed(4)
    model = MPTForCausalLM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    Checkpointer(tmp_path, keep_last_n=2, env=env).save(
        3, model, optimizer, scheduler, {}, {}, config.to_json_string(), {"data": {"tokenizer": None}}
    )
    loaded = load(tmp_path, dtype="float32")  # the run directory: its newest step
    assert loaded.source.path.name == "step_00000003" and isinstance(loaded.source, TrainingCheckpoint)
    reference = model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_a_transformers_mpt_checkpoint_generates_what_transformers_generates(tmp_path, capsys):
    """A directory in the hub layout written by transformers' own MptForCausalLM (as a hub MPT
    download is), without a tokenizer: mptkit loads it with the bundled GPT-NeoX tokenizer."""
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(2)
    hf = MptForCausalLM(MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=50432,
                                  initializer_range=0.3)).eval()
    hf.save_pretrained(tmp_path)
    tokenizer = load_tokenizer()
    prompt = "A hub checkpoint says"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
    assert 0 not in new  # no end of text: both generate all 16 tokens
    assert main("generate", [str(tmp_path), "--prompt", prompt, "--max-new-tokens", "16", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(new) + "\n"
