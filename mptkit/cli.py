"""The `mptkit` command: a thin dispatcher.

Each subcommand lives in the package area that owns it and is imported only when used, so
`mptkit --help` and `import mptkit` stay fast. A command module exposes
`main(command: str, argv: list[str]) -> int` and parses its own arguments.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("mptkit.data.commands", "train or inspect a byte-level BPE tokenizer"),
    "data": ("mptkit.data.commands", "tokenize corpora into streaming pretraining shards"),
    "train": ("mptkit.train.commands", "pretrain or fine-tune from a YAML config"),
    "export": ("mptkit.export.commands", "write a training checkpoint (or any model) as an HF-format directory"),
    "generate": ("mptkit.inference.commands", "generate text from a model"),
    "chat": ("mptkit.inference.commands", "multi-turn ChatML chat in the terminal"),
    "serve": ("mptkit.serve.commands", "OpenAI-compatible HTTP server"),
    "eval": ("mptkit.eval.commands", "perplexity, extrapolation and multiple-choice evaluation"),
    "demo": ("mptkit.demo", "the end-to-end demo: pretrain, fine-tune, extrapolate, answer"),
}


def _usage() -> str:
    lines = ["usage: mptkit COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mptkit COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mptkit import __version__

        print(__version__)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"mptkit: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(command, argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
