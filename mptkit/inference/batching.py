"""Continuous batching: a fixed pool of KV-cache slots decoded together, and the scheduler that
fills it one iteration at a time (no threads, no HTTP: mptkit.serve.engine drives it).

The pool (`SlotPool`) is one `StaticKVCache` with a row per slot. A request holds its slot from
admission to finish; every step decodes all slots at once with the decoder's own one-token step,
so its shapes never change whatever requests come and go (empty slots are masked).

Layout: all rows share one write column P. A decoding row's keys sit in columns [start, P) of its
row, its next token is written at column P, and its query sits at P. This is the left-padded
layout of `Decoder.generate` with a per-row start in place of per-row padding, so
- ALiBi's bias -m (P - j) is each row's own relative position, exactly as if it ran alone; the
  causal rule holds trivially and the key-validity mask hides every column outside [start, P];
- RoPE and learned positions read P - start, the row's own position (`cache.padding` = start).

P grows by one per step. A step's attention reads only the columns [first, P], `first` being the
lowest start in use (a view of the cache, its width dynamic in the compiled graphs): columns
left of every row's keys cost nothing. The rows move left, by that lowest start, only when P
reaches the end of the cache. A step also runs only the rows up to the highest slot in use (slots
are taken lowest first): a lone request costs a one-row step, not the whole pool's (on a 2-core
CPU, mpt-125m bf16: 17 ms against 44 ms for 32 rows). The step is compiled twice, for one row and
for any number of rows, each graph taking any key width, both at start-up (`SlotPool.warm_up`).

Prompts are prefilled outside the pool, in a staging cache of their own: prompts that fit in
`prefill_chunk` tokens (padding included) together as one left-padded batch, a longer one alone
in chunks of `prefill_chunk`. Each iteration runs at most one such prefill besides the decode
step, so a long prompt delays the requests already decoding by one chunk per step. A prefilled
prompt's keys are copied into its slot at [P - L, P) (the pool moves right first when P < L).

Every request samples with its own `BatchSampler` (its settings, its seeded generator, the tokens
it has seen), drawing once per token it generates, so what it receives does not depend on what
it was batched with: the same ids as running it alone, up to floating-point rounding.
"""

from __future__ import annotations

import collections
import copy
import heapq
import math
import shutil
import time
from dataclasses import dataclass, field

import torch

from .decode import Decoder, StaticKVCache, enable_compiled_decoding
from .options import DEFAULT_PREFILL_CHUNK
from .sampling import BatchSampler, SamplingParams

FINISH_STOP = "stop"  # a stop token
FINISH_LENGTH = "length"  # max_new_tokens, or the context window is full

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why the decode step cannot be compiled here (None when it can): inductor needs a C++
    compiler on CPU and Triton on CUDA."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed"
        return None
    if device.type == "cpu":
        if not any(shutil.which(name) for name in ("g++", "clang++", "c++")):
            return "no C++ compiler (g++, clang++ or c++) on PATH"
        return None
    return f"compiling for {device.type} is not supported"


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it; `tag` is the caller's (the server keeps its job there)."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()
    tag: object = None
    tokens: list[int] = field(default_factory=list)  # generated so far (a final stop token included)
    state: str = WAITING
    finish_reason: str | None = None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in `staging` (a prompt prefilled in chunks)
    staging: StaticKVCache | None = field(default=None, repr=False)
    sampler: BatchSampler | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.state == FINISHED


