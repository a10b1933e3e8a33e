"""The two engines behind the app, in-process (starlette's TestClient): the continuous engine and
the static batcher it replaced (`--scheduler static`, kept for the serve benchmark) give the same
text for the same requests, count them the same way and both honour deadlines; the continuous
engine hands a step's tokens to the event loop in one wake-up."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.testclient import TestClient

from mptkit.inference.options import ModelOptions, build_generator
from mptkit.inference.sampling import SamplingParams
from mptkit.serve.app import create_app
from mptkit.serve.engine import Engine, Job, StaticEngine

REQUESTS = [
    {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0},
    {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 4},
    {"prompt": ["Alpha", "Beta gamma"], "max_tokens": 6, "temperature": 0, "stop": ["a"]},
    {"prompt": "Count: one two", "max_tokens": 9, "temperature": 1.0, "repetition_penalty": 1.3, "seed": 2},
]


@pytest.fixture(scope="module")
def generator(tiny_checkpoint):
    return build_generator(ModelOptions(model=str(tiny_checkpoint), dtype="float32", max_seq_len=512))


def _client(engine_class, generator, **app_options):
    decoder, tokenizer = generator
    engine = engine_class(decoder, tokenizer, max_batch_size=3).start()
    return engine, TestClient(create_app(engine, "tiny", **app_options))


def _texts(client) -> list[list[str]]:
    def ask(body):
        response = client.post("/v1/completions", json={"model": "m", **body})
        assert response.status_code == 200, response.text
        return [c["text"] for c in response.json()["choices"]]

    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # together, so that they share batches
        return list(pool.map(ask, REQUESTS))


def test_both_engines_give_the_same_text(generator):
    texts = {}
    for engine_class in (Engine, StaticEngine):
        engine, client = _client(engine_class, generator)
        with client:
            texts[engine_class.__name__] = _texts(client)
            stats = client.get("/stats").json()
        engine.shutdown()
        assert stats["requests"] == 5 and stats["active"] == 0 and stats["largest_batch"] >= 2
    assert texts["Engine"] == texts["StaticEngine"]
    assert all(t for choice in texts["Engine"] for t in choice)


@pytest.mark.parametrize("engine_class", [Engine, StaticEngine])
def test_a_deadline_stops_a_request_in_either_engine(generator, engine_class):
    engine, client = _client(engine_class, generator, request_timeout=0.2)
    body = {"model": "m", "prompt": "Tell me everything.", "max_tokens": 500, "temperature": 0}
    with client:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "deadline_exceeded"
        assert client.get("/stats").json()["expired"] == 2
    engine.shutdown()


def test_a_step_wakes_the_event_loop_once_for_all_its_tokens(generator):
    """The engine hands a step's events to the HTTP thread's loop in one call, not one per client."""
    decoder, tokenizer = generator
    engine = Engine(decoder, tokenizer, max_batch_size=3).start()
    loop = asyncio.new_event_loop()
    wakeups: list[int] = []  # events handed over per wake-up of the loop
    hand_over = loop.call_soon_threadsafe

    def counting(callback, batch, *args):
        wakeups.append(len(batch))
        return hand_over(callback, batch, *args)

    loop.call_soon_threadsafe = counting
    prompt = tokenizer("Once upon a time")["input_ids"]
    jobs = [Job(list(prompt), SamplingParams(max_new_tokens=12), frozenset(), loop) for _ in range(3)]

    async def events_of(job):
        received = []
        while not received or received[-1].finish_reason is None and received[-1].error is None:
            received.append(await job.events.get())
        return received

    async def run():
        engine.submit(jobs)
        return await asyncio.gather(*(events_of(job) for job in jobs))

    try:
        received = loop.run_until_complete(asyncio.wait_for(run(), 60))
    finally:
        engine.shutdown()
        loop.close()
    assert all(events[-1].finish_reason == "length" for events in received)
    assert sum(wakeups) == sum(len(events) for events in received)
    assert max(wakeups) == 3  # one wake-up carried a token for each of the three requests
    assert len(wakeups) < sum(wakeups)
