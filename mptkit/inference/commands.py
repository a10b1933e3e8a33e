"""`mptkit generate` and `mptkit chat`.

    mptkit generate MODEL --prompt "Tell me about ALiBi" --template instruct --temperature 0.7
    mptkit generate MODEL --prompts-file prompts.jsonl --batch-size 8 > completions.jsonl
    mptkit chat MODEL --system "You are terse."
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mptkit.data.templates import DEFAULT_SYSTEM_PROMPT
from mptkit.inference.options import ModelOptions, SamplingParams, add_model_arguments, build_generator
from mptkit.inference.prompts import (
    DEFAULT_TEMPLATE,
    TEMPLATES,
    apply_template,
    chat_prompt_ids,
    stop_token_ids,
    template_for,
)

GENERATE_MAX_NEW_TOKENS = 256
CHAT_MAX_NEW_TOKENS = 512  # room for a long answer; never more than half the window (see _run_chat)
PROMPT_BATCH_SIZE = 8

# ---- sampling arguments ------------------------------------------------------------------------


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    defaults = SamplingParams()
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1 = off")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, help="seed for sampling (reproducible text)")


def sampling_params(args: argparse.Namespace):
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )


# ---- generate ----------------------------------------------------------------------------------


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mptkit generate", description="Generate text from a model.")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; its text streams to stdout as it is generated")
    source.add_argument("--prompts-file", type=Path,
                        help="many prompts, run in batches: .jsonl lines with a \"prompt\" field, or one "
                             "prompt per line; prints one JSON line per prompt")
    parser.add_argument("--template", choices=(DEFAULT_TEMPLATE, *TEMPLATES), default=DEFAULT_TEMPLATE,
                        help="instruct: the mpt-7b-instruct template; chat: ChatML with a system turn; none: the "
                             "text as given; auto (default): instruct or chat when the model's name says so "
                             "(mosaicml/mpt-7b-instruct, -chat), else none")
    parser.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt for --template chat")
    parser.add_argument("--batch-size", type=int, default=PROMPT_BATCH_SIZE, help="prompts per batch for --prompts-file")
    add_sampling_arguments(parser, max_new_tokens=GENERATE_MAX_NEW_TOKENS)
    return parser


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or a text file (one per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string field \"prompt\"")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def _run_generate(args: argparse.Namespace) -> int:
    from mptkit.inference.text import GenerationRequest, stream_batch

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {args.batch_size}")
    params = sampling_params(args)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
    decoder, tokenizer = build_generator(ModelOptions.from_args(args))
    template = template_for(args.model) if args.template == DEFAULT_TEMPLATE else args.template
    if args.template == DEFAULT_TEMPLATE and template != "none":
        print(f"[mptkit generate] --template {template} (from the model's name; --template none turns it off)",
              file=sys.stderr)
    stops = stop_token_ids(tokenizer, template)
    texts = [apply_template(template, p, args.system) for p in prompts]
    requests = [GenerationRequest(tokenizer(t)["input_ids"], params, stops) for t in texts]
    for request in requests:
        if len(request.prompt_ids) >= decoder.context_length:
            raise ValueError(
                f"a prompt of {len(request.prompt_ids)} tokens leaves no room in the model's context of "
                f"{decoder.context_length} tokens (raise it with --max-seq-len for an ALiBi model)"
            )

    started, produced = time.perf_counter(), 0
    if args.prompt is not None:  # stream to the terminal
        for updates in stream_batch(decoder, tokenizer, requests):
            for update in updates:
                sys.stdout.write(update.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        produced = None
    else:
        for first in range(0, len(requests), args.batch_size):
            batch = requests[first : first + args.batch_size]
            pieces = [[] for _ in batch]
            finish = [None] * len(batch)
            for updates in stream_batch(decoder, tokenizer, batch):
                for update in updates:
                    pieces[update.row].append(update.text)
                    finish[update.row] = update.finish_reason or finish[update.row]
            for row, request in enumerate(batch):
                record = {"index": first + row, "prompt": prompts[first + row], "completion": "".join(pieces[row]),
                          "finish_reason": finish[row], "prompt_tokens": len(request.prompt_ids)}
                print(json.dumps(record, ensure_ascii=False), flush=True)
        produced = len(requests)
    elapsed = time.perf_counter() - started
    if produced:
        print(f"[{produced} prompts in {elapsed:.1f}s]", file=sys.stderr)
    return 0


# ---- chat --------------------------------------------------------------------------------------


def _chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptkit chat",
        description="Multi-turn ChatML chat. Type a message and press Enter; /reset clears the history, "
                    "/exit (or end of input) quits.",
    )
    add_model_arguments(parser)
    parser.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt ('' for none)")
    add_sampling_arguments(parser, max_new_tokens=CHAT_MAX_NEW_TOKENS)
    return parser


def _run_chat(args: argparse.Namespace) -> int:
    from mptkit.inference.text import GenerationRequest, stream_batch

    params = sampling_params(args)
    decoder, tokenizer = build_generator(ModelOptions.from_args(args))
    stops = stop_token_ids(tokenizer, "chat")
    context = decoder.context_length
    # room kept for the answer: up to max_new_tokens, but never more than half the window
    reply_room = min(params.max_new_tokens, context // 2)
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    while True:
        if interactive:
            print("\nuser> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if message.strip() in ("/exit", "/quit"):
            break
        if message.strip() == "/reset":
            history.clear()
            print("[history cleared]", flush=True)
            continue
        if not message.strip():
            continue
        prompt_ids = chat_prompt_ids(tokenizer, args.system, history, message, context - reply_room)
        if prompt_ids is None:
            print(f"[message too long for the context window of {context} tokens]", flush=True)
            continue
        if interactive:
            print("assistant> ", end="", flush=True)
        request = GenerationRequest(prompt_ids, params, stops)
        reply = []
        for updates in stream_batch(decoder, tokenizer, [request]):
            for update in updates:
                reply.append(update.text)
                sys.stdout.write(update.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": "".join(reply)}]
    return 0


def main(command: str, argv: list[str]) -> int:
    if command == "generate":
        args = _generate_parser().parse_args(argv)
        runner = _run_generate
    elif command == "chat":
        args = _chat_parser().parse_args(argv)
        runner = _run_chat
    else:
        raise ValueError(f"mptkit.inference.commands: unknown command {command!r}")
    try:
        return runner(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mptkit {command}: error: {e}", file=sys.stderr)
        return 2
