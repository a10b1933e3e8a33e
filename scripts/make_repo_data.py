"""Rebuild the small data shipped under data/ from the copies in ../shared/data (see data/SOURCES.md).

    .venv/bin/python scripts/make_repo_data.py [--shared ../shared/data] [--out data]

books/train, books/heldout: Project Gutenberg novels, gzip-compressed UTF-8. The Project Gutenberg
  header and license are cut off where the copy still has them (text between the "*** START OF" and
  "*** END OF" lines is kept). The Great Gatsby (pg64317) and Alice (pg11) are held out for
  evaluation; War and Peace (pg2600) and Ulysses (pg4300) are left out to keep the repo small.
instruct/: HH-RLHF helpful-base test dialogs (the "chosen" side) as dolly-style rows
  {"instruction", "context", "response", "category"}: first Human turn -> instruction, first
  Assistant turn -> response.
chat/: the same dialogs as {"messages": [...]} with MPT-7B-chat's system message first.
Dialogs `hh_to_messages` rejects (turns not alternating, empty turns) are skipped and counted.
The last EVAL_DIALOGS dialogs form the eval split of both.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mptkit.data.errors import DataError  # noqa: E402
from mptkit.data.finetune import DEFAULT_SYSTEM_PROMPT, hh_to_messages  # noqa: E402

HELDOUT_BOOKS = ("pg64317", "pg11")
LEFT_OUT_BOOKS = ("pg2600", "pg4300")
EVAL_DIALOGS = 100
HH_FILE = "hh-rlhf/helpful-base/test.jsonl.gz"
CATEGORY = "hh-rlhf-helpful-base"


def strip_gutenberg_boilerplate(text: str) -> str:
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("*** START OF")), None)
    end = next((i for i, line in enumerate(lines) if line.strip().startswith("*** END OF")), None)
    if start is None or end is None:
        return text
    return "\n".join(lines[start + 1 : end]).strip("\n") + "\n"


def write_gzip(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 and no file name in the header: the same input gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(data)


def write_jsonl(path: Path, rows: list[dict], compress: bool) -> None:
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if compress:
        write_gzip(path, data)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    args = parser.parse_args()

    for book in sorted((args.shared / "gutenberg").glob("pg*.txt")):
        if book.stem in LEFT_OUT_BOOKS:
            continue
        split = "heldout" if book.stem in HELDOUT_BOOKS else "train"
        text = strip_gutenberg_boilerplate(book.read_text(encoding="utf-8"))
        write_gzip(args.out / "books" / split / f"{book.stem}.txt.gz", text.encode("utf-8"))
        print(f"books/{split}/{book.stem}.txt.gz: {len(text)} characters")

    dialogs, rejected = [], 0
    with gzip.open(args.shared / HH_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                dialogs.append(hh_to_messages(json.loads(line)["chosen"]))
            except DataError:
                rejected += 1
    instruct = [{"instruction": d[0]["content"], "context": "", "response": d[1]["content"], "category": CATEGORY}
                for d in dialogs]
    chat = [{"messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + d} for d in dialogs]
    for name, rows, folder, compress in (("instruct", instruct, "instruct", False), ("chat", chat, "chat", True)):
        suffix = ".jsonl.gz" if compress else ".jsonl"
        for split, part in (("train", rows[:-EVAL_DIALOGS]), ("eval", rows[-EVAL_DIALOGS:])):
            path = args.out / folder / f"hh-helpful-base-{split}{suffix}"
            write_jsonl(path, part, compress)
            print(f"{folder}/{path.name}: {len(part)} rows, {path.stat().st_size} bytes")
    print(f"{len(dialogs)} dialogs converted, {rejected} rejected by hh_to_messages")


if __name__ == "__main__":
    main()
