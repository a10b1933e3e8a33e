"""`mptkit serve` as a real process on 127.0.0.1, called with the official `openai` client and raw
HTTP; its greedy outputs are checked against transformers' generate on the same checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mptkit.data.templates import format_chatml
from mptkit.inference.prompts import stop_token_ids
from mptkit.serve.commands import check_loopback
from mptkit.serve.commands import main as serve_main

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 1024  # served with --max-seq-len (ALiBi): room for a long generation to cancel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def launch_server(checkpoint, *args: str, log, ready: bool = True, timeout: float = 180):
    """`mptkit serve CHECKPOINT ARGS` (fp32) as a process on a free 127.0.0.1 port: (process, base
    URL) once /health answers, and answers 200 (ready) when `ready`."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mptkit.cli", "serve", str(checkpoint), "--port", str(port), "--dtype", "float32",
         *args],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            status = httpx.get(f"{base}/health", timeout=1).status_code
            if status == 200 or not ready:
                return process, base
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            log.seek(0)
            pytest.fail(f"server did not start:\n{log.read()[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+")
    process, base = launch_server(checkpoint, "--max-seq-len", str(CONTEXT), "--log-level", "warning",
                                  "--no-compile", log=log)  # compiling at start-up: test_serve_server.py
    assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 200
    yield base
    process.terminate()
    process.wait(timeout=20)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy text from transformers' generate on the checkpoint (the model-card code path)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)

    def generate(text: str, max_new_tokens: int, stops=frozenset()) -> tuple[str, int, int]:
        """(text, prompt tokens, completion tokens)."""
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
        generated = len(new)
        for i, token in enumerate(new):
            if token in stops:
                new, generated = new[:i], i + 1
                break
        return tokenizer.decode(new), ids.shape[1], generated

    generate.tokenizer = tokenizer
    return generate


def test_models_lists_the_served_model(client, checkpoint):
    assert [m.id for m in client.models.list().data] == [checkpoint.name]


def test_completion_matches_reference_with_usage(client, reference):
    prompt = "The capital of France is"
    text, prompt_tokens, _ = reference(prompt, 16)
    response = client.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=0)
    choice = response.choices[0]
    assert (choice.text, choice.finish_reason) == (text, "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        prompt_tokens, 16, prompt_tokens + 16
    )


def test_streamed_completion_adds_up_to_the_same_text(client, reference):
    prompt = "Once upon a time"
    text, _, _ = reference(prompt, 20)
    chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_completion_and_stream_with_usage(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    text, prompt_tokens, generated = reference(
        format_chatml(messages, add_generation_prompt=True), 12, stop_token_ids(reference.tokenizer, "chat")
    )
    response = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == text
    assert response.usage.prompt_tokens == prompt_tokens and response.usage.completion_tokens == generated

    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated


def test_raw_stream_ends_with_done(server):
    body = {"model": "m", "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_the_text(client, reference):
    prompt = "The capital of France is"
    full, _, _ = reference(prompt, 16)
    stop = full[6:9]
    response = client.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model="m", prompt="Pick a word:", max_tokens=12, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text

    first = sample(5)
    assert sample(5) == first and sample(6) != first


def test_several_prompts_give_one_choice_each(client, reference):
    prompts = ["Alpha", "Beta gamma delta"]
    response = client.completions.create(model="m", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [reference(p, 6)[0] for p in prompts]


LONG_PROMPT = "word " * (CONTEXT + 10)
INVALID = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"\xff\xfe"),
    ("/v1/completions", b"[]"),
    ("/v1/completions", b"null"),
    ("/v1/completions", {"model": "m"}),
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/completions", {"model": "m", "prompt": 5}),
    ("/v1/completions", {"model": "m", "prompt": ""}),
    ("/v1/completions", {"model": "m", "prompt": []}),
    ("/v1/completions", {"model": "m", "prompt": [[]]}),
    ("/v1/completions", {"model": "m", "prompt": [10**9]}),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": "10"}),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": -1}),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 1.5}),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 10**12}),
    ("/v1/completions", {"model": "m", "prompt": "x", "temperature": 2.5}),
    ("/v1/completions", {"model": "m", "prompt": "x", "temperature": -1}),
    ("/v1/completions", {"model": "m", "prompt": "x", "temperature": "hot"}),
    ("/v1/completions", {"model": "m", "prompt": "x", "top_p": 1.5}),
    ("/v1/completions", {"model": "m", "prompt": "x", "top_k": -2}),
    ("/v1/completions", {"model": "m", "prompt": "x", "stream": "yes"}),
    ("/v1/completions", {"model": "m", "prompt": "x", "n": 2}),
    ("/v1/completions", {"model": "m", "prompt": "x", "logprobs": 3}),
    ("/v1/completions", {"model": "m", "prompt": "x", "presence_penalty": 0.5}),
    ("/v1/completions", {"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
    ("/v1/completions", {"model": "m", "prompt": "x", "frobnicate": True}),
    ("/v1/completions", {"model": "m", "prompt": LONG_PROMPT}),
    ("/v1/completions", {"model": "m", "prompt": "x", "seed": "1"}),
    ("/v1/chat/completions", {"model": "m", "messages": []}),
    ("/v1/chat/completions", {"model": "m", "messages": "hi"}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"content": "hi"}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "robot", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": LONG_PROMPT}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}),
]


@pytest.mark.parametrize("path,body", INVALID, ids=[f"{i}" for i in range(len(INVALID))])
def test_invalid_requests_get_a_400_error_body(server, path, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]


def test_context_errors_say_why(server):
    response = httpx.post(f"{server}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": CONTEXT},
                          timeout=30)
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "max_tokens"


