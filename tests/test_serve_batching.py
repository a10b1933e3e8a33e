"""Continuous batching (mptkit.inference.batching): what a request receives does not depend on what
it was batched with. Requests arrive at different steps with different prompt lengths (some
prefilled in chunks) into a pool with fewer slots than requests; each one's ids must equal the
decoder run on it alone (`Decoder.generate`, itself checked against transformers' generate in
test_inference_decode.py). Tiny models, fp32."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mptkit.inference.batching import FINISH_LENGTH, FINISH_STOP, Scheduler, Sequence
from mptkit.inference.decode import Decoder
from mptkit.inference.sampling import SamplingParams
from mptkit.model import MPTConfig, MPTForCausalLM

VOCAB = 256
CONTEXT = 300  # long requests make the pool move its rows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pool_model(context: int = CONTEXT, **overrides) -> MPTForCausalLM:
    init = {"name": "baseline_", "init_std": 0.35}  # wide weights: greedy text wanders, not repeats
    config = MPTConfig.from_preset("tiny", vocab_size=VOCAB, max_seq_len=context, init_config=init, **overrides)
    torch.manual_seed(0)
    return MPTForCausalLM(config).eval()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(decoder: Decoder, sequence: Sequence) -> list[int]:
    steps = decoder.generate([sequence.prompt_ids], [sequence.params])
    return torch.stack(list(steps), dim=1)[0].tolist()


def run(scheduler: Scheduler, arrivals: dict[int, list[Sequence]], max_steps: int = 5000,
        widths: set[int] | None = None, windows: set[tuple[int, int]] | None = None) -> int:
    """Add each step's arrivals before that step; run until all are done. Returns the steps run;
    `widths` collects how many rows the decode steps ran, `windows` their key columns [first, end)."""
    step = 0
    while step <= max(arrivals) or scheduler.has_work:
        for sequence in arrivals.get(step, []):
            scheduler.add(sequence)
        if widths is not None and scheduler.decoding:
            widths.add(scheduler.pool.rows_in_use())
        if windows is not None and scheduler.decoding:
            windows.add(scheduler.pool.window())
        scheduler.step()
        step += 1
        assert step < max_steps
    return step


# (prompt length, max_new_tokens, arrival step): short and chunked prompts, long and short answers;
# 7 requests for 3 slots, so some wait for a slot that another frees.
TRAFFIC = [(5, 180), (150, 40), (20, 100), (3, 250), (60, 60), (7, 30), (41, 120)]
ARRIVALS = [0, 0, 2, 3, 3, 17, 40]


def traffic(params_for) -> dict[int, list[Sequence]]:
    arrivals: dict[int, list[Sequence]] = {}
    for index, ((length, new), step) in enumerate(zip(TRAFFIC, ARRIVALS)):
        sequence = Sequence(prompt(length, seed=index), params_for(index, new))
        arrivals.setdefault(step, []).append(sequence)
    return arrivals


VARIANTS = {
    "alibi-torch": {},
    "alibi-sdpa": {"attn_config": {"attn_impl": "sdpa"}},
    "gqa-clip-qkln": {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2, "clip_qkv": 0.5,
                                      "qk_ln": True}},
    "rope-sdpa": {"attn_config": {"alibi": False, "rope": True, "attn_impl": "sdpa"}},
    "learned-pos": {"learned_pos_emb": True, "attn_config": {"alibi": False}},
    "sliding-window": {"attn_config": {"sliding_window_size": 7}},
    "head-dim-9": {"d_model": 36, "n_heads": 4},  # 36-byte key columns: windows start at multiples of 4
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_ids_equal_running_each_request_alone(variant):
    decoder = Decoder(pool_model(**VARIANTS[variant]))
    arrivals = traffic(lambda index, new: SamplingParams(max_new_tokens=new))
    scheduler = Scheduler(decoder, slots=3, prefill_chunk=32)
    run(scheduler, arrivals)
    sequences = sum(arrivals.values(), [])
    assert all(s.finish_reason == FINISH_LENGTH for s in sequences)
    assert [s.tokens for s in sequences] == [alone(decoder, s) for s in sequences]
    assert len({t for s in sequences for t in s.tokens}) > 30  # a non-trivial output
    assert scheduler.pool.shifts > 0  # rows were moved (the end of the cache, room for a long prompt)
    assert scheduler.pool.free_slots == 3 and not scheduler.pool.starts


def test_seeded_sampling_equals_running_each_request_alone():
    decoder = Decoder(pool_model())

    def params(index, new):
        if index % 3 == 0:
            return SamplingParams(max_new_tokens=new)  # greedy rows among the sampled ones
        return SamplingParams(max_new_tokens=new, temperature=0.9, top_p=0.95, top_k=50 * (index % 2),
                              repetition_penalty=1.0 + 0.2 * (index % 2), seed=100 + index)

    arrivals = traffic(params)
    run(Scheduler(decoder, slots=3, prefill_chunk=32), arrivals)
    sequences = sum(arrivals.values(), [])
    assert [s.tokens for s in sequences] == [alone(decoder, s) for s in sequences]
    # and the seeds matter: another seed gives other text
    other = Sequence(sequences[1].prompt_ids, SamplingParams(**{**vars(sequences[1].params), "seed": 7}))
    assert alone(decoder, other) != sequences[1].tokens


def test_a_freed_slot_is_taken_at_the_next_step():
    decoder = Decoder(pool_model(context=96))
    scheduler = Scheduler(decoder, slots=1, prefill_chunk=32)
    first = scheduler.add(Sequence(prompt(4, 0), SamplingParams(max_new_tokens=50)))
    second = scheduler.add(Sequence(prompt(6, 1), SamplingParams(max_new_tokens=3)))
    for _ in range(5):
        scheduler.step()
    assert len(first.tokens) == 5 and second.state == "waiting"
    scheduler.release(first, "cancelled")
    assert scheduler.pool.free_slots == 1 and first.finished and first.finish_reason == "cancelled"
    produced = scheduler.step()
    assert produced == [(second, second.tokens[0])] and second.slot == 0
    while scheduler.has_work:
        scheduler.step()
    assert second.tokens == alone(decoder, second)


def test_a_long_prompt_delays_decoding_rows_by_one_chunk_per_step():
    decoder = Decoder(pool_model())
    scheduler = Scheduler(decoder, slots=2, prefill_chunk=16)
    decoding = scheduler.add(Sequence(prompt(3, 0), SamplingParams(max_new_tokens=100)))
    scheduler.step()
    long = scheduler.add(Sequence(prompt(200, 1), SamplingParams(max_new_tokens=5)))
    prefills = scheduler.prefills
    while not long.tokens:
        before = len(decoding.tokens)
        scheduler.step()
        assert len(decoding.tokens) == before + 1  # a token every step, while the prompt goes in
    assert scheduler.prefills - prefills == -(-200 // 16)  # one chunk per step
    while scheduler.has_work:
        scheduler.step()
    assert [decoding.tokens, long.tokens] == [alone(decoder, decoding), alone(decoder, long)]


def test_stop_tokens_and_a_full_context_end_a_sequence():
    decoder = Decoder(pool_model(context=96))
    reference = alone(decoder, Sequence(prompt(5, 0), SamplingParams(max_new_tokens=30)))
    stop = reference[10]
    scheduler = Scheduler(decoder, slots=2, prefill_chunk=64)
    stopped = scheduler.add(Sequence(prompt(5, 0), SamplingParams(max_new_tokens=30), frozenset({stop})))
    full = scheduler.add(Sequence(prompt(80, 1), SamplingParams(max_new_tokens=50)))
    while scheduler.has_work:
        scheduler.step()
    assert stopped.tokens == reference[: reference.index(stop) + 1] and stopped.finish_reason == FINISH_STOP
    assert len(full.tokens) == 96 - 80 and full.finish_reason == FINISH_LENGTH
    with pytest.raises(ValueError, match="context"):
        scheduler.add(Sequence(prompt(96, 2), SamplingParams()))


def _compiled_traffic_makes_no_new_graphs(context: int, arrivals: dict[int, list[Sequence]]):
    decoder = Decoder(pool_model(context=context, attn_config={"attn_impl": "sdpa"}))
    torch._dynamo.reset()
    counters.clear()
    scheduler = Scheduler(decoder, slots=3, prefill_chunk=32, compile=True)
    scheduler.pool.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # one row, and any number of rows, for any key width
    widths, windows = set(), set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(scheduler, arrivals, widths=widths, windows=windows)
    assert counters["stats"]["unique_graphs"] == graphs
    assert {1, 2, 3} <= widths  # the traffic ran steps of one, two and three rows
    # ... over key windows of many widths, most not starting at the cache's first column
    assert len({end - first for first, end in windows}) > 20 and any(first > 0 for first, _ in windows)
    sequences = sum(arrivals.values(), [])
    assert [s.tokens for s in sequences] == [alone(decoder, s) for s in sequences]


def test_compiled_step_does_not_recompile_as_requests_come_and_go():
    """Requests joining and leaving the pool, changing how many rows a step runs and which key
    columns it reads, add no graph."""
    arrivals = {0: [Sequence(prompt(5, 0), SamplingParams(max_new_tokens=40))],
                3: [Sequence(prompt(40, 1), SamplingParams(max_new_tokens=20)),
                    Sequence(prompt(9, 2), SamplingParams(max_new_tokens=60, temperature=1.0, seed=3))],
                30: [Sequence(prompt(2, 3), SamplingParams(max_new_tokens=50))]}
    _compiled_traffic_makes_no_new_graphs(96, arrivals)


@pytest.mark.slow
def test_compiled_step_does_not_recompile_when_the_rows_move():
    """Longer traffic in a context it fills, so that the rows move (~50 s on 2 cores)."""
    _compiled_traffic_makes_no_new_graphs(CONTEXT, traffic(lambda index, new: SamplingParams(max_new_tokens=new)))
