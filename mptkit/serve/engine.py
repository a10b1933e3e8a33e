"""The generation worker behind the HTTP server: one thread (`run` on the caller's, as `mptkit
serve` does on its main thread, or `start` for a thread of its own), a bounded queue, and a scheduler.

`Engine` (the default) drives mptkit.inference.batching's `Scheduler`: every iteration admits
waiting requests into free KV-cache slots, decodes one token for every running request and
prefills one chunk of prompt; a request that finishes or whose client left frees its slot at
once. `StaticEngine` is the batcher it replaced (`--scheduler static`, kept for comparison): it
runs one left-padded batch at a time (`stream_batch`) and new requests wait for it to end.

Both: requests wait in a FIFO queue of at most `max_queue` (`submit` raises `QueueFull` beyond);
every request has its own sampling settings, seed and stops, so batching never changes what it
receives beyond floating-point rounding. Text deltas go back to each request's asyncio queue.
A request whose client went away is marked cancelled and stops at the next step; one past its
deadline ends with a `deadline_exceeded` error. The engine thread detokenizes (never the event
loop). `drain()` stops admitting; `shutdown()` cancels what is left and ends the engine's loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from mptkit.inference.batching import Scheduler, Sequence
from mptkit.inference.decode import Decoder
from mptkit.inference.options import DEFAULT_PREFILL_CHUNK
from mptkit.inference.sampling import SamplingParams
from mptkit.inference.text import FINISH_CANCELLED, FINISH_LENGTH, GenerationRequest, TextStream, stream_batch

from .defaults import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE

logger = logging.getLogger("mptkit.serve")

# Static batcher: requests arriving within this long of each other share a batch.
BATCH_WINDOW_S = 0.01
DEADLINE_EXCEEDED = "deadline_exceeded"


class QueueFull(Exception):
    """The engine's queue is full (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and admits nothing new (HTTP 503)."""


@dataclass
class Event:
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    error_code: str | None = None  # DEADLINE_EXCEEDED, or None for a server fault


@dataclass(eq=False)
class Job:
    """One prompt's generation, as seen from both sides: the HTTP handler reads `events`."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which the job is stopped
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    submitted: float = field(default_factory=time.monotonic)
    last_token: float | None = None  # when its latest token came (None before the first)
    generated: int = 0

    def post(self, event: Event) -> None:
        post_all([(self, event)])

    def cancel(self) -> None:
        self.cancelled.set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def post_all(posts: list[tuple[Job, Event]]) -> None:
    """Hand events to their jobs' event loops, one wake-up of each loop for all of them: a step's
    tokens wake the HTTP thread once, not once per client (each wake-up can take a core from the
    decode step's OpenMP team mid-kernel on a small machine)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = collections.defaultdict(list)
    for job, event in posts:
        by_loop[job.loop].append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_events, batch)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            pass


def _put_events(batch: list[tuple[Job, Event]]) -> None:
    for job, event in batch:
        job.events.put_nowait(event)


@dataclass
class EngineStats:
    requests: int = 0  # jobs finished (any way)
    cancelled: int = 0  # jobs whose client went away (or cut off at shutdown)
    expired: int = 0  # jobs stopped at their deadline
    active: int = 0  # jobs queued or running
    queued: int = 0  # jobs waiting for a slot (or a batch)
    running: int = 0  # jobs holding a slot (or in the running batch)
    tokens_generated: int = 0
    prompt_tokens: int = 0
    batches: int = 0  # static: batches run; continuous: busy periods (idle -> busy)
    largest_batch: int = 0  # most jobs decoded together
    steps: int = 0  # decode steps (continuous)
    prefills: int = 0  # prefill forwards (continuous)


