"""A server that holds: the API key, the body limit (413 before the body is read whole), the bounded
queue (429), deadlines (504), /health and /metrics, tokenization off the event loop, compiling at
start-up, and SIGTERM. Real `mptkit serve` processes on 127.0.0.1 with the tiny checkpoint."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.test_serve import launch_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4096  # --max-body-bytes of the guarded server
CONTEXT = 4096  # --max-seq-len of the guarded server (ALiBi): room for generations that outlast the deadline
LONG = {"model": "m", "prompt": "Tell me everything.", "max_tokens": CONTEXT - 10, "temperature": 0}


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, tmp_path_factory):
    """One slot, a queue of two, a 4 KiB body limit, an API key and a 6 s deadline."""
    log = open(tmp_path_factory.mktemp("guarded") / "server.log", "w+")
    process, base = launch_server(
        tiny_checkpoint, "--max-seq-len", str(CONTEXT), "--no-compile", "--log-level", "warning",
        "--api-key", KEY, "--max-body-bytes", str(LIMIT), "--max-batch-size", "1", "--max-queue", "2",
        "--request-timeout", "6", log=log)
    yield base
    process.kill()
    process.wait(timeout=20)
    log.close()


def _stats(base):
    return httpx.get(f"{base}/stats", headers=AUTH, timeout=10).json()


def _raw_exchange(base: str, head: bytes, body_parts: list[bytes], timeout: float = 10) -> bytes:
    """Send `head` and `body_parts` on a raw socket (stopping if the server answers), then read."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):  # the server answered and closed
                break
        response = b""
        try:
            while b"\r\n\r\n" not in response or not response.endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (ConnectionResetError, socket.timeout):
            pass
    return response


