"""Sampling against transformers' logits processors, the draw's distribution, seeds; text streams
(stop strings, split UTF-8 characters, stop tokens) against the tokenizer's own decode."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mptkit.data.tokenizer import load_tokenizer
from mptkit.inference.sampling import BatchSampler, SamplingParams, apply_repetition_penalty, filter_logits
from mptkit.inference.text import FINISH_LENGTH, FINISH_STOP, TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (0, 0.8, 0.7), (10, 0.5, 1.3), (0, 0.0, 1.0)])
def test_filter_matches_transformers_warpers(top_k, top_p, temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 200) * 3
    ours = filter_logits(logits, torch.full((3,), temperature), torch.full((3,), top_k), torch.full((3,), top_p))
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        # transformers keeps at least one token; top_p=0 then means only the most likely one
        expected = TopPLogitsWarper(max(top_p, 1e-9))(None, expected)
    assert torch.equal(_kept(ours), _kept(expected))
    torch.testing.assert_close(ours[_kept(ours)], expected[_kept(expected)])


def test_rows_keep_their_own_settings():
    torch.manual_seed(1)
    logits = torch.randn(2, 50)
    ours = filter_logits(logits, torch.tensor([1.0, 1.0]), torch.tensor([3, 0]), torch.tensor([1.0, 1.0]))
    assert _kept(ours[0]).sum() == 3 and _kept(ours[1]).all()


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(2)
    logits = torch.randn(2, 30)
    seen_ids = torch.tensor([[1, 4, 4, 9], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, seen_ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(seen_ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, torch.tensor([1.7, 1.7])), expected)


def test_observe_ignores_padding_slots():
    sampler = BatchSampler([SamplingParams(repetition_penalty=2.0)], vocab_size=10, device=torch.device("cpu"))
    # token 0 appears once as padding and once as a real token: still seen; 3 is only padding
    sampler.observe(torch.tensor([[3, 0, 0, 5]]), torch.tensor([[False, False, True, True]]))
    assert sampler.seen[0].nonzero().flatten().tolist() == [0, 5]


def test_draws_follow_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    sampler = BatchSampler([SamplingParams(temperature=1.0, seed=0)], vocab_size=4, device=torch.device("cpu"))
    logits = probs.log()[None]
    counts = torch.bincount(torch.cat([sampler(logits) for _ in range(6000)]), minlength=4).float()
    # binomial standard deviation at n=6000 is at most 0.0065: allow ~4 sigma
    assert (counts / counts.sum() - probs).abs().max() < 0.026


def test_greedy_is_the_argmax_and_seeds_reproduce():
    torch.manual_seed(3)
    logits = torch.randn(3, 100)
    greedy = BatchSampler([SamplingParams()] * 3, 100, torch.device("cpu"))
    assert torch.equal(greedy(logits), logits.argmax(-1))

    def draws(params):
        sampler = BatchSampler(params, 100, torch.device("cpu"))
        return torch.stack([sampler(logits) for _ in range(20)], dim=1)

    alone = draws([SamplingParams(temperature=1.0, seed=7)] * 3)
    assert torch.equal(alone, draws([SamplingParams(temperature=1.0, seed=7)] * 3))
    # a row's draws depend on its own seed, not on what else is in the batch
    mixed = draws([SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0, seed=8), SamplingParams()])
    assert torch.equal(mixed[0], alone[0]) and not torch.equal(mixed[1], alone[1])
    assert torch.equal(mixed[2], logits[2].argmax().repeat(20))


@pytest.mark.parametrize("bad", [
    {"max_new_tokens": 0}, {"temperature": -0.1}, {"top_k": -1}, {"top_p": 1.5}, {"repetition_penalty": 0},
    {"stop": "x"}, {"stop": ("",)}, {"seed": 1.5}, {"temperature": float("nan")}, {"max_new_tokens": True},
])
def test_invalid_sampling_params_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


# ---- text streams ------------------------------------------------------------------------------


def _run(stream: TextStream, ids: list[int]) -> list[str]:
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.finished:
            break
    if not stream.finished:
        pieces.append(stream.finish(FINISH_LENGTH))
    return pieces


def test_stream_pieces_add_up_to_the_tokenizers_decode(tokenizer):
    text = "Grüße aus Köln 🚀🚀 — naïve café, 東京タワー and ALiBi."
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, SamplingParams(max_new_tokens=1000), frozenset())
    pieces = _run(stream, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    # no piece ever shows half a character
    assert not any("\ufffd" in piece for piece in pieces)
    # the emoji takes several byte-level tokens: some pushes released nothing while waiting
    assert pieces.count("") > 0


def test_stop_string_spanning_tokens_is_cut_and_never_shown(tokenizer):
    text = "The answer is 42.\n### Instruction: more"
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, SamplingParams(max_new_tokens=1000, stop=("### Instr",)), frozenset())
    pieces = _run(stream, ids)
    assert "".join(pieces) == "The answer is 42.\n"
    assert stream.finish_reason == FINISH_STOP
    assert all("#" not in piece for piece in pieces)


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop(tokenizer):
    ids = tokenizer("a b c END")["input_ids"]
    stream = TextStream(tokenizer, SamplingParams(max_new_tokens=len(ids), stop=("c ENDING",)), frozenset())
    assert "".join(_run(stream, ids)) == "a b c END"
    assert stream.finish_reason == FINISH_LENGTH


def test_stop_token_ends_the_row_without_text(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("Hello there")["input_ids"] + [im_end] + tokenizer(" after")["input_ids"]
    stream = TextStream(tokenizer, SamplingParams(max_new_tokens=100), frozenset({im_end, 0}))
    assert "".join(_run(stream, ids)) == "Hello there"
    assert stream.finish_reason == FINISH_STOP and stream.generated == len(tokenizer("Hello there")["input_ids"]) + 1


def test_max_new_tokens_ends_with_length(tokenizer):
    ids = tokenizer("one two three four five")["input_ids"]
    stream = TextStream(tokenizer, SamplingParams(max_new_tokens=3), frozenset())
    assert "".join(_run(stream, ids)) == tokenizer.decode(ids[:3])
    assert stream.finish_reason == FINISH_LENGTH and stream.generated == 3