def test_unknown_route_and_method_get_error_bodies(server):
    assert httpx.get(f"{server}/v1/nothing", timeout=10).json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server}/v1/completions", timeout=10).status_code == 405


def test_32_concurrent_clients_get_their_own_answers(client, reference, server):
    prompts = [f"Client number {i} asks about topic {i * 7}" for i in range(32)]

    def ask(i, stream=False):
        if stream:
            chunks = client.completions.create(model="m", prompt=prompts[i], max_tokens=8, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model="m", prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text

    # each request alone, one after the other: what every client must get when they all come at once
    alone = [ask(i) for i in range(32)]
    assert len(set(alone)) == 32
    assert [alone[i] for i in (0, 13, 31)] == [reference(prompts[i], 8)[0] for i in (0, 13, 31)]
    before = httpx.get(f"{server}/stats", timeout=10).json()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: ask(i, stream=bool(i % 2)), range(32)))
    assert answers == alone
    after = httpx.get(f"{server}/stats", timeout=10).json()
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32  # requests were batched together
    assert after["largest_batch"] > 1  # decoded together


def test_client_disconnect_stops_its_generation(server):
    before = httpx.get(f"{server}/stats", timeout=10).json()
    max_tokens = CONTEXT - 10
    body = {"model": "m", "prompt": "Tell me everything.", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(4)]
    assert received[0].startswith("data: ")
    deadline = time.time() + 20
    while (stats := httpx.get(f"{server}/stats", timeout=10).json())["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert stats["active"] == 0
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["tokens_generated"] - before["tokens_generated"] < max_tokens // 2
    # the server carries on
    assert httpx.post(f"{server}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2},
                      timeout=30).status_code == 200


def test_client_giving_up_on_a_plain_request_stops_its_generation(server):
    before = httpx.get(f"{server}/stats", timeout=10).json()
    max_tokens = CONTEXT - 10
    body = {"model": "m", "prompt": "Tell me everything.", "max_tokens": max_tokens, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=0.5)
    deadline = time.time() + 20
    while (stats := httpx.get(f"{server}/stats", timeout=10).json())["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["tokens_generated"] - before["tokens_generated"] < max_tokens // 2


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.com", "::"])
def test_only_loopback_addresses_are_served(host):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(host)


def test_serve_refuses_a_public_host_before_loading(capsys):
    assert serve_main("serve", ["/nonexistent", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost"):
        check_loopback(host)


def test_serve_takes_a_public_host_with_an_api_key(capsys):
    assert serve_main("serve", ["/nonexistent", "--host", "0.0.0.0", "--api-key", "secret"]) == 2
    error = capsys.readouterr().err
    assert "loopback" not in error and "/nonexistent" in error  # past the host check, failing to load
