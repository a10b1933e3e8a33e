"""`mptkit data prepare`: exact token streams, shards, restart, bad input (mptkit.data.prepare)."""

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import mptkit.data.prepare as prepare_module
from mptkit.data.commands import main as data_main
from mptkit.data.errors import DataError
from mptkit.data.prepare import prepare_pretraining
from mptkit.data.sources import _split_text
from mptkit.data.tokenizer import load_tokenizer, plain_backend

FIXTURES = Path(__file__).parent / "data"
REPO_DATA = Path(__file__).parent.parent / "data"


TOKENIZER = load_tokenizer()


@pytest.fixture(scope="module")
def tok():
    return TOKENIZER


def direct_stream(tok, documents):
    """The reference: each document tokenized whole by the HF tokenizer, then EOS."""
    ids = []
    for doc in documents:
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


def read_shards(out: Path) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    arrays = [np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["shards"]]
    return np.concatenate(arrays).reshape(-1, index["seq_len"])


def run(inputs, out, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("tokenizer", TOKENIZER)
    return prepare_pretraining(inputs, out, **kwargs)


def test_text_folder_exact_tokens(tok, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURES / "corpus", corpus)
    gamma = corpus / "nested" / "gamma.txt"
    gz = corpus / "nested" / "gamma.txt.gz"
    gz.write_bytes(gzip.compress(gamma.read_bytes()))
    gamma.unlink()
    index = run([str(corpus)], tmp_path / "out", seq_len=8, samples_per_shard=5)

    # Walk order: sorted paths; ignored.bin is not text; .gz is read transparently.
    names = [Path(s["name"]).name for s in index["sources"]]
    assert names == ["alpha.txt", "beta.md", "gamma.txt.gz"]
    docs = [(FIXTURES / "corpus" / p).read_text(encoding="utf-8") for p in ("alpha.txt", "beta.md", "nested/gamma.txt")]
    expected = direct_stream(tok, docs)
    n = len(expected) // 8
    assert index["tokens_tokenized"] == len(expected)
    assert index["num_samples"] == n and index["dropped_tail_tokens"] == len(expected) - 8 * n
    assert [s["tokens"] for s in index["sources"]] == [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]
    assert [s["num_samples"] for s in index["shards"]] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert index["dtype"] == "<u2" and index["eos_id"] == 0
    assert read_shards(tmp_path / "out").ravel().tolist() == expected[: 8 * n]


def test_long_documents_cut_into_pieces_keep_exact_tokens(tok, tmp_path):
    # Alice (~144K characters) tokenized in ~1K-character pieces must equal whole-book tokenization.
    alice = gzip.decompress((REPO_DATA / "books" / "heldout" / "pg11.txt.gz").read_bytes()).decode("utf-8")
    src = tmp_path / "alice.txt"
    src.write_text(alice, encoding="utf-8")
    index = run([str(src)], tmp_path / "out", seq_len=512, piece_chars=1000, batch_chars=20_000)
    expected = direct_stream(tok, [alice])
    assert index["tokens_tokenized"] == len(expected)
    assert read_shards(tmp_path / "out").ravel().tolist() == expected[: index["num_tokens"]]


def test_cut_points_never_change_tokens_on_adversarial_text(tok):
    # Random mixes of spaces, newlines, tabs, NBSP, combining marks, contractions, emoji and
    # special tokens, cut every ~7 characters: the pieces' tokens must equal the whole text's.
    rng = random.Random(0)
    alphabet = list("ab Z9 \n\t.,;'\"-") + ["  ", "\n\n", " \n", "é", "e\u0301", "🦊", "\u00a0", "\u3000",
                                             "漢", "'s", "'ll", "<|endoftext|>", "<|im_start|>", "    "]
    backend = plain_backend(tok)
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(400))
        pieces, rest = _split_text(text, 7)
        assert len(pieces) >= 5 and "".join(pieces) + rest == text
        cut = [i for e in backend.encode_batch(pieces + [rest], add_special_tokens=False) for i in e.ids]
        assert cut == tok(text, add_special_tokens=False)["input_ids"], text


def test_jsonl_field_and_in_memory_rows(tok, tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "docs.jsonl").read_text().splitlines() if line.strip()]
    index = run([str(FIXTURES / "docs.jsonl")], tmp_path / "a", seq_len=4, text_field="title")
    assert index["tokens_tokenized"] == len(direct_stream(tok, [r["title"] for r in rows]))
    index = run([str(FIXTURES / "docs.jsonl")], tmp_path / "b", seq_len=4)
    expected = direct_stream(tok, [r["text"] for r in rows])
    assert read_shards(tmp_path / "b").ravel().tolist() == expected[: index["num_tokens"]]
    # In-memory rows (what a `datasets.Dataset` iterates as): mappings and plain strings.
    index = run([rows, ["plain string document"]], tmp_path / "c", seq_len=4)
    expected = direct_stream(tok, [r["text"] for r in rows] + ["plain string document"])
    assert read_shards(tmp_path / "c").ravel().tolist() == expected[: index["num_tokens"]]