class TokenObserver:
    """What the engine reports as tokens come (the server's metrics implement it)."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, prompt: int, generated: int) -> None: ...


class _EngineBase:
    """The queue, the thread, the counters and the job bookkeeping both engines share."""

    def __init__(self, decoder: Decoder, tokenizer, max_batch_size: int, max_queue: int,
                 observer: TokenObserver | None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected >= 1, got {max_batch_size}")
        if max_queue < 1:
            raise ValueError(f"max_queue: expected >= 1, got {max_queue}")
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_length = decoder.context_length
        self.observer = observer or TokenObserver()
        self.stats = EngineStats()
        self.ready = threading.Event()  # set once warmed up (compiled): /health reports it
        self.compiled = False
        self.warmup_seconds = 0.0
        self.draining = False
        self._lock = threading.Lock()
        self._incoming: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="mptkit-engine", daemon=True)
        self._closing = threading.Event()  # shutdown() was called

    def start(self) -> "_EngineBase":
        """Run the engine in a thread of its own (tests, embedding in another program)."""
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the engine in the calling thread until `shutdown` (what `mptkit serve` does on its
        main thread: see mptkit.serve.commands). The warm-up runs meanwhile in a daemon thread of
        its own: a compile cannot be interrupted, and a shutdown asked for during it must not wait
        for it (that thread's OpenMP workers end with it)."""
        threading.Thread(target=self._warm_up_safely, name="mptkit-warm-up", daemon=True).start()
        while not self.ready.wait(0.1):
            if self._closing.is_set():
                return
        self._run()

    def submit(self, jobs: list[Job]) -> list[Job]:
        """Queue `jobs` (all or none): QueueFull when they do not fit, Draining at shutdown."""
        with self._lock:
            if self.draining:
                raise Draining("the server is shutting down")
            if self.stats.queued + len(jobs) > self.max_queue:
                raise QueueFull(f"{self.stats.queued} requests are waiting (at most {self.max_queue})")
            self.stats.active += len(jobs)
            self.stats.queued += len(jobs)
            self.stats.prompt_tokens += sum(len(j.prompt_ids) for j in jobs)
        for job in jobs:
            self._incoming.put(job)
        return jobs

    def drain(self) -> None:
        with self._lock:
            self.draining = True

    def shutdown(self, timeout: float = 10.0) -> None:
        self.drain()
        self._closing.set()
        self._incoming.put(None)
        if self._thread.is_alive():
            # a warm-up cannot be interrupted mid-compile: do not wait for it (the thread is a daemon)
            self._thread.join(timeout=timeout if self.ready.is_set() else 1.0)

    def stats_dict(self) -> dict:
        with self._lock:
            return dict(vars(self.stats))

    def _main(self) -> None:
        self._warm_up_safely()
        self._run()

    def _warm_up_safely(self) -> None:
        try:
            self._warm_up()
        except Exception:  # warm-up is an optimisation: serve uncompiled rather than not at all
            logger.exception("warm-up failed; serving without it")
        self.ready.set()

    def _warm_up(self) -> None:
        pass

    def _run(self) -> None:
        raise NotImplementedError

    # ---- bookkeeping, called from the engine thread ----------------------------------------
    def _started(self, count: int) -> None:
        with self._lock:
            self.stats.queued -= count
            self.stats.running += count
            self.stats.largest_batch = max(self.stats.largest_batch, self.stats.running)

    def _token(self, job: Job, now: float) -> None:
        if job.last_token is None:
            self.observer.first_token(now - job.submitted)
        else:
            self.observer.inter_token(now - job.last_token)
        job.last_token = now

    def _finish(self, job: Job, event: Event, running: bool = True,
                outbox: list[tuple[Job, Event]] | None = None) -> None:
        """Count `job` as ended and send it `event` (into `outbox` when given: the caller posts it)."""
        job.done = True
        with self._lock:
            self.stats.active -= 1
            if running:
                self.stats.running -= 1
            else:
                self.stats.queued -= 1
            self.stats.requests += 1
            self.stats.tokens_generated += event.completion_tokens
            if event.finish_reason == FINISH_CANCELLED:
                self.stats.cancelled += 1
            if event.error_code == DEADLINE_EXCEEDED:
                self.stats.expired += 1
        self.observer.tokens(len(job.prompt_ids), event.completion_tokens)
        if outbox is None:
            job.post(event)
        else:
            outbox.append((job, event))


def _deadline_event(generated: int) -> Event:
    return Event("", None, generated, error="the request ran past its deadline", error_code=DEADLINE_EXCEEDED)


