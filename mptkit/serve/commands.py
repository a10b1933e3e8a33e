"""`mptkit serve MODEL`: the OpenAI-compatible server.

    mptkit serve out/mpt-125m --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "mpt-125m", "prompt": "ALiBi is", "max_tokens": 32}'
    mptkit serve out/mpt-125m --host 0.0.0.0 --api-key "$KEY"    # other machines: with a key only

The decode step is compiled at start-up where that works (a C++ compiler on CPU, Triton on CUDA;
`--no-compile` to skip); /health answers 503 until it is done, and requests sent meanwhile wait.
SIGTERM (or Ctrl-C) stops admitting, lets running requests finish for `--shutdown-timeout`
seconds, cancels the rest and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from mptkit.inference.options import DEFAULT_PREFILL_CHUNK, ModelOptions, add_model_arguments, build_generator
from mptkit.serve.defaults import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
SCHEDULERS = ("continuous", "static")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mptkit serve", description="OpenAI-compatible HTTP server.")
    add_model_arguments(parser)
    parser.add_argument("--no-compile", action="store_true",
                        help="do not compile the decode step at start-up (it is compiled where a compiler exists)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but loopback (127.0.0.1, ::1, localhost) needs --api-key")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    parser.add_argument("--model-name", help="the id reported by /v1/models (default: the directory name)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="requests decoded together (KV-cache slots)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="continuous",
                        help="continuous: per-iteration batching (default); static: one batch at a time (the old one)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                        help="prompt tokens prefilled per decode step")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests waiting for a slot before new ones get 429")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get 413")
    parser.add_argument("--request-timeout", type=float,
                        help="seconds a request may take before it is stopped (504); default: no limit")
    parser.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                        help="seconds running requests get to finish after SIGTERM")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def check_loopback(host: str) -> None:
    """Without an API key the server listens only where other machines cannot reach it."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--host {host}: only loopback addresses (127.0.0.1, ::1, localhost) are served "
                         "without --api-key")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.api_key is None:
        check_loopback(args.host)
    elif not args.api_key.strip():
        raise ValueError("--api-key: must not be empty")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 0..65535")
    for name in ("max_batch_size", "prefill_chunk", "max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise ValueError(f"--request-timeout {args.request_timeout}: expected > 0")
    if args.compile and args.no_compile:
        raise ValueError("--compile and --no-compile contradict each other")


def _build_engine(args: argparse.Namespace):
    from mptkit.inference.batching import compile_unavailable_reason

    from .engine import Engine, StaticEngine

    options = ModelOptions.from_args(args)
    if args.scheduler == "static":  # as it always was: compiled (lazily, per batch shape) only with --compile
        decoder, tokenizer = build_generator(options)
        return StaticEngine(decoder, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    decoder, tokenizer = build_generator(dataclasses.replace(options, compile=False))  # the pool compiles its own
    compile = not args.no_compile
    if compile and (reason := compile_unavailable_reason(decoder.device)) is not None:
        if args.compile:
            raise ValueError(f"--compile: {reason}")
        print(f"mptkit serve: decoding uncompiled: {reason}", file=sys.stderr)
        compile = False
    engine = Engine(decoder, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, compile=compile)
    if compile:
        print(f"mptkit serve: compiling the decode step for one row and for up to {args.max_batch_size} rows "
              f"(2 graphs, any key width); /health is 503 until it is done",
              file=sys.stderr, flush=True)
    return engine


def _report_ready(engine) -> None:
    engine.ready.wait()
    if engine.compiled:
        print(f"mptkit serve: decode step compiled in {engine.warmup_seconds:.1f} s; ready", file=sys.stderr, flush=True)


def main(command: str, argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_arguments(args)
        import uvicorn

        from .app import create_app

        engine = _build_engine(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mptkit {command}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_report_ready, args=(engine,), daemon=True).start()
    app = create_app(engine, args.model_name or Path(args.model).resolve().name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = _http_server(config)
    # The engine computes on this thread, the one that loaded the model, and HTTP gets a thread of
    # its own: driven from a second thread (a second OpenMP team beside this one's, and libgomp's
    # workers stop spinning between parallel regions), the compiled decode step took 1.4-1.5x as
    # long (mpt-125m bf16, 2 cores: 25 ms for one row instead of 17, 88 for 32 rows instead of 56).
    http = threading.Thread(target=_serve_http, args=(server, engine), name="mptkit-http")
    with _graceful_signals(server, engine):
        http.start()
        try:
            engine.run()
        finally:
            server.should_exit = True  # the engine ended (shutdown, or a fault): so does HTTP
    http.join()
    code = 0 if server.started else 1  # uvicorn could not start (the port is taken, say): it said why
    if not engine.ready.is_set():
        # stopped while compiling: the warm-up thread is inside the compiler, and finalizing the
        # interpreter under it aborts the process (std::terminate); nothing has run yet to finish
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _serve_http(server, engine) -> None:
    try:
        server.run()
    finally:
        engine.shutdown()  # ends `engine.run` on the main thread


def _http_server(config):
    """uvicorn's Server, leaving the signals to the main thread (`_graceful_signals`)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(config)


@contextlib.contextmanager
def _graceful_signals(server, engine):
    """SIGTERM/SIGINT: the engine stops admitting requests at once, uvicorn shuts down gracefully
    (running requests finish for --shutdown-timeout seconds), then the engine cancels what is left
    and `main` returns 0."""

    def handle(sig, frame):
        engine.drain()
        server.handle_exit(sig, frame)

    handled = (signal.SIGINT, signal.SIGTERM)
    original = {sig: signal.signal(sig, handle) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)