def _step_one_row(decoder: Decoder, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    # functions of their own, so that their compiled graphs (one each) are counted apart from
    # those of `Decoder`'s own compiled step
    return decoder.decode_step(tokens, cache)


def _step_over_rows(decoder: Decoder, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    return decoder.decode_step(tokens, cache)


def _window(cache: StaticKVCache, rows: int, first: int, end: int, dynamic: bool) -> StaticKVCache:
    """A cache whose tensors are views of `cache`'s first `rows` rows and key columns [first, end)
    (writes go to the pool), with write position and row starts counted from `first`. `dynamic`
    (for compiling): both sizes are marked dynamic (rows only when more than one: a one-row step
    has a graph of its own), so that one compiled graph serves every window. The pool's cache is
    one column wider than any window, because dynamo keeps a view as large as its base static."""
    view = copy.copy(cache)
    view.keys = [keys[:rows, :, first:end] for keys in cache.keys]
    view.values = [values[:rows, :, first:end] for values in cache.values]
    view.key_valid = cache.key_valid[:rows, first:end]
    view.padding = cache.padding[:rows] - first
    view.write_positions = cache.write_positions - first
    view.visible = None  # every column of the views
    if dynamic:
        for tensor in (*view.keys, *view.values):
            torch._dynamo.mark_dynamic(tensor, 2)
        torch._dynamo.mark_dynamic(view.key_valid, 1)
        if rows > 1:
            for tensor in (*view.keys, *view.values, view.key_valid, view.padding):
                torch._dynamo.mark_dynamic(tensor, 0)
    return view


class SlotPool:
    """`slots` rows of KV cache of the decoder's whole context, and the one-token step over them."""

    def __init__(self, decoder: Decoder, slots: int, compile: bool = False):
        if slots < 1:
            raise ValueError(f"slots: expected >= 1, got {slots}")
        self.decoder = decoder
        self.slots = slots
        self.length = decoder.context_length
        self.device = decoder.device
        cache = StaticKVCache(decoder.model, slots, self.length + 1)  # the last column unused: see `_window`
        cache.key_valid.zero_()
        cache.write_positions = torch.zeros(1, dtype=torch.long, device=self.device)
        self.cache = cache
        self.write = 0  # P, the column the next step writes (mirrors cache.write_positions)
        self.starts: dict[int, int] = {}  # slot -> its first key column, for slots holding keys
        self.occupied = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self.shifts = 0  # times the rows were moved (at the end of the cache, or room for a long prompt)
        # windows start at a multiple of this many columns, so that the views' data stay 16-byte
        # aligned (what inductor's Triton kernels are compiled to assume); 1 for head_dim 64 in bf16
        column_bytes = cache.keys[0].shape[-1] * cache.keys[0].element_size()
        self._first_multiple = 16 // math.gcd(16, column_bytes)
        self.compiled = compile
        self._step_one, self._step_many = _step_one_row, _step_over_rows
        if compile:
            enable_compiled_decoding()
            self._step_one = torch.compile(_step_one_row, fullgraph=True, dynamic=False)
            self._step_many = torch.compile(_step_over_rows, fullgraph=True, dynamic=False)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def reserve(self) -> int:
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        if self.starts.pop(slot, None) is not None:
            self.cache.key_valid[slot] = False
            self.cache.padding[slot] = 0  # an empty row's position stays in range (P - 0)
            self.occupied[slot] = False
        heapq.heappush(self._free, slot)
        if not self.starts:
            self.write = 0

    def place(self, slot: int, staging: StaticKVCache, row: int, begin: int, length: int) -> None:
        """Copy a prefilled prompt's keys (staging row `row`, columns begin .. begin+length-1) into
        `slot` at columns [P - length, P)."""
        if self.write < length:
            self._shift(length - self.write)
        start = self.write - length
        for pool, staged in zip(self.cache.keys + self.cache.values, staging.keys + staging.values):
            pool[slot, :, start : self.write] = staged[row, :, begin : begin + length]
        self.cache.key_valid[slot] = False
        self.cache.key_valid[slot, start : self.write] = True
        self.cache.padding[slot] = start
        self.occupied[slot] = True
        self.starts[slot] = start

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per slot (slots, 1) at column P; logits (rows_in_use(), V), a row per
        slot up to the highest in use. Empty slots' logits are meaningless."""
        if self.write >= self.length and self.starts:
            self._shift(-min(self.starts.values()))
        if self.write >= self.length:
            raise RuntimeError("slot pool: no column left to write (a row outlived the context)")
        logits = self._run_step(tokens)
        self.write += 1
        return logits

    def rows_in_use(self) -> int:
        """The rows a step runs: up to the highest slot holding keys (at least one)."""
        return max(self.starts, default=0) + 1

    def window(self) -> tuple[int, int]:
        """The key columns [first, end) the next step reads: from the lowest start in use (rounded
        down to a multiple of `_first_multiple`) to P."""
        lowest = min(self.starts.values(), default=0)
        return lowest - lowest % self._first_multiple, self.write + 1

    def _run_step(self, tokens: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Logits (rows, V) of the first `rows` slots (default: `rows_in_use`)."""
        rows = self.rows_in_use() if rows is None else rows
        cache = self.cache
        cache.key_valid[:, self.write] = self.occupied
        cache.write_positions.fill_(self.write)
        view = _window(cache, rows, *self.window(), dynamic=self.compiled)
        tokens = tokens[:rows]
        if rows > 1 and self.compiled:
            torch._dynamo.mark_dynamic(tokens, 0)
        return (self._step_one if rows == 1 else self._step_many)(self.decoder, tokens, view)

    @torch.no_grad()
    def warm_up(self) -> float:
        """Run (and so compile) the step once for one row and once for all slots, before any slot
        is used; the seconds it took."""
        if self.starts:
            raise RuntimeError("slot pool: warm up before admitting requests")
        began = time.perf_counter()
        tokens = torch.zeros(self.slots, 1, dtype=torch.long, device=self.device)
        # a key width unlike the row counts: dynamo would take equal sizes for one symbol
        width = self.length if self.length != self.slots else self.length - 1
        for rows in sorted({1, self.slots}):
            self.write = width - 1
            self._run_step(tokens, rows)
        self.write = 0
        self.cache.key_valid.zero_()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - began

    def _shift(self, offset: int) -> None:
        """Move every row's keys `offset` columns (left when negative) and P with them."""
        if self.starts:
            self.shifts += 1
            low, high = min(self.starts.values()), self.write
            for tensor in self.cache.keys + self.cache.values:
                tensor[:, :, low + offset : high + offset] = tensor[:, :, low:high].clone()
            valid = self.cache.key_valid
            moved = valid[:, low:high].clone()
            valid.zero_()
            valid[:, low + offset : high + offset] = moved
            self.cache.padding += torch.where(self.occupied, offset, 0)
            self.starts = {slot: start + offset for slot, start in self.starts.items()}
        self.write = max(0, self.write + offset)


class Scheduler:
    """Iteration-level scheduling over a `SlotPool`.

    `add` queues a sequence; each `step` admits waiting sequences into free slots, decodes one
    token for every decoding sequence, and runs one prefill (a batch of short prompts, or the next
    chunk of a long one); it returns the (sequence, token) pairs it produced. A sequence ends by
    itself at a stop token, at max_new_tokens or when the context is full; `release` ends it
    sooner (a stop string, a cancelled client) and frees its slot at once.
    """

    def __init__(self, decoder: Decoder, slots: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 compile: bool = False):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: expected >= 1, got {prefill_chunk}")
        self.decoder = decoder
        self.pool = SlotPool(decoder, slots, compile=compile)
        self.prefill_chunk = prefill_chunk
        self.context_length = decoder.context_length
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: collections.deque[Sequence] = collections.deque()
        self.decoding: dict[int, Sequence] = {}  # slot -> sequence
        self.steps = 0  # decode steps run
        self.prefills = 0  # prefill forwards run

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @property
    def active(self) -> int:
        """Slots in use (prefilling or decoding)."""
        return len(self.prefilling) + len(self.decoding)

    def add(self, sequence: Sequence) -> Sequence:
        length = len(sequence.prompt_ids)
        if not 1 <= length < self.context_length:
            raise ValueError(f"prompt of {length} tokens: expected 1 .. {self.context_length - 1} "
                             f"(the context holds {self.context_length})")
        sequence.state = WAITING
        self.waiting.append(sequence)
        return sequence

    def release(self, sequence: Sequence, reason: str | None = None) -> None:
        """End `sequence` now (no-op when it has ended) and free its slot."""
        if sequence.finished:
            return
        if sequence.state == WAITING:
            self.waiting.remove(sequence)
        elif sequence.state == PREFILLING:
            self.prefilling.remove(sequence)
        elif sequence.state == DECODING:
            del self.decoding[sequence.slot]
        if sequence.slot is not None:
            self.pool.free(sequence.slot)
        sequence.state, sequence.finish_reason = FINISHED, reason or sequence.finish_reason
        sequence.staging = sequence.sampler = None

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int]]:
        while self.waiting and self.pool.free_slots:
            sequence = self.waiting.popleft()
            sequence.slot, sequence.state = self.pool.reserve(), PREFILLING
            self.prefilling.append(sequence)
        produced = self._decode() if self.decoding else []
        if self.prefilling:
            produced += self._prefill()
        return produced

    # ---- decoding ----------------------------------------------------------------------------
    def _decode(self) -> list[tuple[Sequence, int]]:
        tokens = torch.zeros(self.pool.slots, 1, dtype=torch.long)
        for slot, sequence in self.decoding.items():
            tokens[slot, 0] = sequence.tokens[-1]
        logits = self.pool.step(tokens.to(self.pool.device))
        self.steps += 1
        return [self._accept(sequence, self._sample(sequence, logits, slot, argmax))
                for (slot, sequence), argmax in zip(list(self.decoding.items()), self._argmax(logits))]

    def _argmax(self, logits: torch.Tensor) -> list[int | None]:
        """The greedy token of every decoding slot (None where the sequence samples)."""
        slots = [slot for slot, s in self.decoding.items() if _plain_greedy(s.params)]
        greedy = dict(zip(slots, logits[slots].argmax(dim=-1).tolist())) if slots else {}
        return [greedy.get(slot) for slot in self.decoding]

    def _sample(self, sequence: Sequence, logits: torch.Tensor, row: int, argmax: int | None = None) -> int:
        if argmax is not None:
            return argmax
        token = sequence.sampler(logits[row : row + 1])
        if sequence.params.repetition_penalty != 1.0:
            sequence.sampler.observe(token[:, None])
        return int(token.item())

    def _accept(self, sequence: Sequence, token: int) -> tuple[Sequence, int]:
        """Record a generated token; end the sequence at a stop token, max_new_tokens or a full context."""
        sequence.tokens.append(token)
        reason = None
        if token in sequence.stop_token_ids:
            reason = FINISH_STOP
        elif (len(sequence.tokens) >= sequence.params.max_new_tokens
              or len(sequence.prompt_ids) + len(sequence.tokens) >= self.context_length):
            reason = FINISH_LENGTH
        if reason is not None:
            sequence.finish_reason = reason
            self.release(sequence)
        return sequence, token

    # ---- prefilling --------------------------------------------------------------------------
    def _prefill(self) -> list[tuple[Sequence, int]]:
        head = self.prefilling[0]
        if head.prefilled or len(head.prompt_ids) > self.prefill_chunk:
            return self._prefill_chunk(head)
        group, longest = [], 0
        for sequence in self.prefilling:
            length = len(sequence.prompt_ids)
            if sequence.prefilled or (len(group) + 1) * max(longest, length) > self.prefill_chunk:
                break
            group.append(sequence)
            longest = max(longest, length)
        tokens = torch.zeros(len(group), longest, dtype=torch.long)
        valid = torch.zeros(len(group), longest, dtype=torch.bool)
        for row, sequence in enumerate(group):
            tokens[row, longest - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids)
            valid[row, longest - len(sequence.prompt_ids) :] = True
        staging = StaticKVCache(self.decoder.model, len(group), longest)
        logits = self.decoder.prefill(tokens.to(self.pool.device), valid.to(self.pool.device), staging)
        self.prefills += 1
        return [self._start_decoding(s, logits, row, staging, longest - len(s.prompt_ids))
                for row, s in enumerate(group)]

    def _prefill_chunk(self, sequence: Sequence) -> list[tuple[Sequence, int]]:
        prompt = sequence.prompt_ids
        if sequence.staging is None:
            sequence.staging = StaticKVCache(self.decoder.model, 1, len(prompt))
        begin = sequence.prefilled
        chunk = torch.tensor([prompt[begin : begin + self.prefill_chunk]], device=self.pool.device)
        logits = self.decoder.prefill_chunk(chunk, begin, sequence.staging)
        self.prefills += 1
        sequence.prefilled += chunk.shape[1]
        if sequence.prefilled < len(prompt):
            return []
        return [self._start_decoding(sequence, logits, 0, sequence.staging, 0)]

    def _start_decoding(self, sequence: Sequence, logits: torch.Tensor, row: int, staging: StaticKVCache,
                        begin: int) -> tuple[Sequence, int]:
        """The prompt is prefilled: sample its first token and, unless that ends it, move its keys
        into its slot."""
        self.prefilling.remove(sequence)
        sequence.state, sequence.staging = DECODING, None
        self.decoding[sequence.slot] = sequence
        device = self.pool.device
        sequence.sampler = BatchSampler([sequence.params], self.decoder.config.vocab_size, device)
        if sequence.params.repetition_penalty != 1.0:
            sequence.sampler.observe(torch.tensor([sequence.prompt_ids], device=device))
        argmax = int(logits[row].argmax()) if _plain_greedy(sequence.params) else None
        produced = self._accept(sequence, self._sample(sequence, logits, row, argmax))
        if not sequence.finished:
            self.pool.place(sequence.slot, staging, row, begin, len(sequence.prompt_ids))
        return produced


def _plain_greedy(params: SamplingParams) -> bool:
    return params.greedy and params.repetition_penalty == 1.0
