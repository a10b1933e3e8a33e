"""`mptkit demo --quick`: every stage runs and leaves loadable, truthful outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mptkit.cli import main as cli_main
from mptkit.demo import MODEL_CARD_PROMPT, QUICK, REPO


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo, a path with a comma")  # once broke f-string overrides
    assert cli_main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_writes_summary_plots_and_checkpoints(demo_out):
    import matplotlib.image

    summary = (demo_out / "summary.md").read_text()
    for needle in (MODEL_CARD_PROMPT, "## Extrapolation", "| eval length | nonoverlapping | sliding |",
                   "trust_remote_code=True", "mptkit chat", "mptkit serve", "cannot"):
        assert needle in summary
    for png in ("pretrain_loss.png", "finetune_loss.png", "extrapolation.png"):
        assert f"]({png})" in summary
        assert matplotlib.image.imread(demo_out / png).ndim == 3
    facts = json.loads((demo_out / "summary.json").read_text())
    assert [p["seq_len"] for p in facts["extrapolation"]] == [QUICK["train_len"] * m for m in (1, 2, 4)]
    assert facts["pretrain_steps"] == QUICK["pretrain"].max_steps and facts["finetune_steps"] == QUICK["finetune"].max_steps


def test_demo_checkpoint_loads_with_model_card_code_and_generates(demo_out):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(demo_out / "model"), trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(demo_out / "model"))
    ids = tokenizer(MODEL_CARD_PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, ids.shape[1] + 3)


def test_demo_extrapolation_numbers_match_a_direct_computation(demo_out):
    """The 1x nonoverlapping perplexity in the summary, recomputed from the exported base model
    chunk by chunk with transformers' loader."""
    import transformers

    from mptkit.data.tokenizer import load_tokenizer
    from mptkit.data.sources import read_texts

    model = transformers.AutoModelForCausalLM.from_pretrained(str(demo_out / "base-model"), trust_remote_code=True).eval()
    tokenizer = load_tokenizer()
    length, per_book = QUICK["train_len"], QUICK["eval_tokens_per_book"]
    nll, count = 0.0, 0
    for text in read_texts([REPO / "data/books/heldout"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:per_book]
        for start in range(0, len(ids) - 1, length):
            chunk = torch.tensor([ids[start : start + length + 1]])
            with torch.no_grad():
                log_probs = model(chunk[:, :-1]).logits[0].double().log_softmax(-1)
            nll -= log_probs.gather(1, chunk[0, 1:, None]).sum().item()
            count += chunk.shape[1] - 1
    facts = json.loads((demo_out / "summary.json").read_text())
    assert facts["eval_tokens"] == count
    assert facts["extrapolation"][0]["nonoverlapping"] == pytest.approx(math.exp(nll / count), rel=1e-4)
