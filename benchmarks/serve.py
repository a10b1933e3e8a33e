"""Serving under load: `mptkit serve` and vLLM (its CPU build, through mptkit's plugin) on 127.0.0.1,
driven by the same streaming clients with the same request bodies, weights, prompts, lengths and
dtype, in one run; beside them the library's single-stream compiled-decoder rate (measured before
and after the servers; the ratios are against the faster of the two).

A checkpoint of the preset's shape with random weights is written to a temporary directory (the
speed of serving does not depend on what the weights are). Engines (--engines):
- `continuous`: `mptkit serve` (the default engine); `static`: the static batcher it replaced;
- `vllm`: vLLM's OpenAI server as it starts by default on a CPU, which keeps one of the two cores
  for its front end (one compute thread);
- `vllm-2cores`: vLLM computing on both cores (VLLM_CPU_OMP_THREADS_BIND=0-1,
  VLLM_CPU_NUM_OF_RESERVED_CPU=0), as mptkit serve does.
vLLM runs from the environment `make vllm-env` builds (.venv-vllm), with --max-num-seqs equal to
--max-batch-size and compiled (its default; --vllm-eager to skip compilation). For each engine a
server process is started, warmed up (/health says when it is ready), then loaded:
- closed loop at each --concurrency level: N clients each send a request, wait for its last
  token, send the next, for --requests-per-client requests or --seconds, whichever ends first;
- open loop: requests arrive as a Poisson process at --poisson-rate per second, --poisson-requests
  of them (at most --seconds).
Every request streams a prompt of --prompt-tokens token ids and --new-tokens greedy tokens.
Reported per run: requests/s, output tokens/s, time to first token and inter-token latency
(p50, p99), and at the end each engine's throughput and TTFT p99 against mptkit serve's at the same
load. Everything is bounded in requests and time and talks to 127.0.0.1 only; the servers are
stopped at the end. The client runs in this process, so on a small machine it shares the cores
with the server (as a real client on the same host would).

    .venv/bin/python benchmarks/serve.py --engines continuous vllm vllm-2cores --concurrency 1 32   # the peer comparison
    .venv/bin/python benchmarks/serve.py                     # mpt-125m, 1/4/16/32 clients, mptkit's two engines
    .venv/bin/python benchmarks/serve.py --preset tiny --dtype float32 --concurrency 1 2 \\
        --new-tokens 8 --requests-per-client 2 --poisson-requests 4 --engines continuous   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generate import time_mptkit  # noqa: E402

from mptkit.data.tokenizer import load_tokenizer  # noqa: E402
from mptkit.inference.decode import Decoder  # noqa: E402
from mptkit.model import MPTConfig, MPTForCausalLM  # noqa: E402

HOST = "127.0.0.1"  # never anything else


@dataclass
class RequestResult:
    ttft: float  # seconds from sending to the first text
    inter_token: float | None  # mean seconds between tokens after the first
    tokens: int
    ok: bool


@dataclass
class Run:
    engine: str
    mode: str  # "closed-N" or "poisson-R"
    concurrency: int | None
    seconds: float
    requests: int
    failed: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    results: list = field(default_factory=list, repr=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_checkpoint(preset: str, directory: Path) -> MPTForCausalLM:
    config = MPTConfig.from_preset(preset, attn_config={"attn_impl": "sdpa"})
    torch.manual_seed(0)
    model = MPTForCausalLM(config).eval()
    model.save_pretrained(directory, tokenizer=load_tokenizer())
    return model


def single_stream_rate(decoder: Decoder, prompt: list[int], new_tokens: int) -> float:
    """The library's compiled decoder, batch 1: tokens/s (best of two after a warm-up)."""
    time_mptkit(decoder, prompt, new_tokens)
    return new_tokens / min(time_mptkit(decoder, prompt, new_tokens)[0] for _ in range(2))


VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MPTKIT_ENGINES = ("continuous", "static")
VLLM_ENGINES = {"vllm": {}, "vllm-2cores": {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}


def server_command(engine: str, checkpoint: Path, port: int, args: argparse.Namespace) -> tuple[list[str], dict]:
    """The command line and extra environment of one engine's server."""
    if engine in MPTKIT_ENGINES:
        command = [sys.executable, "-m", "mptkit.cli", "serve", str(checkpoint), "--host", HOST,
                   "--port", str(port), "--dtype", args.dtype, "--scheduler", engine,
                   "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024", "--log-level", "warning"]
        if engine == "continuous" and args.no_compile:
            command.append("--no-compile")
        return command, {"PYTHONPATH": str(REPO)}
    if not VLLM_PYTHON.is_file():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make vllm-env` builds vLLM's environment")
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--host", HOST, "--port", str(port), "--dtype", args.dtype, "--served-model-name", "m",
               "--max-num-seqs", str(args.max_batch_size), "--gpu-memory-utilization", str(args.vllm_memory_share),
               "--uvicorn-log-level", "warning"]
    if args.vllm_eager:
        command.append("--enforce-eager")
    return command, VLLM_ENGINES[engine]


class Server:
    """One engine's server as a subprocess on 127.0.0.1, stopped (SIGTERM, then kill) on exit."""

    def __init__(self, checkpoint: Path, args: argparse.Namespace, engine: str, log: Path):
        self.port = _free_port()
        self.base = f"http://{HOST}:{self.port}"
        command, env = server_command(engine, checkpoint, self.port, args)
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                        env={**os.environ, **env})

    def wait_ready(self, timeout: float) -> float:
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.process.poll() is not None:
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace")[-3000:]  # the directory goes with the run
                raise RuntimeError(f"server exited with {self.process.returncode}; the end of its log:\n{tail}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return time.monotonic() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


async def one_request(client: httpx.AsyncClient, base: str, prompt: list[int], new_tokens: int) -> RequestResult:
    body = {"model": "m", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(time.perf_counter() - sent, None, 0, False)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices") and chunk["choices"][0]["text"]:
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError:
        return RequestResult(time.perf_counter() - sent, None, tokens, False)
    if first is None:
        return RequestResult(time.perf_counter() - sent, None, tokens, False)
    inter = (last - first) / (tokens - 1) if tokens > 1 else None
    return RequestResult(first - sent, inter, tokens, True)


def summarize(engine: str, mode: str, concurrency, seconds: float, results: list[RequestResult]) -> Run:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok] or [float("nan")]
    itl = [r.inter_token for r in ok if r.inter_token is not None] or [float("nan")]
    return Run(engine, mode, concurrency, seconds, len(ok), len(results) - len(ok), len(ok) / seconds,
               sum(r.tokens for r in ok) / seconds, float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99)),
               float(np.percentile(itl, 50)), float(np.percentile(itl, 99)), results)


async def closed_loop(base: str, clients: int, args, prompt: list[int]) -> tuple[float, list[RequestResult]]:
    stop_at = time.perf_counter() + args.seconds
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:

        async def worker():
            for _ in range(args.requests_per_client):
                if time.perf_counter() >= stop_at:
                    return
                results.append(await one_request(client, base, prompt, args.new_tokens))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - began, results


async def open_loop(base: str, args, prompt: list[int]) -> tuple[float, list[RequestResult]]:
    rng = random.Random(0)
    stop_at = time.perf_counter() + args.seconds
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=httpx.Limits(max_connections=256)) as client:
        tasks = []
        began = time.perf_counter()
        for _ in range(args.poisson_requests):
            if time.perf_counter() >= stop_at:
                break
            tasks.append(asyncio.create_task(one_request(client, base, prompt, args.new_tokens)))
            await asyncio.sleep(rng.expovariate(args.poisson_rate))
        results = list(await asyncio.gather(*tasks))
        return time.perf_counter() - began, results


def measure(engine: str, checkpoint: Path, args, prompt: list[int], log_dir: Path) -> list[Run]:
    server = Server(checkpoint, args, engine, log_dir / f"server-{engine}.log")
    try:
        ready = server.wait_ready(args.ready_timeout)
        print(f"\n{engine}: ready after {ready:.1f} s (start-up, loading, compiling)", flush=True)
        asyncio.run(one_request(httpx.AsyncClient(timeout=args.request_timeout), server.base, prompt, 4))  # warm
        runs = []
        for clients in args.concurrency:
            seconds, results = asyncio.run(closed_loop(server.base, clients, args, prompt))
            runs.append(summarize(engine, f"closed-{clients}", clients, seconds, results))
            print(_row(runs[-1]), flush=True)
        if args.poisson_requests:
            seconds, results = asyncio.run(open_loop(server.base, args, prompt))
            runs.append(summarize(engine, f"poisson-{args.poisson_rate:g}/s", None, seconds, results))
            print(_row(runs[-1]), flush=True)
        return runs
    finally:
        server.stop()


HEADER = (f"{'engine':<12}{'load':<16}{'requests':>9}{'failed':>7}{'req/s':>8}{'out tok/s':>11}"
          f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}")


def _row(run: Run) -> str:
    return (f"{run.engine:<12}{run.mode:<16}{run.requests:>9}{run.failed:>7}{run.requests_per_s:>8.2f}"
            f"{run.output_tokens_per_s:>11.1f}{run.ttft_p50:>9.3f}s{run.ttft_p99:>9.3f}s"
            f"{run.itl_p50 * 1e3:>7.1f}ms{run.itl_p99 * 1e3:>7.1f}ms")


def print_peer_ratios(runs: list[Run]) -> None:
    """Each other engine against mptkit serve (`continuous`) at the same load: throughput and TTFT p99."""
    ours = {run.mode: run for run in runs if run.engine == "continuous"}
    others = [run for run in runs if run.engine != "continuous" and run.mode in ours]
    if others:
        print(f"\n{'peer':<16}{'load':<16}{'mptkit/peer tokens/s':>22}{'mptkit/peer TTFT p99':>22}")
    for run in others:
        print(f"{run.engine:<16}{run.mode:<16}{ours[run.mode].output_tokens_per_s / run.output_tokens_per_s:>21.2f}x"
              f"{ours[run.mode].ttft_p99 / run.ttft_p99:>21.2f}x")


def plot(runs: list[Run], single_stream: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for engine in dict.fromkeys(r.engine for r in runs):
        closed = [r for r in runs if r.engine == engine and r.concurrency is not None]
        levels = [r.concurrency for r in closed]
        throughput.plot(levels, [r.output_tokens_per_s for r in closed], marker="o", label=engine)
        latency.plot(levels, [r.ttft_p99 for r in closed], marker="o", label=f"{engine} TTFT p99")
        latency.plot(levels, [r.itl_p99 for r in closed], marker="x", linestyle="--", label=f"{engine} ITL p99")
    throughput.axhline(single_stream, color="grey", linestyle=":", label="library, one stream (compiled)")
    throughput.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s", title="Throughput")
    latency.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="Latency")
    levels = sorted({r.concurrency for r in runs if r.concurrency is not None})
    for axes in (throughput, latency):
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.minorticks_off()
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mpt-125m")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--engines", nargs="+", default=["continuous", "static"],
                        choices=(*MPTKIT_ENGINES, *VLLM_ENGINES))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--max-batch-size", type=int, default=32, help="slots (continuous) / batch size (static)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=180.0, help="time bound of each load run")
    parser.add_argument("--poisson-rate", type=float, default=2.0, help="open-loop arrivals per second")
    parser.add_argument("--poisson-requests", type=int, default=64, help="open-loop requests (0: no open loop)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for a server to be ready")
    parser.add_argument("--no-compile", action="store_true", help="serve the continuous engine uncompiled")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM with --enforce-eager (no compilation)")
    parser.add_argument("--vllm-memory-share", type=float, default=0.1,
                        help="vLLM's --gpu-memory-utilization: on a CPU, the share of RAM for its KV cache")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "serve_concurrency",
                        help="writes OUT.json and OUT.png")
    args = parser.parse_args()
    for name in ("requests_per_client", "seconds", "poisson_rate", "request_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected > 0")

    print(f"{args.preset} {args.dtype}; {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, --max-batch-size {args.max_batch_size}")
    with tempfile.TemporaryDirectory(prefix="mptkit-serve-bench-") as tmp:
        checkpoint = Path(tmp) / args.preset
        model = write_checkpoint(args.preset, checkpoint)
        prompt = torch.randint(2, model.config.vocab_size, (args.prompt_tokens,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        decoder = Decoder(model.to(getattr(torch, args.dtype)), compile=True)
        before = single_stream_rate(decoder, prompt, args.new_tokens)
        print(f"library single stream (compiled Decoder, batch 1): {before:.1f} tokens/s")
        print(HEADER, flush=True)
        runs = [run for engine in args.engines for run in measure(engine, checkpoint, args, prompt, Path(tmp))]
        # A small machine's speed drifts over minutes: the single stream is measured again after the
        # servers, and the ratios are taken against the faster of the two (the stricter comparison).
        after = single_stream_rate(decoder, prompt, args.new_tokens)
        single = max(before, after)
        print(f"\nlibrary single stream again, after the servers: {after:.1f} tokens/s (before: {before:.1f}); "
              f"ratios against {single:.1f}")

    print(f"\n{HEADER}")
    for run in runs:
        print(f"{_row(run)}   {run.output_tokens_per_s / single:5.1f}x one stream")
    print_peer_ratios(runs)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"preset": args.preset, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "max_batch_size": args.max_batch_size,
               "single_stream_tokens_per_s": single, "single_stream_before_after": [before, after],
               "runs": [{k: v for k, v in asdict(run).items() if k != "results"} for run in runs]}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(runs, single, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
