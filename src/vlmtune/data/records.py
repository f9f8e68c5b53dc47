"""Reading raw examples (records) from JSON and JSONL files, with their line numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vlmtune.errors import DataError

SUPPORTED_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Record:
    """One raw example and where it sits in its file."""

    data: Any
    path: Path
    index: int
    line: int

    @property
    def location(self) -> str:
        return f"{self.path}, record {self.index} (line {self.line})"


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the file: {error.strerror}") from None
    try:
        # utf-8-sig accepts and drops a byte-order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: the file is not valid UTF-8 (byte {error.start}); re-save it as UTF-8"
        ) from None


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _iter_json_array(path: Path, text: str) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if position >= len(text) or text[position] != "[":
        raise DataError(f"{path}: a .json dataset must be one JSON array of examples; use .jsonl for one example per line")
    position += 1
    index = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text):
            raise DataError(f"{path}: the JSON array is not closed with ']'")
        if text[position] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {error.lineno}, column {error.colno}: malformed JSON ({error.msg}) in record {index}"
            ) from None
        yield Record(value, path, index, _line_of(text, position))
        index += 1
        position = end


def _iter_jsonl(path: Path, text: str) -> Iterator[Record]:
    index = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {line_number}, column {error.colno}: malformed JSON ({error.msg})"
            ) from None
        yield Record(value, path, index, line_number)
        index += 1


def read_records(path: str | Path) -> list[Record]:
    """Read every example of a .json (array) or .jsonl file."""
    file_path = Path(path)
    if not file_path.exists():
        raise DataError(f"dataset file not found: {file_path}")
    if file_path.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{file_path}: unsupported file type {file_path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    text = _read_text(file_path)
    if not text.strip():
        raise DataError(f"{file_path}: the file is empty")
    reader = _iter_json_array if file_path.suffix == ".json" else _iter_jsonl
    return list(reader(file_path, text))
