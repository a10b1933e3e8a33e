"""Perplexity, extrapolation and multiple-choice evaluation against direct computations."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mptkit.eval.commands import main
from mptkit.eval.multiple_choice import (
    Example,
    MultipleChoiceError,
    continuation_logprobs,
    encode_pair,
    evaluate_multiple_choice,
    read_examples,
)
from mptkit.eval.perplexity import Window, evaluate_perplexity, plan_windows
from mptkit.model import MPTConfig, MPTForCausalLM

TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
    "nothing to do: once or twice she had peeped into the book her sister was reading, but it had "
    "no pictures or conversations in it, 'and what is the use of a book,' thought Alice 'without "
    "pictures or conversations?'"
)


@pytest.fixture(scope="module")
def tokenizer():
    from mptkit.data.tokenizer import load_tokenizer

    return load_tokenizer()


def _tiny_mpt(**overrides) -> MPTForCausalLM:
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig.from_preset("tiny", **overrides)).eval()
    # Larger weights than the init, so that logits depend strongly on context and position.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def alibi_model():
    return _tiny_mpt()


class ContextFreeModel(torch.nn.Module):
    """Logits depend only on the current token (a bigram table): the total log-likelihood of a
    document is then the same under any windowing that scores each token exactly once."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(1)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab) * 2)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


class UnigramModel(torch.nn.Module):
    """The same next-token distribution after every token: log-probabilities we set by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def _direct_nll(model, ids: list[int]) -> torch.Tensor:
    """Per-token NLL of ids[1:] from one full-sequence pass, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return -logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---- window plan ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [1, 2, 5, 17, 64, 65, 100])
@pytest.mark.parametrize("seq_len,stride", [(1, 1), (4, 4), (8, 8), (8, 3), (8, 1), (16, 5), (7, 7)])
def test_window_plan_scores_every_token_once(num_tokens, seq_len, stride):
    windows = plan_windows(num_tokens, seq_len, stride)
    scored = []
    for w in windows:
        assert 1 <= w.length <= seq_len and 1 <= w.num_scored <= w.length
        assert w.start >= 0 and w.start + w.length + 1 <= num_tokens  # targets stay inside
        targets = list(range(w.first_target, w.start + w.length + 1))
        assert len(targets) == w.num_scored
        if stride < seq_len and w is not windows[0]:
            # every sliding window after the first gives its scored tokens >= seq_len - stride context
            assert w.first_target - w.start >= seq_len - stride
        scored += targets
    assert sorted(scored) == list(range(1, num_tokens))


def test_nonoverlapping_windows_are_disjoint_chunks():
    assert plan_windows(11, 4) == [Window(0, 4, 4), Window(4, 4, 4), Window(8, 2, 2)]


def test_window_plan_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 4, 5)


# ---- perplexity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len,stride", [(4, None), (7, 2), (16, 1), (64, 16), (200, None)])
def test_context_free_model_total_matches_bigram_sum(seq_len, stride):
    vocab = 23
    model = ContextFreeModel(vocab)
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (1, 2, 40, 97)]
    expected = sum(_direct_nll(model, doc).sum().item() for doc in documents if len(doc) > 1)
    result = evaluate_perplexity(model, documents, seq_len, stride, batch_tokens=24, progress=False)
    assert result.num_tokens == sum(len(d) - 1 for d in documents)
    assert result.nll_sum == pytest.approx(expected, rel=1e-6)


def test_full_window_equals_one_pass_log_softmax(alibi_model, tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    result = evaluate_perplexity(alibi_model, [ids], seq_len=len(ids), progress=False)
    direct = _direct_nll(alibi_model, ids)
    assert result.num_tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(direct.mean().item()), rel=1e-5)


def test_nonoverlapping_equals_independent_chunks(alibi_model, tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    seq_len = 10
    # chunk k: inputs ids[10k : 10k+10], targets the next token of each
    expected = sum(
        _direct_nll(alibi_model, ids[k : k + seq_len + 1]).sum().item() for k in range(0, len(ids) - 1, seq_len)
    )
    result = evaluate_perplexity(alibi_model, [ids], seq_len, batch_tokens=32, progress=False)
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)
    # context matters for this model, so a different chunking must give a different answer
    assert evaluate_perplexity(alibi_model, [ids], 20, progress=False).nll_sum != pytest.approx(expected, rel=1e-3)


def test_sliding_stride_one_gives_each_token_its_full_window(alibi_model, tokenizer):
    ids = tokenizer(TEXT)["input_ids"][:40]
    seq_len = 8
    expected = 0.0
    for t in range(1, len(ids)):  # token t is predicted from the seq_len tokens before it
        context = ids[max(0, t - seq_len) : t]
        expected += _direct_nll(alibi_model, context + [ids[t]])[-1].item()
    result = evaluate_perplexity(alibi_model, [ids], seq_len, stride=1, batch_tokens=64, progress=False)
    assert result.num_tokens == len(ids) - 1
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)


