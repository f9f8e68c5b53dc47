"""Encode a dataset once: `datasets.map` over the conversations, saved under a key.

The key hashes everything the encoded samples depend on. These are the conversations
themselves (after reading, system prompt, de-duplication and splitting) and the image
files they name (path, size and modification time). They are also the tokenizer, the
chat template, the image processor's settings, the stop ids and the data settings that
shape encoding. A second run with the same inputs reads the saved Arrow file instead of
encoding again. Any change to one of them gives a new key. Processes that encode the same
inputs at the same time, such as the ranks of a torchrun job, wait on a lock file beside the
table, so only the first one encodes. Set `data.num_proc` to encode in several processes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import pyarrow
import pyarrow.ipc
import torch
from filelock import FileLock, Timeout

from vlmtune import __version__
from vlmtune.config import DataSettings
from vlmtune.data.conversation import Conversation, image_path
from vlmtune.encoding.encode import (
    ENCODE_BATCH_SIZE,
    ConversationEncoder,
    EncodedSample,
    EncodingOutcome,
    EncodingReport,
    add_outcome,
    encode_with_policy,
)
from vlmtune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CACHE_ENV = "VLMTUNE_CACHE"
"""Environment variable naming the cache root when data.cache_dir is not set."""

# Settings that change what the encoder produces. The others (paths, splits) act through the conversations.
ENCODING_SETTINGS = ("thinking", "train_on", "max_length", "on_overlength", "on_invalid", "min_pixels", "max_pixels")


def cache_root(settings: DataSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "vlmtune" / "encoded"


def _image_stamp(source: str) -> str:
    """Return what identifies an image: path, size and modification time of a file, or the URL itself."""
    path = image_path(source)
    if path is None:
        return source
    try:
        stat = path.stat()
    except OSError:
        return f"{source}:missing"  # encoding reports the missing file with its record
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


@functools.cache
def source_digest(folder: Path) -> str:
    """Hash the Python source files of a folder, once per process.

    The key includes the encoding modules' digest, so a changed encoder never reads an old
    cache: the package version alone does not change between commits of a checkout.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode("utf-8"))
        digest.update(path.read_bytes())
    return digest.hexdigest()