def test_requests_need_the_api_key_but_health_does_not(guarded):
    assert httpx.get(f"{guarded}/health", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{guarded}/v1/completions", json={"model": "m", "prompt": "x"}, headers=headers,
                              timeout=10)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{guarded}/metrics", headers=headers, timeout=10).status_code == 401
    ok = httpx.post(f"{guarded}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, headers=AUTH,
                    timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_declared_oversized_body_gets_413_before_it_is_sent(guarded):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n")
    began = time.monotonic()
    response = _raw_exchange(guarded, head, [])  # not one byte of the body
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    assert time.monotonic() - began < 5


def test_a_chunked_oversized_body_gets_413_without_being_read_whole(guarded):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 1024
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (2 * LIMIT // len(chunk))  # never the final 0-chunk
    response = _raw_exchange(guarded, head, parts)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]


def test_a_full_queue_gets_429_with_retry_after_and_a_deadline_504(guarded):
    results = {}

    def ask(name, body):
        response = httpx.post(f"{guarded}/v1/completions", json=body, headers=AUTH, timeout=60)
        results[name] = response

    # one request takes the slot, two wait: the queue is full
    threads = [threading.Thread(target=ask, args=(i, LONG)) for i in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    deadline = time.time() + 10
    while (stats := _stats(guarded))["queued"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert (stats["running"], stats["queued"]) == (1, 2)
    refused = httpx.post(f"{guarded}/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH, timeout=10)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    # the deadline (6 s) stops the long requests: a 504 each, running or still waiting
    for thread in threads:
        thread.join(timeout=40)
    assert [results[i].status_code for i in range(3)] == [504, 504, 504]
    assert results[0].json()["error"]["code"] == "deadline_exceeded"
    assert _stats(guarded)["active"] == 0


def test_a_streamed_request_past_its_deadline_ends_with_an_error_event(guarded):
    with httpx.stream("POST", f"{guarded}/v1/completions", json={**LONG, "stream": True}, headers=AUTH,
                      timeout=60) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "deadline_exceeded"


def test_metrics_in_prometheus_format(guarded):
    httpx.post(f"{guarded}/v1/completions", json={"model": "m", "prompt": "Count:", "max_tokens": 5}, headers=AUTH,
               timeout=30).raise_for_status()
    httpx.post(f"{guarded}/v1/completions", content=b"{bad", headers=AUTH, timeout=30)
    response = httpx.get(f"{guarded}/metrics", headers=AUTH, timeout=10)
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    for name in ("mptkit_queue_depth", "mptkit_active_slots", "mptkit_slots", "mptkit_ready",
                 "mptkit_prompt_tokens_total", "mptkit_generation_tokens_total",
                 "mptkit_time_to_first_token_seconds_count", "mptkit_inter_token_latency_seconds_count",
                 'mptkit_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert name in samples, name
    assert samples['mptkit_requests_total{outcome="ok"}'] >= 1
    assert samples['mptkit_requests_total{outcome="invalid"}'] >= 1
    assert samples["mptkit_slots"] == 1 and samples["mptkit_ready"] == 1
    assert samples["mptkit_generation_tokens_total"] >= 5
    assert samples["mptkit_inter_token_latency_seconds_count"] >= 4


@pytest.fixture(scope="module")
def plain(tiny_checkpoint, tmp_path_factory):
    """Defaults but for compiling (test_compiled_at_start_up_before_reporting_ready does that) and a
    short shutdown timeout."""
    log = open(tmp_path_factory.mktemp("plain") / "server.log", "w+")
    process, base = launch_server(tiny_checkpoint, "--max-seq-len", str(CONTEXT), "--max-batch-size", "4",
                                  "--no-compile", "--shutdown-timeout", "3", log=log)
    yield process, base
    process.kill()
    process.wait(timeout=20)
    log.close()


def test_the_event_loop_stays_free_while_a_large_prompt_is_tokenized(plain):
    _, base = plain
    big = {"model": "m", "prompt": "ALiBi biases attention by distance. " * 25000}  # ~0.9 MB, ~200k tokens
    answers = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(f"{base}/v1/completions", json=big,
                                                                       timeout=120)))
    sent = time.monotonic()
    thread.start()
    time.sleep(0.2)
    slowest = 0.0
    while thread.is_alive():
        began = time.monotonic()
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        slowest = max(slowest, time.monotonic() - began)
        time.sleep(0.05)
    took = time.monotonic() - sent
    assert answers[0].json()["error"]["code"] == "context_length_exceeded"
    # on the event loop, tokenizing would hold one /health for most of `took` (0.7 s on a Xeon
    # core, over 1 s on an EPYC one)
    assert took > 0.3 and slowest < took / 3, (slowest, took)


def test_sigterm_finishes_or_cancels_running_requests_refuses_new_ones_and_exits_0(plain):
    process, base = plain
    streams: dict[str, list[str]] = {"short": [], "long": []}
    bodies = {"short": {"model": "m", "prompt": "Once", "max_tokens": 40, "temperature": 0, "stream": True},
              "long": {**LONG, "stream": True}}  # far longer than the 3 s shutdown timeout

    def stream(name):
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=bodies[name], timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        streams[name].append(line)
        except httpx.HTTPError:  # the long one is cut off
            pass

    threads = [threading.Thread(target=stream, args=(name,)) for name in streams]
    for thread in threads:
        thread.start()
    deadline = time.time() + 20
    while not all(streams.values()) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert process.wait(timeout=40) == 0
    assert time.monotonic() - began < 3 + 10  # the shutdown timeout, and some
    for thread in threads:
        thread.join(timeout=10)
    short, long = streams["short"], streams["long"]
    assert short[-1] == "data: [DONE]"  # answered in full
    assert json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    answered_in_full = long[-1] == "data: [DONE]" and '"finish_reason": "length"' in long[-2]
    assert long and not answered_in_full  # cut off after the shutdown timeout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=5)


@pytest.mark.slow
def test_compiled_at_start_up_before_reporting_ready(tiny_checkpoint, tmp_path):
    """The default: compiled at start-up (a short context: one key bucket, one graph; ~80 s here)."""
    log = open(tmp_path / "server.log", "w+")
    process, base = launch_server(tiny_checkpoint, "--max-seq-len", "128", "--max-batch-size", "4", log=log,
                                  ready=False)
    try:
        health = httpx.get(f"{base}/health", timeout=10)
        if health.status_code == 503:  # still compiling
            assert (health.json()["alive"], health.json()["ready"], health.json()["status"]) == (True, False, "starting")
        body = {"model": "m", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{base}/v1/completions", json=body, timeout=300)  # sent while compiling: waits
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 200
        assert health.json()["ready"] and health.json()["compiled"] and health.json()["warmup_seconds"] > 0
        log.seek(0)
        assert "decode step compiled in" in log.read()
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()["choices"] == answer.json()["choices"]
    finally:
        process.kill()
        process.wait(timeout=20)
        log.close()


def test_sigterm_while_compiling_exits_0_at_once(tiny_checkpoint, tmp_path):
    """The engine computes on the main thread and compiles in a thread of its own: a stop asked for
    during the compile does not wait for it (nothing has run yet)."""
    log = open(tmp_path / "server.log", "w+")
    process, base = launch_server(tiny_checkpoint, "--max-seq-len", "128", log=log, ready=False)
    try:
        health = httpx.get(f"{base}/health", timeout=10)
        if health.status_code == 200:
            pytest.skip("the compile finished before the check (a warm inductor cache)")
        process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - began < 10
    finally:
        process.kill()
        log.close()


def test_a_port_in_use_exits_1_saying_so(tiny_checkpoint, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "mptkit.cli", "serve", str(tiny_checkpoint), "--port", str(port),
                               "--dtype", "float32", "--no-compile"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "address already in use" in done.stdout + done.stderr