def test_bf16_autocast_is_close_to_fp32(alibi_model, tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    fp32 = evaluate_perplexity(alibi_model, [ids], 16, progress=False)
    bf16 = evaluate_perplexity(alibi_model, [ids], 16, autocast_dtype=torch.bfloat16, progress=False)
    assert bf16.mean_nll == pytest.approx(fp32.mean_nll, rel=0.02)


def test_learned_positions_refuse_lengths_past_their_table(tokenizer):
    model = _tiny_mpt(attn_config={"alibi": False}, learned_pos_emb=True, max_seq_len=16)
    ids = tokenizer(TEXT)["input_ids"]
    evaluate_perplexity(model, [ids], 16, progress=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_perplexity(model, [ids], 32, progress=False)


# ---- CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, alibi_model, tokenizer):
    path = tmp_path_factory.mktemp("model") / "tiny"
    alibi_model.save_pretrained(path, tokenizer=tokenizer)
    return path


def test_cli_perplexity_matches_direct_computation(saved_model, alibi_model, tokenizer, tmp_path):
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    out = tmp_path / "ppl.json"
    assert main("eval", ["perplexity", str(saved_model), str(text_file), "--seq-len", "512", "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["tokens_scored"] == len(ids) - 1 and result["mode"] == "nonoverlapping"
    assert result["perplexity"] == pytest.approx(math.exp(_direct_nll(alibi_model, ids).mean().item()), rel=1e-5)


def test_cli_extrapolate_writes_table_json_and_plot(saved_model, tokenizer, tmp_path):
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT * 4)
    num_targets = len(tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]) - 1
    out = tmp_path / "ext"
    args = ["extrapolate", str(saved_model), str(text_file), "--train-len", "16", "--multiples", "1,2,4", "--out", str(out), "--quiet"]
    assert main("eval", args) == 0
    data = json.loads((out / "extrapolation.json").read_text())
    assert [p["seq_len"] for p in data["points"]] == [16, 32, 64]
    for point in data["points"]:
        assert point["nonoverlapping"]["tokens_scored"] == point["sliding"]["tokens_scored"] == num_targets
        assert point["sliding"]["stride"] == point["seq_len"] // 4
    table = (out / "extrapolation.md").read_text()
    assert "| eval length | nonoverlapping | sliding |" in table and "| 64 |" in table
    import matplotlib.image

    assert matplotlib.image.imread(out / "extrapolation.png").shape[2] in (3, 4)


def test_cli_reports_missing_model(tmp_path, capsys):
    assert main("eval", ["perplexity", str(tmp_path), str(tmp_path), "--seq-len", "8"]) == 2
    assert "config.json" in capsys.readouterr().err


# ---- multiple choice ----------------------------------------------------------------------------


def test_read_examples_names_file_line_and_field(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"context": "a", "choices": [" b", " c"], "label": 1}\n\n{"context": "a", "choices": [" b", " c"], "label": 2}\n')
    with pytest.raises(MultipleChoiceError, match=r"mc.jsonl, line 3, field 'label'.*0\.\.1"):
        read_examples(path)
    path.write_text('{"context": "a", "choices": " b"}\n')
    with pytest.raises(MultipleChoiceError, match=r"line 1, field 'choices'"):
        read_examples(path)


def test_encode_pair_moves_the_context_space_to_the_choice(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "The cat sat on the ", "mat")
    assert context_ids == tokenizer("The cat sat on the")["input_ids"]
    assert continuation_ids == tokenizer(" mat")["input_ids"]
    assert encode_pair(tokenizer, "", "Hello")[0] == [tokenizer.eos_token_id]


def test_length_normalisation_changes_the_pick(tokenizer):
    """A hand-set unigram model: the one-token ending has the best total log-likelihood, the
    several-token ending the best per byte; each accuracy must follow its own rule."""
    short, long = " cat", " the fluffy dog"
    (short_id,) = tokenizer(short)["input_ids"]
    long_ids = tokenizer(long)["input_ids"]
    assert len(set(long_ids)) == len(long_ids) > 1
    logits = torch.full((50432,), -30.0)
    logits[short_id] = 1.0
    logits[long_ids] = 2.0  # each long token is likelier than the short one, but there are several
    log_probs = logits.double().log_softmax(-1)
    short_score, long_score = log_probs[short_id].item(), log_probs[long_ids].sum().item()
    assert short_score > long_score and short_score / len(short) < long_score / len(long)

    examples = [Example("My pet is", (short, long), 1), Example("My pet is", (long, short), 1)]
    result = evaluate_multiple_choice(UnigramModel(logits), tokenizer, examples, progress=False)
    assert result.predictions[0]["loglik"] == pytest.approx([short_score, long_score], rel=1e-6)
    assert [p["pred"] for p in result.predictions] == [0, 1]  # always the short one
    assert [p["pred_norm"] for p in result.predictions] == [1, 0]  # always the long one
    assert (result.acc, result.acc_norm) == (0.5, 0.5)


def test_continuation_logprobs_equal_direct_pass_despite_padding(alibi_model, tokenizer):
    pairs = [("The capital of France is", " Paris"), ("Once upon a time there was a very old", " king and queen"), ("A", " b")]
    requests = [encode_pair(tokenizer, c, x) for c, x in pairs]
    scores = continuation_logprobs(alibi_model, requests, batch_size=3, progress=False)
    for (context_ids, continuation_ids), score in zip(requests, scores):
        direct = -_direct_nll(alibi_model, context_ids + continuation_ids)[-len(continuation_ids) :].sum().item()
        assert score == pytest.approx(direct, rel=1e-5)


def test_cli_multiple_choice(saved_model, tmp_path, capsys):
    path = tmp_path / "mc.jsonl"
    rows = [{"context": "The sky is", "choices": [" blue", " green", " loud"], "label": 0}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    predictions = tmp_path / "pred.jsonl"
    assert main("eval", ["multiple-choice", str(saved_model), str(path), "--predictions", str(predictions), "--quiet"]) == 0
    assert "2 examples" in capsys.readouterr().out
    assert len(predictions.read_text().splitlines()) == 2
