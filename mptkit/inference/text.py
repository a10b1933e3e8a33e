"""From token ids to text as it is generated: incremental detokenization, stop tokens and strings.

`TextStream` turns one row's tokens into text deltas that are safe to show: it waits while the
last bytes are an incomplete UTF-8 character, and holds back text that could still become the
start of a stop string. `stream_batch` runs a batch of requests through a `Decoder` and yields
every row's deltas step by step, ending each row at its own stop, length or cancellation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from .decode import Decoder
from .sampling import SamplingParams

FINISH_STOP = "stop"  # a stop token or stop string
FINISH_LENGTH = "length"  # max_new_tokens, or the context window is full
FINISH_CANCELLED = "cancelled"  # the caller gave up (a client disconnected)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()
    cancelled: Callable[[], bool] = field(default=lambda: False)


@dataclass
class RowUpdate:
    row: int
    text: str  # new text since the last update ("" when only finishing)
    finish_reason: str | None  # set on the row's last update
    generated: int  # tokens the row has produced so far (a final stop token included)


class TextStream:
    """One row's generated text, released in pieces that will not change or need retracting."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams, stop_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.stop_token_ids = stop_token_ids
        self.generated = 0  # tokens produced, a final stop token included
        self.token_ids: list[int] = []  # the tokens that make up the text
        self.text = ""  # everything decoded so far (may run past what was released)
        self.released = 0  # characters of `text` handed out
        self.finish_reason: str | None = None
        # incremental detokenization: decode a short window, not the whole generation, per token
        self._window_start = 0
        self._window_read = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> str:
        """Take the next token; return the text that can be released now."""
        self.generated += 1
        if token_id in self.stop_token_ids:
            return self.finish(FINISH_STOP)
        self.token_ids.append(token_id)
        self._decode(final=False)
        if self._cut_at_stop_string():
            return self._release(len(self.text))
        if self.generated >= self.params.max_new_tokens:
            return self.finish(FINISH_LENGTH)
        return self._release(len(self.text) - self._stop_prefix_length())

    def finish(self, reason: str) -> str:
        """End the row (also from outside: context full, cancelled); return the held-back text."""
        self._decode(final=True)  # bytes still waiting for the rest of a character, as they are
        if not self._cut_at_stop_string():
            self.finish_reason = reason
        return self._release(len(self.text))

    def _decode(self, final: bool) -> None:
        window = self.token_ids[self._window_start :]
        if len(window) == self._window_read - self._window_start:
            return
        before = self.tokenizer.decode(window[: self._window_read - self._window_start], skip_special_tokens=False)
        now = self.tokenizer.decode(window, skip_special_tokens=False)
        if final or not now.endswith("\ufffd"):  # else: an incomplete UTF-8 character, wait for its bytes
            self.text += now[len(before) :]
            self._window_start, self._window_read = self._window_read, len(self.token_ids)

    def _cut_at_stop_string(self) -> bool:
        # A stop string cannot start before `released`: its start would have been held back.
        hits = [i for s in self.params.stop if (i := self.text.find(s, self.released)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish_reason = FINISH_STOP
        return True

    def _release(self, upto: int) -> str:
        piece = self.text[self.released : max(upto, self.released)]
        self.released += len(piece)
        return piece

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the text that is the beginning of some stop string."""
        longest = 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(self.text) - self.released), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


def stream_batch(
    decoder: Decoder, tokenizer: PreTrainedTokenizerBase, requests: list[GenerationRequest]
) -> Iterator[list[RowUpdate]]:
    """Generate for all `requests` as one left-padded batch; yield each step's row updates.

    Every row gets exactly one update with a finish_reason, its last. Generation ends as soon as
    every row has finished (or was cancelled).
    """
    streams = [TextStream(tokenizer, r.params, r.stop_token_ids) for r in requests]
    steps = decoder.generate([r.prompt_ids for r in requests], [r.params for r in requests], pad_id=_pad_id(tokenizer))

    def finished(row: int, reason: str) -> RowUpdate:
        text = streams[row].finish(reason)
        return RowUpdate(row, text, streams[row].finish_reason, streams[row].generated)

    try:
        for tokens in steps:
            updates = []
            for row, (request, stream, token) in enumerate(zip(requests, streams, tokens.tolist())):
                if stream.finished:
                    continue
                if request.cancelled():
                    updates.append(finished(row, FINISH_CANCELLED))
                    continue
                text = stream.push(token)
                if text or stream.finished:
                    updates.append(RowUpdate(row, text, stream.finish_reason, stream.generated))
            if updates:
                yield updates
            if all(s.finished for s in streams):
                return
        # the decoder stopped first: the context window is full
        yield [finished(row, FINISH_LENGTH) for row, s in enumerate(streams) if not s.finished]
    finally:
        steps.close()


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0
