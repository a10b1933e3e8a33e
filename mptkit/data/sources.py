"""Reading corpora: text files, JSONL, parquet (local or any fsspec URL, optionally compressed) and
in-memory row iterables such as a `datasets.Dataset`.

Readers yield `Segment`s: pieces of document text in input order, each tagged with a position
(source index, record number) that identifies it across runs, which is what makes `prepare`
restartable. Long text files are cut into pieces only at places where the tokenizer's
pre-tokenizer is known to split anyway, so tokenizing the pieces gives exactly the tokens of the
whole document.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mptkit.data.errors import DataError, ErrorPolicy, describe

DEFAULT_TEXT_FIELD = "text"  # the JSONL field / parquet column holding a document

SourceKind = Literal["text", "jsonl", "parquet", "rows"]
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
GLOB_CHARS = "*?["
READ_BLOCK_BYTES = 1 << 22
# A space or newline between two non-space characters starts a new pre-token under the
# GPT-2/GPT-NeoX byte-level regex (no pattern swallows whitespace after a non-space character),
# so a document may be cut just before one without changing its tokens.
_SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


@dataclass(frozen=True)
class Source:
    name: str  # path as given for local files, full URL otherwise, "<rows N>" for iterables
    kind: SourceKind
    size: int | None = None  # bytes on storage
    mtime: str | None = None
    rows: Iterable[Any] | None = None  # only for kind "rows"

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "size": self.size, "mtime": self.mtime}


@dataclass(frozen=True, slots=True)
class Segment:
    position: tuple[int, int]  # (source index, record number): record = line, row or text piece
    text: str
    ends_document: bool


def _kind_of(path: str) -> SourceKind | None:
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _file_source(fs: fsspec.AbstractFileSystem, path: str, kind: SourceKind) -> Source:
    info = fs.info(path)
    mtime = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    name = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    return Source(name=name, kind=kind, size=info.get("size"), mtime=None if mtime is None else str(mtime))


def _directory_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    found = []
    for file in sorted(fs.find(path)):
        base = file.rsplit("/", 1)[-1]
        if not base.startswith(".") and _kind_of(file) is not None:
            found.append(file)
    return found


def resolve_inputs(inputs: Sequence[Any]) -> list[Source]:
    """Expand files, directories (recursively, known suffixes only), globs and URLs into sources in a
    deterministic order. Non-string items are row iterables (strings or mappings)."""
    sources: list[Source] = []
    for item in inputs:
        if not isinstance(item, (str, bytes)) and not hasattr(item, "__fspath__"):
            sources.append(Source(name=f"<rows {len(sources)}>", kind="rows", rows=item))
            continue
        spec = str(item.__fspath__() if hasattr(item, "__fspath__") else item)
        fs, path = fsspec.core.url_to_fs(spec)
        if any(c in path for c in GLOB_CHARS):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = [path]
        elif fs.exists(path):
            sources.append(_file_source(fs, path, _kind_of(path) or "text"))
            continue
        else:
            paths = []
        files = [f for p in paths for f in (_directory_files(fs, p) if fs.isdir(p) else [p])]
        if not files:
            raise DataError("missing_input", spec, "an existing file, or a directory or glob with "
                            f"text ({'/'.join(TEXT_SUFFIXES)}), JSONL or parquet files")
        sources += [_file_source(fs, f, _kind_of(f) or "text") for f in files]
    return sources


def _open(source: Source):
    return fsspec.open(source.name, "rb", compression="infer")


def _split_text(text: str, max_chars: int) -> tuple[list[str], str]:
    """Cut `text` into pieces of about `max_chars` at safe places; return (pieces, remainder)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        match = _SAFE_CUT.search(text, start + max_chars)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    return pieces, text[start:]


def _iter_text(index: int, source: Source, policy: ErrorPolicy, piece_chars: int | None) -> Iterator[Segment]:
    """A text file is one document. Invalid UTF-8 bytes are reported (first place only) and dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending, piece, lines_before, has_content = "", 0, 0, False
    with _open(source) as f:
        while True:
            block = f.read(READ_BLOCK_BYTES)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                bad = block[max(e.start, 0) : max(e.start, 0) + 1]
                policy.handle(DataError(
                    "not_utf8", source.name, "UTF-8 text", line=lines_before + block[: max(e.start, 0)].count(b"\n") + 1,
                    got=f"invalid byte 0x{bad.hex()} (invalid bytes in this file are dropped)",
                ).at((index, piece)))
                decoder = codecs.getincrementaldecoder("utf-8")("ignore")
                text = decoder.decode(block, final=not block)
            lines_before += block.count(b"\n")
            pending += text
            has_content = has_content or (bool(pending) and not pending.isspace())
            if piece_chars is not None and has_content:
                pieces, pending = _split_text(pending, piece_chars)
                for text_piece in pieces:
                    yield Segment((index, piece), text_piece, False)
                    piece += 1
            if not block:
                break
    if has_content and pending:
        yield Segment((index, piece), pending, True)
    elif not has_content:
        policy.handle(DataError("empty_file", source.name, "a file with some text").at((index, 0)))


def iter_jsonl_rows(source: Source, policy: ErrorPolicy, index: int = 0) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad lines go to `policy`."""
    any_row = False
    with _open(source) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            any_row = True
            where = {"line": line_no}
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                policy.handle(DataError("not_utf8", source.name, "UTF-8 text", **where,
                                        got=f"invalid byte 0x{raw[e.start:e.start + 1].hex()} at byte {e.start + 1}").at((index, line_no)))
                continue
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                policy.handle(DataError("malformed_json", source.name, "one JSON object per line", **where,
                                        got=str(e)).at((index, line_no)))
                continue
            if not isinstance(row, dict):
                policy.handle(DataError("wrong_type", source.name, "a JSON object", **where,
                                        got=describe(row)).at((index, line_no)))
                continue
            yield line_no, row
    if not any_row:
        policy.handle(DataError("empty_file", source.name, "at least one JSON line").at((index, 0)))