def test_parquet_column(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = ["parquet row one", "row two, longer: " + "words " * 30, "third ✓"]
    pq.write_table(pa.table({"content": texts, "n": [1, 2, 3]}), tmp_path / "d.parquet", row_group_size=2)
    index = run([str(tmp_path / "d.parquet")], tmp_path / "out", seq_len=4, text_field="content")
    expected = direct_stream(tok, texts)
    assert read_shards(tmp_path / "out").ravel().tolist() == expected[: index["num_tokens"]]
    with pytest.raises(DataError, match=r"d\.parquet: field 'text': expected a column named 'text'"):
        run([str(tmp_path / "d.parquet")], tmp_path / "bad", seq_len=4, on_error="fail")


def make_mixed_corpus(root: Path) -> list:
    root.mkdir()
    books = [gzip.decompress((REPO_DATA / "books" / "heldout" / "pg11.txt.gz").read_bytes()).decode()[:30_000],
             "A short second book.\n" * 50]
    for i, text in enumerate(books):
        (root / f"book{i}.txt").write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": f"json document {i} " + "la " * (i % 17)}) for i in range(200)]
    lines[10] = "{not json"
    lines[150] = json.dumps({"body": "no text field"})
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [str(root / "book0.txt"), str(root / "docs.jsonl"), str(root / "book1.txt")]


def test_restart_after_interrupt_gives_identical_output(tmp_path, monkeypatch):
    inputs = make_mixed_corpus(tmp_path / "corpus")
    settings = dict(seq_len=64, samples_per_shard=7, batch_chars=3000, piece_chars=700)
    reference = run(inputs, tmp_path / "ref", **settings)
    assert len(reference["shards"]) > 6

    real_write_json = prepare_module._write_json
    calls = {"n": 0}

    def crash_after_third_checkpoint(path, data):
        real_write_json(path, data)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_write_json", crash_after_third_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "resumed", **settings)
    monkeypatch.undo()
    out = tmp_path / "resumed"
    assert (out / "progress.json").exists() and not (out / "index.json").exists()
    resumed = run(inputs, out, **settings)
    assert resumed["last_run"]["tokens"] < reference["last_run"]["tokens"]  # it did not start over
    assert not (out / "progress.json").exists()
    for key in ("shards", "num_samples", "tokens_tokenized", "dropped_tail_tokens", "sources", "documents"):
        assert resumed[key] == reference[key], key
    # Both bad JSONL lines are reported once, not again by the resumed run.
    assert resumed["skipped"] == reference["skipped"]
    assert resumed["skipped"]["by_kind"] == {"malformed_json": 1, "missing_field": 1}
    assert np.array_equal(read_shards(out), read_shards(tmp_path / "ref"))


def test_source_stats_count_cut_documents_once_and_add_up_to_the_index(tok, tmp_path):
    # The books are tokenized in ~700-character pieces yet count as one document each, with all
    # their characters; every token tokenized is in a shard or in the dropped tail.
    inputs = make_mixed_corpus(tmp_path / "corpus")
    index = run(inputs, tmp_path / "out", seq_len=64, piece_chars=700)
    book0, jsonl, book1 = (Path(p).read_text(encoding="utf-8") for p in inputs)
    rows = [r["text"] for r in map(json.loads, (line for line in jsonl.splitlines() if line != "{not json"))
            if "text" in r]
    assert [(s["documents"], s["chars"], s["tokens"]) for s in index["sources"]] == [
        (len(docs), sum(map(len, docs)), len(direct_stream(tok, docs))) for docs in ([book0], rows, [book1])]
    assert index["documents"] == sum(s["documents"] for s in index["sources"]) == 200
    assert index["tokens_tokenized"] == sum(s["tokens"] for s in index["sources"])
    assert index["tokens_tokenized"] == index["num_tokens"] + index["dropped_tail_tokens"]


def test_existing_output_same_settings_is_noop_other_settings_refused(tmp_path):
    inputs = [str(FIXTURES / "docs.jsonl")]
    first = run(inputs, tmp_path / "out", seq_len=4)
    assert run(inputs, tmp_path / "out", seq_len=4) == first
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        run(inputs, tmp_path / "out", seq_len=8)
    assert run(inputs, tmp_path / "out", seq_len=8, overwrite=True)["seq_len"] == 8


# ---- bad input ---------------------------------------------------------------------------------
def write_bad_jsonl(path: Path) -> None:
    path.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": "broken\n'  # line 2: malformed
        b'{"other": "no text"}\n'  # line 3: missing field
        b'{"text": 42}\n'  # line 4: wrong type
        b'{"text": "caf\xe9 latin-1"}\n'  # line 5: not UTF-8
        b'["a", "list"]\n'  # line 6: not an object
        b'{"text": "   "}\n'  # line 7: empty text
        b'{"text": "good two"}\n'
    )


