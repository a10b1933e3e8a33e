"""Tokenizer loading, vocabulary checks and training (mptkit.data.tokenizer)."""

import json
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from mptkit.data.commands import main as data_main
from mptkit.data.templates import CHATML_CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, format_chatml
from mptkit.data.tokenizer import (
    bundled_tokenizer_path,
    check_vocab_fits,
    load_tokenizer,
    padded_vocab_size,
    tokenizer_fingerprint,
    train_tokenizer,
)

FIXTURES = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def neox():
    return load_tokenizer()


def test_bundled_tokenizer_has_mpt_special_tokens(neox):
    # The conventions of MosaicML's MPT tokenizers: <|endoftext|> = 0 is bos/eos/unk, <|padding|> = 1, pad = eos, 50,277 base
    # ids; mpt-7b-chat appended the ChatML markers as 50277 and 50278.
    assert (neox.bos_token_id, neox.eos_token_id, neox.unk_token_id, neox.pad_token_id) == (0, 0, 0, 0)
    assert neox.convert_tokens_to_ids("<|padding|>") == 1
    assert neox.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [50277, 50278]
    assert len(neox) == 50279
    assert neox.padding_side == "left"
    # Known GPT-NeoX-20B ids (shared data notes), through the HF wrapper and the raw file alike.
    assert neox("Hello world", add_special_tokens=False)["input_ids"] == [12092, 1533]
    raw = Tokenizer.from_file(str(bundled_tokenizer_path()))
    text = "ALiBi extrapolates: 84k tokens!"
    assert neox(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    # ChatML markers are single tokens, never split.
    assert neox("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == 50277


def test_hub_name_means_bundled_and_local_forms_load(neox, tmp_path):
    assert tokenizer_fingerprint(load_tokenizer("EleutherAI/gpt-neox-20b")) == tokenizer_fingerprint(neox)
    neox.save_pretrained(tmp_path / "dir")
    from_dir = load_tokenizer(str(tmp_path / "dir"))
    from_json = load_tokenizer(str(tmp_path / "dir" / "tokenizer.json"))
    text = "<|im_start|>assistant\nBonjour, ça va?<|im_end|>"
    expected = neox(text, add_special_tokens=False)["input_ids"]
    for tok in (from_dir, from_json):
        assert tok(text, add_special_tokens=False)["input_ids"] == expected
        assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (0, 0, 50279)
    with pytest.raises(ValueError, match="not a tokenizer.json file"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))


def test_padded_vocab_size():
    assert padded_vocab_size(50277) == 50304  # 393 * 128
    assert padded_vocab_size(50432) == 50432  # MPT-7B's embedding, already a multiple
    assert padded_vocab_size(1) == 128
    assert padded_vocab_size(300, multiple=64) == 320


def test_check_vocab_fits(neox):
    check_vocab_fits(neox, 50432)
    check_vocab_fits(neox, 50279)
    with pytest.raises(ValueError, match=r"50279 tokens but the model's vocab_size is 50277.*50304"):
        check_vocab_fits(neox, 50277)


def test_train_tiny_tokenizer(tmp_path):
    out = tmp_path / "tok"
    corpus = [str(FIXTURES / "corpus"), str(FIXTURES / "docs.jsonl")]
    tok = train_tokenizer(corpus, vocab_size=400, out_dir=out, min_frequency=1, progress=False)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2, 3]
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 0)
    assert 256 + 4 < len(tok) <= 400  # every byte + specials + some merges
    spec = json.loads((out / "tokenizer.json").read_text())
    assert spec["normalizer"]["type"] == "NFC"
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and not spec["pre_tokenizer"]["add_prefix_space"]
    # Byte-level: anything round-trips (up to NFC), including characters never seen in training.
    for text in ("The quick brown fox", "Zoë 🦊 Ω≈ç √ 漢字", "<|im_start|>user\nhi<|im_end|>"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    # A frequent corpus word became a token of its own.
    assert len(tok(" the", add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer_fingerprint(load_tokenizer(str(out))) == tokenizer_fingerprint(tok)
    # The directory on disk carries the chat template too, not only the tokenizer handed back.
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHATML_CHAT_TEMPLATE


def test_tokenizer_cli(tmp_path, capsys):
    out = tmp_path / "cli-tok"
    assert data_main("tokenizer", ["train", str(FIXTURES / "corpus"), "--out", str(out),
                                   "--vocab-size", "300", "--min-frequency", "1"]) == 0
    assert (out / "tokenizer.json").is_file()
    assert data_main("tokenizer", ["info", str(out), "--model-vocab-size", "384"]) == 0
    assert "fits a model with vocab_size 384" in capsys.readouterr().out
    assert data_main("tokenizer", ["info", "--model-vocab-size", "50277"]) == 1
    assert "vocab_size is 50277" in capsys.readouterr().err


# Content with what a careless template would change: edge whitespace (no strip), newlines,
# non-ASCII, Jinja-looking text, and a ChatML marker inside a message.
CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hello world"}],
    "system and user": [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "  Bonjour,\nça va? 🦊  "},
    ],
    "several turns, no system": [
        {"role": "user", "content": "What is ALiBi?"},
        {"role": "assistant", "content": "A linear bias on attention scores.\n\nNo position embeddings."},
        {"role": "user", "content": "{{ not jinja }} and {% raw %}"},
        {"role": "assistant", "content": "Literal text: <|im_end|> inside."},
    ],
    "several turns with system": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "\n3 + 3?\n"},
    ],
}


def _chat_ids(tokenizer, messages, add_generation_prompt):
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(ids)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_format_chatml(neox, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = format_chatml(messages, add_generation_prompt=add_generation_prompt)
    assert neox.chat_template == CHATML_CHAT_TEMPLATE
    assert neox.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False) == text
    # mptkit's own prompt ids (inference and the server tokenize format_chatml's text like this).
    expected = neox(text)["input_ids"]
    assert _chat_ids(neox, messages, add_generation_prompt) == expected
    assert expected.count(neox.convert_tokens_to_ids("<|im_start|>")) == len(messages) + add_generation_prompt


def test_saved_tokenizer_keeps_chat_template_without_mptkit(neox, tmp_path):
    neox.save_pretrained(tmp_path / "tok")
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))  # transformers alone
    assert plain.chat_template == CHATML_CHAT_TEMPLATE
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (True, False):
            text = format_chatml(messages, add_generation_prompt=add_generation_prompt)
            assert plain.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False) == text
            assert _chat_ids(plain, messages, add_generation_prompt) == neox(text)["input_ids"]


def test_own_chat_template_is_kept(neox, tmp_path):
    own = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    neox.save_pretrained(tmp_path / "tok")
    custom = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    custom.chat_template = own
    custom.save_pretrained(tmp_path / "own")
    reloaded = load_tokenizer(str(tmp_path / "own"))
    assert reloaded.chat_template == own
    assert reloaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user: hi\n"
    # A bare tokenizer.json has no template: it gets ChatML.
    assert load_tokenizer(str(tmp_path / "own" / "tokenizer.json")).chat_template == CHATML_CHAT_TEMPLATE