def encoding_key(encoder: ConversationEncoder, conversations: list[Conversation], settings: DataSettings) -> str:
    """Hash every input of encoding into one hex key."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        digest.update(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\0")

    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    add(__version__)
    add(source_digest(Path(__file__).parent))
    add(backend.to_str() if backend is not None else tokenizer.get_vocab())
    add(getattr(encoder.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))
    image_processor = getattr(encoder.processor, "image_processor", None)
    add(image_processor.to_json_string() if image_processor is not None else None)
    # The end-of-turn id is left out: it follows from the template, the tokenizer and the stop ids.
    add([encoder.stop_ids, encoder.layout, encoder.pixel_limits])
    add({name: getattr(settings, name) for name in ENCODING_SETTINGS})
    add(
        [
            (
                conversation.source,
                [
                    (message.role, message.reasoning, [(type(part).__name__, vars(part)) for part in message.content])
                    for message in conversation.messages
                ],
                [_image_stamp(image.source) for image in conversation.images],
            )
            for conversation in conversations
        ]
    )
    return digest.hexdigest()[:32]


# -- rows <-> samples ----------------------------------------------------------------------

# Kept pixel values (http(s) and decoded images) go in and out of Arrow as NumPy arrays. As Python
# floats, 40 images of 640x480 took 44 s to encode and 4 s to read on 2 CPU cores. As arrays, 8 s and 0.13 s.
NO_PIXELS = np.zeros(0, dtype=np.float32)
IMAGE_WRITER_BATCH_SIZE = 16
"""Rows per Arrow write when the data has images. A list column takes at most 2**31 values per
write, and 16 images at transformers' default limit for GLM-4.1V (11.8 megapixels, about 71M
floats each) fit."""

FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "reply_starts": datasets.Sequence(datasets.Value("int32")),
        "mm_token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "pixel_values": datasets.Sequence(datasets.Value("float32")),
        "pixel_shape": datasets.Sequence(datasets.Value("int32")),
        "image_grid_thw": datasets.Sequence(datasets.Value("int32")),
        "image_sources": datasets.Sequence(datasets.Value("string")),
        "source": datasets.Value("string"),
        "length": datasets.Value("int32"),
        "dropped": datasets.Value("string"),
        "trimmed": datasets.Value("bool"),
        "error": datasets.Value("string"),
        "error_reason": datasets.Value("string"),
        "resized_images": datasets.Value("int32"),
    }
)


ARROW_SCHEMA = FEATURES.arrow_schema
NUMERIC_LIST_COLUMNS = tuple(
    name for name, feature in FEATURES.items() if isinstance(feature, datasets.Sequence) and feature.feature.dtype != "string"
)


def _outcome_row(outcome: EncodingOutcome, source: str) -> dict[str, Any]:
    sample = outcome.sample
    row: dict[str, Any] = {
        "input_ids": [],
        "labels": [],
        "reply_starts": [],
        "mm_token_type_ids": [],
        "pixel_values": NO_PIXELS,
        "pixel_shape": [],
        "image_grid_thw": [],
        "image_sources": [],
        "source": source,
        "length": outcome.length,
        "dropped": outcome.dropped,
        "trimmed": outcome.trimmed,
        "error": None if outcome.error is None else str(outcome.error),
        "error_reason": None if outcome.error is None else outcome.error.reason,
        "resized_images": 0,
    }
    if sample is not None:
        row.update(input_ids=sample.input_ids, labels=sample.labels, reply_starts=sample.reply_starts)
        row["resized_images"] = sample.resized_images
        row["mm_token_type_ids"] = sample.mm_token_type_ids or []
        if sample.image_grid_thw is not None:
            row["image_grid_thw"] = sample.image_grid_thw.flatten().tolist()
            row["image_sources"] = sample.image_sources or []
        if sample.pixel_values is not None:
            row["pixel_values"] = sample.pixel_values.float().flatten().numpy()
            row["pixel_shape"] = list(sample.pixel_values.shape)
    return row


def _row_outcome(row: dict[str, Any]) -> EncodingOutcome:
    error = DataError(row["error"], row["error_reason"]) if row["error"] is not None else None
    if row["dropped"] is not None or error is not None:
        return EncodingOutcome(None, row["length"], dropped=row["dropped"], error=error)
    sample = EncodedSample(
        row["input_ids"], row["labels"], row["reply_starts"].tolist(), source=row["source"], resized_images=row["resized_images"]
    )
    if len(row["mm_token_type_ids"]):
        sample.mm_token_type_ids = row["mm_token_type_ids"]
    if len(row["image_grid_thw"]):
        sample.image_grid_thw = torch.from_numpy(row["image_grid_thw"].astype(np.int64)).view(-1, 3)
        sample.image_sources = row["image_sources"] or None
    if len(row["pixel_shape"]):
        sample.pixel_values = torch.from_numpy(row["pixel_values"].copy()).view(*row["pixel_shape"].tolist())
    return EncodingOutcome(sample, row["length"], trimmed=row["trimmed"])


class _EncodeRows:
    """The `datasets.map` function: encode the conversations whose indices are in the batch."""

    def __init__(self, encoder: ConversationEncoder, conversations: list[Conversation], settings: DataSettings):
        self.encoder = encoder
        self.conversations = conversations
        self.settings = settings
        self.parent_pid = os.getpid()

    def __call__(self, batch: dict[str, list[int]]) -> pyarrow.Table | dict[str, list[Any]]:
        if os.getpid() != self.parent_pid:
            # A forked worker must not enter the parent's OpenMP thread pool: it would wait forever.
            torch.set_num_threads(1)
        conversations = [self.conversations[index] for index in batch["index"]]
        outcomes = encode_with_policy(self.encoder, conversations, self.settings)
        rows = [_outcome_row(outcome, conversation.source) for conversation, outcome in zip(conversations, outcomes)]
        if any(len(row["pixel_values"]) for row in rows):
            # datasets writes kept pixel values in parts of IMAGE_WRITER_BATCH_SIZE rows, under Arrow's 2**31 values.
            return {name: [row[name] for row in rows] for name in rows[0]}
        return _rows_table(rows)


def _rows_table(rows: list[dict[str, Any]]) -> pyarrow.Table:
    """Build the Arrow table of rows without pixel values in the schema's types.

    Typed arrays skip the type inference and casts of `datasets`' own conversion, a tenth to a
    third of a first encoding of the persona data in two A/B runs (0.40 s against 0.28 s in one).
    """
    columns = [pyarrow.array([row[field.name] for row in rows], type=field.type) for field in ARROW_SCHEMA]
    return pyarrow.Table.from_arrays(columns, schema=ARROW_SCHEMA)


def encode_dataset(
    encoder: ConversationEncoder,
    conversations: list[Conversation],
    settings: DataSettings,
    name: str = "train",
) -> EncodingReport:
    """Encode conversations through `datasets.map`, or load the result of an earlier run with the same inputs."""
    started = time.perf_counter()
    key = encoding_key(encoder, conversations, settings)
    if settings.cache:
        table, cached = _cached_encode(encoder, conversations, settings, name, cache_root(settings) / f"{key}.arrow")
    else:
        table, cached = _encode(encoder, conversations, settings).data.table, False
    report = EncodingReport([], {}, from_cache=cached, key=key)
    # One conversion per column: much faster than reading row by row. Numeric lists become NumPy views of
    # the table's buffers, 4 bytes a token where a list of Python ints took about 80 (benchmarks/sample_memory.py).
    columns: dict[str, Any] = {name: _list_rows(table.column(name)) for name in NUMERIC_LIST_COLUMNS}
    columns.update(table.drop_columns(list(NUMERIC_LIST_COLUMNS)).to_pydict())
    names = list(columns)
    for values in zip(*columns.values()):
        row = dict(zip(names, values))
        add_outcome(report, _row_outcome(row), row["source"])
    report.seconds = time.perf_counter() - started
    report.log()
    return report


def _list_rows(column: pyarrow.ChunkedArray) -> Iterator[np.ndarray]:
    """Yield each row of a list column of numbers as a read-only NumPy view of the Arrow buffer."""
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()  # positions in chunk.values, which ignores a slice's start
        values = chunk.values.to_numpy()
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield values[start:end]


def _cached_encode(
    encoder: ConversationEncoder, conversations: list[Conversation], settings: DataSettings, name: str, path: Path
) -> tuple[pyarrow.Table, bool]:
    """Read the encoded table at `path`, or encode and save it. Return the table and whether it was read.

    A lock file beside the table makes processes that encode the same inputs at the same time
    (the ranks of a torchrun job, or two runs started together) wait for the first one, then
    read its table. Reading needs no lock, because a table appears in one `os.replace`.
    """
    if path.is_file():
        return _read(path, name), True
    lock = FileLock(f"{path}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:  # a subclass of OSError, so caught first
        logger.info("%s data: another process is encoding the same inputs, waiting for %s", name, path)
        lock.acquire()
    except OSError as error:
        raise ConfigError(
            f"encoding cache folder {path.parent} is not writable: {error}. "
            "Set data.cache_dir (or $VLMTUNE_CACHE) to a writable folder, or data.cache=false"
        ) from None
    try:
        if path.is_file():  # written while this process waited
            return _read(path, name), True
        logger.info("%s data: no cached encoding of these inputs, encoding %d examples", name, len(conversations))
        table = _encode(encoder, conversations, settings).data.table
        _save(table, path)
        return table, False
    finally:
        lock.release()


def _read(path: Path, name: str) -> pyarrow.Table:
    # Memory-mapped, so the samples' token arrays are views of the page cache, not copies in the process's memory.
    table = pyarrow.ipc.open_file(pyarrow.memory_map(str(path))).read_all()
    logger.info("%s data: cache hit, loaded %d encoded examples from %s", name, table.num_rows, path)
    return table


def _encode(encoder: ConversationEncoder, conversations: list[Conversation], settings: DataSettings) -> datasets.Dataset:
    indices = datasets.Dataset.from_dict({"index": list(range(len(conversations)))})
    num_proc = settings.num_proc if settings.num_proc and settings.num_proc > 1 and len(conversations) > 1 else None
    encoder.end_of_turn_id  # found (and logged) once here, not in every worker
    return indices.map(
        _EncodeRows(encoder, conversations, settings),
        batched=True,
        batch_size=ENCODE_BATCH_SIZE,
        num_proc=num_proc,
        remove_columns=["index"],
        features=FEATURES,
        writer_batch_size=IMAGE_WRITER_BATCH_SIZE if any(conversation.images for conversation in conversations) else None,
        new_fingerprint=f"vlmtune-encode-{len(conversations)}",
        load_from_cache_file=False,
        keep_in_memory=True,
        desc="encoding",
    )


def _save(table: pyarrow.Table, path: Path) -> None:
    """Write the encoded table beside its final path, then move it in place, so readers never see half a file."""
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    with pyarrow.OSFile(str(partial), "wb") as sink, pyarrow.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(partial, path)
    logger.info("saved the encoded data to %s", path)


__all__ = ["cache_root", "encode_dataset", "encoding_key"]
