"""Reading raw examples (records) from dataset files, each with its location for errors.

Supported: `.json` (one array), `.jsonl`, `.csv`, `.parquet`, a folder of such files, and
a folder written by `datasets.Dataset.save_to_disk`.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vlmtune.errors import DataError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Record:
    """One raw example and where it sits in its file."""

    data: Any
    path: Path
    index: int
    """0-based position in the file; messages count records from 1."""
    line: int | None = None
    """1-based line in text files; None for Parquet and saved datasets, which have rows only."""
    columns: dict[str, str] = field(default_factory=dict)
    """The file's column name for each layout field that data.train's `columns` renamed."""
    configured_columns: frozenset[str] = frozenset()
    """The layout fields of `columns` that the config set, as opposed to a layout's defaults."""

    @property
    def location(self) -> str:
        where = f"line {self.line}" if self.line is not None else f"row index {self.index}"
        return f"{self.path}, record {self.index + 1} ({where})"

    def field_name(self, name: str) -> str:
        """Return a field name as the file spells it, e.g. `answer[0]` for `output[0]` with columns {output: answer}."""
        head = re.match(r"[^.\[]*", name).group(0)
        return self.columns.get(head, head) + name[len(head) :]


@dataclass(frozen=True)
class ReadProblem:
    """A part of a file that could not be read as a record (skippable with on_invalid: skip)."""

    location: str
    reason: str
    message: str


def _decode(path: Path, raw: bytes) -> str:
    try:
        # utf-8-sig accepts and drops a byte-order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: the file is not valid UTF-8 (byte {error.start}); re-save it as UTF-8",
            reason="invalid UTF-8",
        ) from None


def _iter_json_array(path: Path, raw: bytes) -> Iterator[Record | ReadProblem]:
    text = _decode(path, raw)
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if position >= len(text) or text[position] != "[":
        raise DataError(
            f"{path}: a .json dataset must be one JSON array of examples; use .jsonl for one example per line",
            reason="malformed JSON",
        )
    position += 1
    index = 0
    line, counted_to = 1, 0  # counted forward record by record: counting from the start each time is quadratic
    separators: list[tuple[int, str]] = []  # (position, problem) where strict JSON would fail
    while True:
        start, commas = position, 0
        while position < len(text) and text[position] in " \t\r\n,":
            commas += text[position] == ","
            position += 1
        if position >= len(text):
            raise DataError(f"{path}: the JSON array is not closed with ']'", reason="malformed JSON")
        expected = 0 if index == 0 or text[position] == "]" else 1
        if commas != expected:
            problem = "missing comma between records" if commas < expected else "extra comma"
            separators.append((text.find(",", start) if commas > expected else start, problem))
        if text[position] == "]":
            _warn_lenient_separators(path, text, separators)
            return
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            # Inside an array nothing after a broken record can be trusted, so this is never skipped.
            raise DataError(
                f"{path}, line {error.lineno}, column {error.colno}: malformed JSON ({error.msg}) in record {index + 1}; "
                "fix it (a .json array cannot be read past a broken record)",
                reason="malformed JSON",
            ) from None
        line += text.count("\n", counted_to, position)
        counted_to = position
        yield Record(value, path, index, line)
        index += 1
        position = end


def _warn_lenient_separators(path: Path, text: str, separators: list[tuple[int, str]]) -> None:
    """Warn once per file about commas that vlmtune reads past but strict JSON readers reject."""
    if not separators:
        return
    position, problem = separators[0]
    line = text.count("\n", 0, position) + 1
    more = f" (and {len(separators) - 1} more)" if len(separators) > 1 else ""
    logger.warning(
        "%s, line %d: %s%s; vlmtune reads the records anyway, but other JSON readers reject the file, so fix it",
        path, line, problem, more,
    )


def _iter_jsonl(path: Path, raw: bytes) -> Iterator[Record | ReadProblem]:
    if raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            whole = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = None
        if isinstance(whole, list):
            raise DataError(
                f"{path}: a .jsonl dataset has one JSON example per line, but this file is one JSON array of "
                f"{len(whole)} examples; rename it to .json",
                reason="malformed JSON",
            )
    index = 0
    for line_number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if line_number == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):
            line_bytes = line_bytes[3:]
        location = f"{path}, line {line_number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as error:
            message = f"{location}: not valid UTF-8 (byte {error.start} of the line); re-save the file as UTF-8"
            yield ReadProblem(location, "invalid UTF-8", message)
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            message = f"{location}, column {error.colno}: malformed JSON ({error.msg})"
            yield ReadProblem(location, "malformed JSON", message)
            continue
        yield Record(value, path, index, line_number)
        index += 1