@pytest.mark.parametrize("line, kind, message", [
    (2, "malformed_json", r"bad\.jsonl, line 2: expected one JSON object per line, got Unterminated string"),
    (3, "missing_field", r"bad\.jsonl, line 3: field 'text': expected a string"),
    (4, "wrong_type", r"bad\.jsonl, line 4: field 'text': expected a string, got int 42"),
    (5, "not_utf8", r"bad\.jsonl, line 5: expected UTF-8 text, got invalid byte 0xe9"),
    (6, "wrong_type", r"bad\.jsonl, line 6: expected a JSON object, got list"),
    (7, "empty_text", r"bad\.jsonl, line 7: field 'text': expected non-empty text"),
])
def test_bad_jsonl_lines_fail_with_file_line_field(tmp_path, line, kind, message):
    bad = tmp_path / "bad.jsonl"
    write_bad_jsonl(bad)
    lines = bad.read_bytes().split(b"\n")
    # Keep the good first line and the one bad line under test: fail mode names it exactly.
    bad.write_bytes(lines[0] + b"\n" + b"\n" * (line - 2) + lines[line - 1] + b"\n")
    with pytest.raises(DataError, match=message) as caught:
        run([str(bad)], tmp_path / "out", seq_len=2, on_error="fail")
    assert caught.value.kind == kind and caught.value.line == line


def test_bad_jsonl_skip_mode_summarises(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    write_bad_jsonl(bad)
    index = run([str(bad)], tmp_path / "out", seq_len=2)
    assert index["skipped"]["by_kind"] == {"malformed_json": 1, "missing_field": 1, "wrong_type": 2,
                                           "not_utf8": 1, "empty_text": 1}
    assert index["tokens_tokenized"] == len(direct_stream(tok, ["good one", "good two"]))
    assert any("line 5" in e for e in index["skipped"]["examples"])


def test_bad_text_files(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "zero.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes(b"line one\nline two caf\xe9\nline three\n")
    with pytest.raises(DataError, match=r"empty\.txt: expected a file with some text"):
        run([str(tmp_path / "empty.txt"), str(tmp_path / "latin1.txt")], tmp_path / "o1", seq_len=2, on_error="fail")
    with pytest.raises(DataError, match=r"latin1\.txt, line 2: expected UTF-8 text, got invalid byte 0xe9"):
        run([str(tmp_path / "latin1.txt")], tmp_path / "o2", seq_len=2, on_error="fail")
    index = run([str(tmp_path / p) for p in ("empty.txt", "zero.txt", "latin1.txt")], tmp_path / "o3", seq_len=2)
    assert index["skipped"]["by_kind"] == {"empty_file": 2, "not_utf8": 1}
    # The invalid byte is dropped, the rest of the file kept.
    assert index["tokens_tokenized"] == len(direct_stream(tok, ["line one\nline two caf\nline three\n"]))


def test_empty_dataset_and_missing_input_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"expected at least seq_len=16 tokens.*got 0 tokens from 0 documents"):
        run([str(tmp_path / "empty.jsonl")], tmp_path / "o1", seq_len=16)  # even in skip mode
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match=r"short\.txt: expected at least seq_len=2048 tokens"):
        run([str(tmp_path / "short.txt")], tmp_path / "o2")
    with pytest.raises(DataError, match=r"nothing-here: expected an existing file"):
        run([str(tmp_path / "nothing-here")], tmp_path / "o3")


def test_prepare_and_inspect_cli(tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["prepare", str(FIXTURES / "corpus"), str(FIXTURES / "docs.jsonl"), "--out", str(out),
            "--seq-len", "16", "--no-progress"]
    assert data_main("data", args) == 0
    printed = capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert f"{index['num_samples']} samples x 16" in printed and index["documents"] == 6
    assert data_main("data", ["inspect", str(out), "--samples", "1"]) == 0
    assert "--- sample 0" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    write_bad_jsonl(bad)
    assert data_main("data", ["prepare", str(bad), "--out", str(tmp_path / "o"), "--seq-len", "2",
                              "--on-error", "fail", "--no-progress"]) == 1
    assert "bad.jsonl, line 2: expected one JSON object per line" in capsys.readouterr().err
