"""`mptkit serve MODEL`: the OpenAI-compatible server on a loopback address.

    mptkit serve out/mpt-125m --port 8000 --compile
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "mpt-125m", "prompt": "ALiBi is", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from mptkit.inference.options import ModelOptions, add_model_arguments, build_generator
from mptkit.serve.engine import DEFAULT_MAX_BATCH_SIZE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mptkit serve", description="OpenAI-compatible HTTP server.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (the server has no authentication)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the id reported by /v1/models (default: the directory name)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="requests decoded together")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def check_loopback(host: str) -> None:
    """The server has no authentication: it listens only where other machines cannot reach it."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--host {host}: only loopback addresses (127.0.0.1, ::1, localhost) are served")


def main(command: str, argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        check_loopback(args.host)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port {args.port}: expected 0..65535")
        import uvicorn

        from .app import create_app
        from .engine import Engine

        decoder, tokenizer = build_generator(ModelOptions.from_args(args))
        engine = Engine(decoder, tokenizer, max_batch_size=args.max_batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"mptkit {command}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(engine, args.model_name or Path(args.model).resolve().name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    engine.shutdown()
    return 0