def _iter_parquet_values(index: int, source: Source, field: str, policy: ErrorPolicy) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(source) as f:
        parquet = pq.ParquetFile(f)
        schema = parquet.schema_arrow
        if field not in schema.names:
            policy.handle(DataError("missing_field", source.name, f"a column named {field!r}", field=field,
                                    got=f"columns {schema.names}").at((index, 0)))
            return
        column_type = schema.field(field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            policy.handle(DataError("wrong_type", source.name, "a string column", field=field,
                                    got=str(column_type)).at((index, 0)))
            return
        if parquet.metadata.num_rows == 0:
            policy.handle(DataError("empty_file", source.name, "at least one row").at((index, 0)))
            return
        row = 0
        for batch in parquet.iter_batches(columns=[field], batch_size=8192):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value


def _check_text(value: Any, index: int, source: Source, record: int, field: str | None,
                policy: ErrorPolicy, unit: str) -> str | None:
    """The document text of one record, or None (after reporting) when it is unusable."""
    where = dict(line=record, field=field, unit=unit)
    if value is None:
        error = DataError("missing_field", source.name, "a string", **where)
    elif not isinstance(value, str):
        error = DataError("wrong_type", source.name, "a string", **where, got=describe(value))
    elif not value.strip():
        error = DataError("empty_text", source.name, "non-empty text", **where)
    else:
        return value
    policy.handle(error.at((index, record)))
    return None


def iter_segments(
    sources: Sequence[Source], text_field: str, policy: ErrorPolicy, piece_chars: int | None = None
) -> Iterator[Segment]:
    """All document text of `sources` in order. `piece_chars` (None: never) cuts long text-file
    documents into pieces; only safe for byte-level BPE tokenizers (see `can_cut_documents`)."""
    for index, source in enumerate(sources):
        if source.kind == "text":
            yield from _iter_text(index, source, policy, piece_chars)
            continue
        if source.kind == "jsonl":
            records = ((line, row.get(text_field)) for line, row in iter_jsonl_rows(source, policy, index))
            unit = "line"
        elif source.kind == "parquet":
            records = _iter_parquet_values(index, source, text_field, policy)
            unit = "row"
        else:
            records = (
                (row, item if isinstance(item, str) else item.get(text_field) if isinstance(item, Mapping) else item)
                for row, item in enumerate(source.rows, 1)
            )
            unit = "row"
        count = 0
        for record, value in records:
            count += 1
            text = _check_text(value, index, source, record, text_field, policy, unit)
            if text is not None:
                yield Segment((index, record), text, True)
        if source.kind == "rows" and count == 0:
            policy.handle(DataError("empty_file", source.name, "at least one row").at((index, 0)))


def iter_texts(sources: Sequence[Source], text_field: str, policy: ErrorPolicy) -> Iterator[str]:
    """Document texts (long text files in pieces), e.g. for tokenizer training."""
    return (s.text for s in iter_segments(sources, text_field, policy, piece_chars=1 << 16))


def read_texts(paths: Sequence[Any], text_field: str = DEFAULT_TEXT_FIELD) -> list[str]:
    """Whole documents from text files (one document each), JSONL (one per line, `text_field`),
    directories or globs of those, e.g. for evaluation. Bad records fail with the file and line."""
    return [segment.text for segment in iter_segments(resolve_inputs([str(p) for p in paths]), text_field,
                                                      ErrorPolicy("fail"))]


def can_cut_documents(tokenizer_json: dict) -> bool:
    """Whether cutting text before a lone space/newline between non-spaces preserves tokens: true
    for byte-level BPE with the GPT-2 regex and an NFC/NFKC (or no) normalizer, and added tokens
    that contain no such space."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    normalizer = tokenizer_json.get("normalizer")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return False
    if normalizer is not None and normalizer.get("type") not in ("NFC", "NFKC"):
        return False
    return not any(
        _SAFE_CUT.search(token["content"]) for token in tokenizer_json.get("added_tokens", [])
    )
