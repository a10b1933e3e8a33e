"""lm-evaluation-harness runs mptkit checkpoints offline through its `hf` model type.

The harness loads the model with trust_remote_code (the source files saved beside the weights)
and scores a local task written by `mptkit eval harness-task`; its per-choice log-likelihoods
must equal a direct full-sequence computation with our model.
"""

from __future__ import annotations

import json

import pytest
import torch

from mptkit.eval.commands import main
from mptkit.eval.multiple_choice import encode_pair
from mptkit.model import MPTConfig, MPTForCausalLM

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the harness extra (make test-slow installs it)")

ROWS = [
    {"context": "The capital of France is", "choices": [" Paris", " a banana split with cream"], "label": 0},
    {"context": "A cat says", "choices": [" meow", " the quick brown fox jumps", " woof"], "label": 0},
]


@pytest.mark.slow
def test_harness_scores_equal_direct_log_likelihoods(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from mptkit.data.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig.from_preset("tiny")).eval()
    tokenizer = load_tokenizer()
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main("eval", ["harness-task", str(data), "--name", "mptkit_test_mc", "--out", str(tmp_path / "tasks")]) == 0

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'model'},trust_remote_code=True,dtype=float32",
        tasks=["mptkit_test_mc"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
        batch_size=2,
        device="cpu",
    )
    samples = sorted(results["samples"]["mptkit_test_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ROWS)
    for row, sample in zip(ROWS, samples):
        harness = [loglik for loglik, _ in sample["filtered_resps"]]
        direct = []
        for choice in row["choices"]:
            context_ids, choice_ids = encode_pair(tokenizer, row["context"], choice)
            ids = torch.tensor([context_ids + choice_ids])
            with torch.no_grad():
                log_probs = model(ids).logits[0, :-1].double().log_softmax(-1)
            targets = ids[0, 1:]
            direct.append(log_probs[-len(choice_ids) :].gather(1, targets[-len(choice_ids) :, None]).sum().item())
        assert harness == pytest.approx(direct, rel=1e-4, abs=1e-4)
    assert set(results["results"]["mptkit_test_mc"]) >= {"acc,none", "acc_norm,none"}