class Engine(_EngineBase):
    """Continuous batching over `max_batch_size` KV-cache slots (see the module docstring)."""

    def __init__(self, decoder: Decoder, tokenizer, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue: int = DEFAULT_MAX_QUEUE, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 compile: bool = False, observer: TokenObserver | None = None):
        super().__init__(decoder, tokenizer, max_batch_size, max_queue, observer)
        self.scheduler = Scheduler(decoder, max_batch_size, prefill_chunk=prefill_chunk, compile=compile)
        self._live: dict[Sequence, tuple[Job, TextStream]] = {}
        self._stopping = False

    def _warm_up(self) -> None:
        if self.scheduler.pool.compiled:
            self.warmup_seconds = self.scheduler.pool.warm_up()
            self.compiled = True

    def _run(self) -> None:
        while not self._stopping:
            self._take_incoming(block=not self.scheduler.has_work)
            self._stop_ended_jobs()
            if not self.scheduler.has_work:
                continue
            waiting = len(self.scheduler.waiting)
            idle = self.scheduler.active == 0
            try:
                produced = self.scheduler.step()
            except Exception as e:  # a failure of generation must not take the server down
                logger.exception("generation failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                continue
            self._count_step(waiting, idle)
            self._deliver(produced)
        self._fail_all(None)

    def _take_incoming(self, block: bool) -> None:
        try:
            job = self._incoming.get() if block else self._incoming.get_nowait()
            while True:
                if job is None:
                    self._stopping = True
                    return
                sequence = Sequence(job.prompt_ids, job.params, job.stop_token_ids, tag=job)
                self._live[sequence] = (job, TextStream(self.tokenizer, job.params, job.stop_token_ids))
                self.scheduler.add(sequence)
                job = self._incoming.get_nowait()
        except queue.Empty:
            return

    def _stop_ended_jobs(self) -> None:
        """Cancelled jobs and jobs past their deadline leave the scheduler (and their slots) now."""
        now = time.monotonic()
        for sequence, (job, stream) in list(self._live.items()):
            if job.cancelled.is_set():
                self._end(sequence, Event(stream.finish(FINISH_CANCELLED), FINISH_CANCELLED, stream.generated))
            elif job.expired(now):
                self._end(sequence, _deadline_event(stream.generated))

    def _count_step(self, waiting_before: int, was_idle: bool) -> None:
        admitted = waiting_before - len(self.scheduler.waiting)
        if admitted:
            self._started(admitted)
        with self._lock:
            self.stats.steps, self.stats.prefills = self.scheduler.steps, self.scheduler.prefills
            self.stats.batches += was_idle

    def _deliver(self, produced: list[tuple[Sequence, int]]) -> None:
        now = time.monotonic()
        outbox: list[tuple[Job, Event]] = []
        for sequence, token in produced:
            job, stream = self._live[sequence]
            self._token(job, now)
            text = stream.push(token)
            if not stream.finished and sequence.finished:  # the context window is full
                text += stream.finish(FINISH_LENGTH)
            if stream.finished:
                self._end(sequence, Event(text, stream.finish_reason, stream.generated), outbox)
            elif text:
                outbox.append((job, Event(text)))
        post_all(outbox)

    def _end(self, sequence: Sequence, event: Event, outbox: list[tuple[Job, Event]] | None = None) -> None:
        job, _ = self._live.pop(sequence)
        started = sequence.state != "waiting"
        self.scheduler.release(sequence, event.finish_reason)
        self._finish(job, event, running=started, outbox=outbox)

    def _fail_all(self, error: str | None) -> None:
        """End every job: with `error` (a generation failure), or as cancelled (shutdown)."""
        for sequence, (_, stream) in list(self._live.items()):
            if error is None:
                self._end(sequence, Event("", FINISH_CANCELLED, stream.generated))
            else:
                self._end(sequence, Event("", None, stream.generated, error=error))


class StaticEngine(_EngineBase):
    """One left-padded batch at a time: the batcher `Engine` replaced (`--scheduler static`)."""

    def __init__(self, decoder: Decoder, tokenizer, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue: int = DEFAULT_MAX_QUEUE, observer: TokenObserver | None = None):
        super().__init__(decoder, tokenizer, max_batch_size, max_queue, observer)
        self._waiting: collections.deque[Job] = collections.deque()  # taken from the queue, not yet run

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
                    for job in self._waiting:
                        self._finish(job, Event("", FINISH_CANCELLED), running=False)
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
        now = time.monotonic()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled.is_set() or job.expired(now):
                event = Event("", FINISH_CANCELLED) if job.cancelled.is_set() else _deadline_event(0)
                self._finish(job, event, running=False)
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
        self._started(len(batch))
        with self._lock:
            self.stats.batches += 1
        requests = [
            GenerationRequest(job.prompt_ids, job.params, job.stop_token_ids,
                              cancelled=lambda job=job: job.cancelled.is_set() or job.expired(time.monotonic()))
            for job in batch
        ]
        try:
            for updates in stream_batch(self.decoder, self.tokenizer, requests):
                now = time.monotonic()
                outbox: list[tuple[Job, Event]] = []
                try:
                    for update in updates:
                        job = batch[update.row]
                        if update.generated > job.generated:
                            self._token(job, now)
                            job.generated = update.generated
                        if update.finish_reason is None:
                            outbox.append((job, Event(update.text, None, update.generated)))
                        elif update.finish_reason == FINISH_CANCELLED and not job.cancelled.is_set():
                            self._finish(job, _deadline_event(update.generated), outbox=outbox)
                        else:
                            self._finish(job, Event(update.text, update.finish_reason, update.generated), outbox=outbox)
                finally:  # what was already decided reaches its clients
                    post_all(outbox)
        except Exception as e:  # a failure of generation must not take the server down
            logger.exception("generation failed")
            for job in batch:
                if not job.done:
                    self._finish(job, Event("", None, error=f"generation failed: {type(e).__name__}: {e}"))
