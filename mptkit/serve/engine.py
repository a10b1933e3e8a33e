"""The generation worker behind the HTTP server: one thread, a queue, batches of requests.

Requests wait in a FIFO queue. The worker takes the oldest one, plus whatever else is waiting
(up to `max_batch_size`) whose prompt and max_tokens still fit in the context window together
with the batch's, and runs them as one left-padded batch (`stream_batch`): every row has its own
sampling settings, seed and stops, so batching never changes what a request receives beyond
floating-point rounding. Text deltas go back to each request's asyncio queue. A request whose
client went away is marked cancelled and its row stops at the next token; a batch whose rows
have all ended stops at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from mptkit.inference.decode import Decoder
from mptkit.inference.sampling import SamplingParams
from mptkit.inference.text import FINISH_CANCELLED, GenerationRequest, stream_batch

logger = logging.getLogger("mptkit.serve")

# Requests arriving within this long of each other share a batch.
BATCH_WINDOW_S = 0.01
DEFAULT_MAX_BATCH_SIZE = 8  # requests decoded together


@dataclass
class Event:
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Job:
    """One prompt's generation, as seen from both sides: the HTTP handler reads `events`."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False

    def post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class EngineStats:
    requests: int = 0  # jobs finished (any way)
    cancelled: int = 0  # jobs whose client went away
    active: int = 0  # jobs queued or running
    tokens_generated: int = 0
    batches: int = 0
    largest_batch: int = 0


class Engine:
    def __init__(self, decoder: Decoder, tokenizer, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected >= 1, got {max_batch_size}")
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = decoder.context_length
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._incoming: queue.Queue[Job | None] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()  # taken from the queue, not yet run
        self._thread = threading.Thread(target=self._run, name="mptkit-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            self.stats.active += 1
        self._incoming.put(job)
        return job

    def shutdown(self) -> None:
        self._incoming.put(None)
        self._thread.join(timeout=10)

    def stats_dict(self) -> dict:
        with self._lock:
            return dict(vars(self.stats))

    # ---- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self._waiting:
                job = self._incoming.get()
                if job is None:
                    return
                self._waiting.append(job)
                time.sleep(BATCH_WINDOW_S)
            while True:  # move everything already queued into `_waiting`
                try:
                    job = self._incoming.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                self._waiting.append(job)
            batch = self._next_batch()
            if batch:
                self._run_batch(batch)

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job plus later ones that fit in the context beside it (FIFO otherwise)."""
        batch: list[Job] = []
        longest_prompt = most_new = 0
        kept: collections.deque[Job] = collections.deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                self._finish(job, Event("", FINISH_CANCELLED))
                continue
            prompt = max(longest_prompt, len(job.prompt_ids))
            new = max(most_new, job.params.max_new_tokens)
            if len(batch) < self.max_batch_size and (not batch or prompt + new <= self.context_length):
                batch.append(job)
                longest_prompt, most_new = prompt, new
            else:
                kept.append(job)
        self._waiting = kept
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        with self._lock:
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        requests = [
            GenerationRequest(job.prompt_ids, job.params, job.stop_token_ids, cancelled=job.cancelled.is_set)
            for job in batch
        ]
        try:
            for updates in stream_batch(self.decoder, self.tokenizer, requests):
                for update in updates:
                    event = Event(update.text, update.finish_reason, update.generated)
                    if update.finish_reason is None:
                        batch[update.row].post(event)
                    else:
                        self._finish(batch[update.row], event)
        except Exception as e:  # a failure of generation must not take the server down
            logger.exception("generation failed")
            for job in batch:
                if not job.done:
                    self._finish(job, Event("", None, error=f"generation failed: {type(e).__name__}: {e}"))

    def _finish(self, job: Job, event: Event) -> None:
        job.done = True
        with self._lock:
            self.stats.active -= 1
            self.stats.requests += 1
            self.stats.tokens_generated += event.completion_tokens
            if event.finish_reason == FINISH_CANCELLED:
                self.stats.cancelled += 1
        job.post(event)
