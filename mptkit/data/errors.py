"""Bad-input reporting shared by every reader in mptkit.data.

Each problem becomes a `DataError` that names where it is (file, line or row, field) and what was
expected. An `ErrorPolicy` either raises it (`on_error="fail"`) or records it and lets the caller
skip the record (`on_error="skip"`); the recorded problems are summarised at the end so nothing
disappears silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger("mptkit.data")

OnError = Literal["skip", "fail"]
ON_ERROR_CHOICES = ("skip", "fail")
DEFAULT_ON_ERROR = "skip"


class DataError(ValueError):
    """A problem in the input data at a known place.

    kind: short category used for the summary ("malformed_json", "missing_field", "wrong_type",
    "empty_file", "not_utf8", "too_long", "empty_dataset", ...).
    line: 1-based line (text, JSONL) or row (parquet, in-memory rows; see `unit`).
    """

    def __init__(
        self,
        kind: str,
        file: str | None,
        expected: str,
        *,
        line: int | None = None,
        field: str | None = None,
        got: str | None = None,
        unit: str = "line",
    ) -> None:
        self.kind, self.file, self.line, self.field = kind, file, line, field
        self.expected, self.got, self.unit = expected, got, unit
        # (source index, record number) in a multi-source read; lets a resumed run skip
        # problems it already reported.
        self.position: tuple[int, int] | None = None
        super().__init__(self._message())

    def at(self, position: tuple[int, int]) -> DataError:
        self.position = position
        return self

    def to_dict(self) -> dict:
        keys = ("kind", "file", "expected", "line", "field", "got", "unit", "position")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_dict(cls, d: dict) -> DataError:
        error = cls(d["kind"], d["file"], d["expected"], line=d["line"], field=d["field"],
                    got=d["got"], unit=d["unit"])
        return error.at(tuple(d["position"])) if d.get("position") is not None else error

    @property
    def where(self) -> str:
        place = self.file or "<input>"
        if self.line is not None:
            place += f", {self.unit} {self.line}"
        return place

    def _message(self) -> str:
        text = f"{self.where}: "
        if self.field is not None:
            text += f"field {self.field!r}: "
        text += f"expected {self.expected}"
        if self.got is not None:
            text += f", got {self.got}"
        return text


def describe(value: object, limit: int = 60) -> str:
    """A short, safe description of a bad value for error messages."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


@dataclass
class ErrorPolicy:
    """Raise or record `DataError`s according to `on_error`."""

    on_error: OnError = DEFAULT_ON_ERROR
    skipped: list[DataError] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")

    def handle(self, error: DataError) -> None:
        """Raise in fail mode; otherwise record the error (the caller then skips the record)."""
        if self.on_error == "fail":
            raise error
        self.skipped.append(error)

    def counts(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in self.skipped))

    def summary(self, examples: int = 3) -> str:
        """One line per kind of problem with its count and the first few places."""
        if not self.skipped:
            return "nothing skipped"
        lines = [f"skipped {len(self.skipped)} record(s) with bad input:"]
        by_kind: dict[str, list[DataError]] = {}
        for error in self.skipped:
            by_kind.setdefault(error.kind, []).append(error)
        for kind, errors in by_kind.items():
            lines.append(f"  {kind}: {len(errors)}")
            lines += [f"    {e}" for e in errors[:examples]]
            if len(errors) > examples:
                lines.append(f"    ... and {len(errors) - examples} more")
        return "\n".join(lines)

    def to_json(self, examples: int = 20) -> dict:
        return {
            "count": len(self.skipped),
            "by_kind": self.counts(),
            "examples": [str(e) for e in self.skipped[:examples]],
        }

    def log_summary(self, what: str) -> None:
        if self.skipped:
            logger.warning("%s: %s", what, self.summary())
