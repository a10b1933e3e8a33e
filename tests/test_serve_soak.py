"""Soak: 64 concurrent clients for a bounded time against one `mptkit serve` process on 127.0.0.1,
mixing well-formed requests (plain and streamed) with clients that disconnect or give up
midway, malformed bodies, oversized bodies and missing API keys. The server must stay up and keep
its resident memory flat; every well-formed request is answered in full or cancelled (the engine
finishes exactly as many jobs as were sent), every bad one gets its 4xx.
20 seconds in `make test`, minutes with -m slow."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.test_serve import launch_server

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS = 64
LIMIT = 16384  # --max-body-bytes
# RSS is measured from here on: the first seconds of load allocate (tokenizer copies per worker
# thread, allocator arenas, prefill buffers), ~110 MB here, then it stays within a few MB
WARM_UP_S = 8.0
RSS_GROWTH_LIMIT = 64 * 2**20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _good_body(rng: random.Random, stream: bool) -> dict:
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "ALiBi", "slot"]) for _ in range(rng.randint(1, 40)))
    return {"model": "m", "prompt": words, "max_tokens": rng.randint(1, 24), "stream": stream,
            "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}


async def _answered(client, base, rng) -> str:
    body = _good_body(rng, stream=False)
    response = await client.post(f"{base}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= response.json()["usage"]["completion_tokens"] <= body["max_tokens"]
    return "answered"


async def _streamed(client, base, rng, leave_after: int | None) -> str:
    body = _good_body(rng, stream=True)
    body["max_tokens"] = 200 if leave_after is not None else body["max_tokens"]
    lines = []
    async with client.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
            if leave_after is not None and len(lines) >= leave_after:
                return "disconnected"  # leaving the block closes the connection midway
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    return "answered"


async def _gave_up(client, base, rng) -> str:
    body = {**_good_body(rng, stream=False), "max_tokens": 300}
    try:
        await client.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=rng.uniform(0.05, 0.5))
        return "answered"
    except httpx.TimeoutException:
        return "gave up"  # perhaps before the server had the whole request


async def _bad(client, base, rng) -> str:
    kind = rng.choice(["json", "field", "type", "oversized", "key"])
    content = {"json": b"{not json", "field": json.dumps({"model": "m", "prompt": "x", "frobnicate": 1}).encode(),
               "type": json.dumps({"model": "m", "prompt": "x", "max_tokens": "9"}).encode(),
               "oversized": json.dumps({"model": "m", "prompt": "x" * (LIMIT + 10)}).encode(),
               "key": b'{"model": "m", "prompt": "x"}'}[kind]
    headers = {"Content-Type": "application/json", **({} if kind == "key" else AUTH)}
    response = await client.post(f"{base}/v1/completions", content=content, headers=headers)
    expected = {"oversized": 413, "key": 401}.get(kind, 400)
    assert response.status_code == expected, (kind, response.status_code, response.text[:200])
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    return "refused"


async def _client(client: httpx.AsyncClient, base: str, seed: int, stop_at: float, tally: Counter) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        pick = rng.random()
        if pick < 0.3:
            outcome = await _answered(client, base, rng)
        elif pick < 0.55:
            outcome = await _streamed(client, base, rng, leave_after=None)
        elif pick < 0.7:
            outcome = await _streamed(client, base, rng, leave_after=rng.randint(1, 4))
        elif pick < 0.8:
            outcome = await _gave_up(client, base, rng)
        else:
            outcome = await _bad(client, base, rng)
        tally[outcome] += 1


def soak(checkpoint, log, seconds: float) -> None:
    process, base = launch_server(checkpoint, "--max-seq-len", "512", "--no-compile", "--api-key", KEY,
                                  "--max-batch-size", "8", "--max-body-bytes", str(LIMIT), "--log-level", "warning",
                                  log=log)
    try:
        tally: Counter = Counter()
        rss: list[int] = []

        async def run():
            # one connection per client (a client that leaves midway closes its connection)
            limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                stop_at = time.monotonic() + seconds
                clients = [asyncio.create_task(_client(client, base, seed, stop_at, tally)) for seed in range(CLIENTS)]
                await asyncio.sleep(max(WARM_UP_S, seconds / 5))
                while not all(c.done() for c in clients):
                    rss.append(_rss(process.pid))
                    await asyncio.sleep(0.5)
                await asyncio.gather(*clients)  # re-raises a client's failed check

        asyncio.run(run())
        assert process.poll() is None, "the server died"
        deadline = time.time() + 30
        while (stats := httpx.get(f"{base}/stats", headers=AUTH, timeout=10).json())["active"] and time.time() < deadline:
            time.sleep(0.1)
        assert stats["active"] == 0 and stats["running"] == 0 and stats["queued"] == 0
        assert tally["answered"] > CLIENTS and tally["disconnected"] > 5 and tally["refused"] > 5, tally
        # each one the engine got finished (answered or cancelled): all those answered or streaming,
        # and some of those whose clients gave up early
        reached = tally["answered"] + tally["disconnected"]
        assert reached <= stats["requests"] <= reached + tally["gave up"], (stats, tally)
        assert stats["cancelled"] >= 1
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        assert max(rss) - rss[0] < RSS_GROWTH_LIMIT, [r // 2**20 for r in rss]
    finally:
        process.kill()
        process.wait(timeout=20)


def test_soak_20_seconds(tiny_checkpoint, tmp_path):
    with open(tmp_path / "server.log", "w+") as log:
        soak(tiny_checkpoint, log, seconds=20)


@pytest.mark.slow
def test_soak_3_minutes(tiny_checkpoint, tmp_path):
    with open(tmp_path / "server.log", "w+") as log:
        soak(tiny_checkpoint, log, seconds=180)
