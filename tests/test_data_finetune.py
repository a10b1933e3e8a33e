"""Fine-tuning formats, label masking, packing and bad rows (mptkit.data.finetune)."""

import gzip
import json
import re
from pathlib import Path

import pytest
import torch

from mptkit.data import templates
from mptkit.data.commands import main as data_main
from mptkit.data.errors import DataError
from mptkit.data.finetune import (
    DEFAULT_SYSTEM_PROMPT,
    INSTRUCT_TEMPLATE,
    FinetuneDataset,
    collate_finetune,
    dolly_to_prompt_response,
    format_chatml,
    format_instruct,
    hh_to_messages,
)
from mptkit.data.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "data"
REPO_DATA = Path(__file__).parent.parent / "data"
TOKENIZER = load_tokenizer()
IM_START, IM_END, EOS = 50277, 50278, 0


def encode(text):
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def expected_from_pieces(pieces):
    """Hand-built reference: tokenize each (text, trained) piece on its own and concatenate. Valid
    only where the pieces meet at token boundaries, which the caller checks."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = encode(text) if isinstance(text, str) else text
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_templates_are_mpts_exactly():
    assert INSTRUCT_TEMPLATE == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    assert format_instruct("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert format_instruct("Summarize.", "Some text.").endswith(
        "### Instruction:\nSummarize.\n\nInput:\nSome text.\n\n### Response:\n")
    assert format_instruct("Say hi.", "  ") == format_instruct("Say hi.")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    assert format_chatml(messages) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n" \
                                      "<|im_start|>assistant\nA<|im_end|>\n"
    assert format_chatml(messages[:2], add_generation_prompt=True) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert DEFAULT_SYSTEM_PROMPT == ("A conversation between a user and an LLM-based AI assistant. "
                                     "The assistant gives helpful and honest answers.")
    # The same strings come from the dependency-free module inference imports.
    assert templates.format_chatml is format_chatml and templates.INSTRUCT_TEMPLATE is INSTRUCT_TEMPLATE


def test_converters():
    row = {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}
    assert dolly_to_prompt_response(row) == {"prompt": format_instruct("Name a colour."), "response": "Blue."}
    with pytest.raises(DataError, match="field 'response': expected a string"):
        dolly_to_prompt_response({"instruction": "x"})
    text = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: A joke?\n\nAssistant: Knock knock."
    assert hh_to_messages(text) == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "A joke?"}, {"role": "assistant", "content": "Knock knock."}]
    assert hh_to_messages(text, system="Be kind.")[0] == {"role": "system", "content": "Be kind."}
    for bad in ("\n\nHuman: only a question", "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
                "preamble\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant:  "):
        with pytest.raises(DataError, match="alternating"):
            hh_to_messages(bad)


def test_prompt_response_labels_against_hand_built(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "instruct.jsonl").read_text().splitlines()]
    ds = FinetuneDataset(str(FIXTURES / "instruct.jsonl"), TOKENIZER, 512)
    assert len(ds) == 3 and ds.report.examples == 3
    prompts = [format_instruct(rows[0]["instruction"]), format_instruct(rows[1]["instruction"], rows[1]["context"]),
               rows[2]["prompt"]]
    for item, prompt, row in zip((ds[i] for i in range(3)), prompts, rows):
        ids, labels = expected_from_pieces([(prompt, False), (row["response"], True), ([EOS], True)])
        assert encode(prompt + row["response"]) + [EOS] == ids  # pieces meet at a token boundary
        assert item["input_ids"].tolist() == ids
        assert item["labels"].tolist() == labels
        assert item["sequence_id"].tolist() == [0] * len(ids)
    # train_on_prompt: every token is trained.
    item = FinetuneDataset(str(FIXTURES / "instruct.jsonl"), TOKENIZER, 512, train_on_prompt=True)[0]
    assert item["labels"].tolist() == item["input_ids"].tolist()


def chat_pieces(messages, train_on):
    """(text, trained) pieces of a rendered chat: assistant content + <|im_end|> are responses."""
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained_turns = assistant_turns if train_on == "all" else assistant_turns[-1:]
    pieces, prompt = [], ""
    for i, m in enumerate(messages):
        prompt += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            pieces += [(prompt, False), (m["content"] + "<|im_end|>", i in trained_turns)]
            prompt = "\n"
        else:
            prompt += m["content"] + "<|im_end|>\n"
    return pieces + [(prompt, False)]


@pytest.mark.parametrize("train_on", ["last", "all"])
def test_chat_labels_against_hand_built(train_on):
    rows = [json.loads(line) for line in (FIXTURES / "chat.jsonl").read_text().splitlines()]
    ds = FinetuneDataset(str(FIXTURES / "chat.jsonl"), TOKENIZER, 512, train_on=train_on)
    for i, row in enumerate(rows):
        ids, labels = expected_from_pieces(chat_pieces(row["messages"], train_on))
        assert encode(format_chatml(row["messages"])) == ids
        assert ds[i]["input_ids"].tolist() == ids
        assert ds[i]["labels"].tolist() == labels
    # Fixture row 0 has two assistant turns: "last" trains on "4." only, "all" on both.
    trained = [t for t in ds[0]["labels"].tolist() if t != -100]
    assert TOKENIZER.decode(trained) == ("4.<|im_end|>" if train_on == "last" else "Hello.<|im_end|>4.<|im_end|>")


def test_packing_sequence_id_and_boundaries():
    plain = FinetuneDataset([str(FIXTURES / "instruct.jsonl"), str(FIXTURES / "chat.jsonl")], TOKENIZER, 160)
    packed = FinetuneDataset([str(FIXTURES / "instruct.jsonl"), str(FIXTURES / "chat.jsonl")], TOKENIZER, 160,
                             packing=True)
    examples = {tuple(plain[i]["input_ids"].tolist()): plain[i]["labels"].tolist() for i in range(len(plain))}
    assert len(examples) == 5 and len(packed) < len(plain)
    seen = []
    for j in range(len(packed)):
        item = packed[j]
        tokens, labels, seq = item["input_ids"].tolist(), item["labels"].tolist(), item["sequence_id"].tolist()
        assert len(tokens) <= 160
        assert seq == sorted(seq) and seq[0] == 0 and set(seq) == set(range(seq[-1] + 1))
        for k in range(seq[-1] + 1):
            span = [p for p, s in enumerate(seq) if s == k]
            part = tuple(tokens[span[0] : span[-1] + 1])
            assert part in examples
            expected = examples[part]
            if k > 0:  # the first token is never predicted from the previous example
                expected = [-100] + expected[1:]
            assert labels[span[0] : span[-1] + 1] == expected
            seen.append(part)
    assert sorted(seen) == sorted(examples)  # every example exactly once


def test_collate_right_pads():
    ds = FinetuneDataset(str(FIXTURES / "instruct.jsonl"), TOKENIZER, 512)
    batch = collate_finetune([ds[0], ds[2]], pad_id=TOKENIZER.pad_token_id)
    n0, n2 = len(ds[0]["input_ids"]), len(ds[2]["input_ids"])
    length = max(n0, n2)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, length)
    short = 0 if n0 < n2 else 1
    n = min(n0, n2)
    assert batch["input_ids"][short, n:].tolist() == [0] * (length - n)
    assert batch["labels"][short, n:].tolist() == [-100] * (length - n)
    assert batch["attention_mask"].tolist()[short] == [1] * n + [0] * (length - n)
    assert batch["sequence_id"][short, n:].tolist() == [-1] * (length - n)
    assert all(t.dtype == torch.long for t in batch.values())


def test_too_long_examples_are_dropped_or_cut_at_turns_never_mid_response(tmp_path):
    long_answer = "word " * 200
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "Q: ", "response": long_answer},
        {"prompt": "Q: ", "response": "short"},
        {"messages": [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "one"},
                      {"role": "user", "content": "second?"}, {"role": "assistant", "content": long_answer}]},
    ])
    ds = FinetuneDataset(path, TOKENIZER, 64)
    assert ds.report.examples == 2 and ds.report.skipped == {"too_long": 1}
    assert ds.report.truncated == [f"{path}, line 3"] and ds.report.turns_dropped == 1
    assert "1 chats cut after their last assistant turn" in ds.report.summary()
    chat = ds[1]
    trained = [t for t in chat["labels"].tolist() if t != -100]
    assert TOKENIZER.decode(trained) == "one<|im_end|>"  # the kept response is whole
    assert TOKENIZER.decode(chat["input_ids"].tolist()).endswith("<|im_start|>assistant\none<|im_end|>\n")
    with pytest.raises(DataError, match=r"long\.jsonl, line 1: field 'response': expected at most "
                                        r"max_seq_len=64 tokens, got 20\d tokens"):
        FinetuneDataset(path, TOKENIZER, 64, on_error="fail")


BAD_ROWS = [
    ("{not json", "malformed_json", r"line 1: expected one JSON object per line"),
    ({"prompt": "p"}, "missing_field", r"line 2: field 'response': expected a string"),
    ({"instruction": 3, "response": "r"}, "wrong_type", r"line 3: field 'instruction': expected a string, got int 3"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "bad_role",
     r"line 4: field 'messages\[0\].role': expected one of \('system', 'user', 'assistant'\)"),
    ({"messages": [{"role": "user", "content": "x"}]}, "bad_role",
     r"line 5: field 'messages\[0\].role': expected a conversation that ends with an assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "missing_field",
     r"line 6: field 'messages\[1\].content': expected a string"),
    ({"messages": "hello"}, "wrong_type", r"line 7: field 'messages': expected a non-empty list of messages"),
    ({"prompt": "p", "response": " "}, "empty_text", r"line 8: field 'response': expected non-empty text"),
    ({"title": "neither"}, "missing_field", r"line 9: field 'messages': expected 'messages', or 'prompt' and"),
]


def test_bad_rows_skip_with_summary_or_fail_naming_file_line_field(tmp_path):
    rows = [r for r, _, _ in BAD_ROWS] + [{"prompt": "Q: ", "response": "fine"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b'{"prompt": "caf\xe9", "response": "x"}\n')  # line 11: not UTF-8
    ds = FinetuneDataset(path, TOKENIZER, 128)
    assert len(ds) == 1 and ds.report.rows == 9  # 9 JSON objects parsed, 1 usable
    expected_kinds = {}
    for _, kind, _ in BAD_ROWS:
        expected_kinds[kind] = expected_kinds.get(kind, 0) + 1
    expected_kinds["not_utf8"] = 1
    assert ds.report.skipped == expected_kinds
    messages = [str(e) for e in ds.policy.skipped]
    for (_, _, pattern), message in zip(BAD_ROWS, messages):
        assert re.search(re.escape(path) + ", " + pattern, message), message
    assert messages[-1].startswith(f"{path}, line 11: expected UTF-8 text")
    summary = ds.policy.summary()
    assert "skipped 10 record(s)" in summary and "missing_field: 3" in summary
    # Fail mode stops at the first problem, with the same message.
    with pytest.raises(DataError, match=re.escape(path) + r", line 1: expected one JSON object"):
        FinetuneDataset(path, TOKENIZER, 128, on_error="fail")


def test_empty_inputs_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"(?s)empty\.jsonl: expected at least one usable example.*empty_file: 1"):
        FinetuneDataset(str(tmp_path / "empty.jsonl"), TOKENIZER, 64)
    with pytest.raises(DataError, match=r"notes\.txt: expected a JSONL file"):
        (tmp_path / "notes.txt").write_text("hello")
        FinetuneDataset([str(tmp_path / "notes.txt")], TOKENIZER, 64, on_error="fail")


def test_repo_instruct_and_chat_data_load_cleanly():
    instruct = FinetuneDataset(str(REPO_DATA / "instruct" / "hh-helpful-base-eval.jsonl"), TOKENIZER, 2048)
    chat = FinetuneDataset(str(REPO_DATA / "chat" / "hh-helpful-base-eval.jsonl.gz"), TOKENIZER, 2048)
    assert instruct.report.examples == chat.report.examples == 100
    assert not instruct.report.skipped and not chat.report.skipped
    assert TOKENIZER.decode(instruct[0]["input_ids"].tolist()).startswith(INSTRUCT_TEMPLATE.split("{")[0])
    assert TOKENIZER.decode(chat[0]["input_ids"].tolist()).startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}")
    # The instruct rows are the first turns of the chat rows.
    first_chat = json.loads(gzip.open(REPO_DATA / "chat" / "hh-helpful-base-eval.jsonl.gz", "rt").readline())
    first_instruct = json.loads((REPO_DATA / "instruct" / "hh-helpful-base-eval.jsonl").open().readline())
    assert first_instruct["instruction"] == first_chat["messages"][1]["content"]
    assert first_instruct["response"] == first_chat["messages"][2]["content"]


def test_repo_data_is_documented_and_small():
    sources = (REPO_DATA / "SOURCES.md").read_text()
    files = [p for p in REPO_DATA.rglob("*") if p.is_file() and p.name != "SOURCES.md"]
    for path in files:
        assert f"| `{path.relative_to(REPO_DATA)}` | {path.stat().st_size} |" in sources, path
    assert sum(p.stat().st_size for p in files) < 6_500_000
    assert sorted(p.name for p in (REPO_DATA / "books" / "heldout").iterdir()) == ["pg11.txt.gz", "pg64317.txt.gz"]
    assert not {"pg11.txt.gz", "pg64317.txt.gz"} & {p.name for p in (REPO_DATA / "books" / "train").iterdir()}


def test_inspect_cli_shows_trained_parts(capsys):
    assert data_main("data", ["inspect", str(FIXTURES / "chat.jsonl"), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 examples from 2 rows" in out
    assert "[[4.<|im_end|>]]" in out