def _iter_csv(path: Path, raw: bytes) -> Iterator[Record | ReadProblem]:
    reader = csv.DictReader(io.StringIO(_decode(path, raw), newline=""))
    index = 0
    start_line = 2
    for row in reader:
        # DictReader puts the fields past the header's under the key None, and gives missing fields the value None.
        extra = row.pop(None, [])
        count = sum(value is not None for value in row.values()) + len(extra)
        if count != len(row):
            location = f"{path}, line {start_line}"
            hint = (
                'put double quotes around a field that contains a comma ("a, b")'
                if extra
                else "add the missing fields, empty ones as two commas in a row"
            )
            fields = f"{count} field{'' if count == 1 else 's'}"
            message = f"{location}: the row has {fields} but the header has {len(row)} ({', '.join(row)}); {hint}"
            yield ReadProblem(location, "malformed CSV", message)
        else:
            yield Record(row, path, index, start_line)
            index += 1
        start_line = reader.line_num + 1


def _plain_value(value: Any) -> Any:
    """Turn Arrow image structs and PIL images into data: URLs, so images stay strings."""
    if isinstance(value, dict) and set(value) == {"bytes", "path"}:
        if value["bytes"]:
            return "data:image/png;base64," + base64.b64encode(value["bytes"]).decode("ascii")
        return value["path"]
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    if isinstance(value, list):
        return [_plain_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain_value(item) for key, item in value.items()}
    return value


def _iter_rows(path: Path, rows: list[dict[str, Any]]) -> Iterator[Record | ReadProblem]:
    for index, row in enumerate(rows):
        yield Record(_plain_value(row), path, index)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read the Parquet file: {error}", reason="unreadable file") from None


def _read_saved_dataset(path: Path, split: str | None) -> list[dict[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        name = split or ("train" if "train" in loaded else None)
        if name not in loaded:
            raise DataError(
                f"{path}: the saved dataset has splits {sorted(loaded)}; choose one with data.train[].split"
            )
        loaded = loaded[name]
    for column, feature in loaded.features.items():
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(column, datasets.Image(decode=False))
    return loaded.to_list()


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def dataset_files(path: str | Path) -> list[Path]:
    """List the files behind a dataset path: the file itself, or the supported files of a folder."""
    file_path = Path(path)
    if not file_path.exists():
        raise DataError(f"dataset file not found: {file_path}")
    if file_path.is_dir() and not is_saved_dataset(file_path):
        children = sorted(file_path.iterdir())
        files = [child for child in children if child.is_file() and child.suffix.lower() in SUPPORTED_SUFFIXES]
        if not files:
            raise DataError(
                f"{file_path}: the folder has no dataset files; expected {', '.join(SUPPORTED_SUFFIXES)} files "
                "or a folder written by datasets' save_to_disk"
            )
        skipped = [child.name + ("/" if child.is_dir() else "") for child in children if child not in files and not child.name.startswith(".")]
        if skipped:
            logger.info(
                "%s: reading %d dataset file(s); not reading %s (not %s files; subfolders are not searched)",
                file_path, len(files), ", ".join(skipped), ", ".join(SUPPORTED_SUFFIXES),
            )
        return files
    return [file_path]


def iter_records(path: str | Path, split: str | None = None) -> Iterator[Record | ReadProblem]:
    """Yield every example of one file (or saved dataset), and the parts that could not be read."""
    file_path = Path(path)
    if not file_path.exists():
        raise DataError(f"dataset file not found: {file_path}", reason="missing file")
    if is_saved_dataset(file_path):
        yield from _iter_rows(file_path, _read_saved_dataset(file_path, split))
        return
    suffix = file_path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{file_path}: unsupported file type {file_path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}, "
            "a folder of them, or a save_to_disk folder"
        )
    if suffix == ".parquet":
        rows = _read_parquet(file_path)
        if not rows:
            raise DataError(f"{file_path}: the file has no rows", reason="empty file")
        yield from _iter_rows(file_path, rows)
        return
    try:
        raw = file_path.read_bytes()
    except OSError as error:
        raise DataError(f"{file_path}: cannot read the file: {error.strerror}", reason="unreadable file") from None
    if not raw.strip(b" \t\r\n\xef\xbb\xbf"):
        raise DataError(f"{file_path}: the file is empty", reason="empty file")
    readers = {".json": _iter_json_array, ".jsonl": _iter_jsonl, ".csv": _iter_csv}
    yield from readers[suffix](file_path, raw)


def read_records(path: str | Path) -> list[Record]:
    """Read every example of one file, raising DataError at the first unreadable part."""
    records = []
    for item in iter_records(path):
        if isinstance(item, ReadProblem):
            raise DataError(item.message, reason=item.reason)
        records.append(item)
    return records
