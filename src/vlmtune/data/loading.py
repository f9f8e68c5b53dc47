"""Loading datasets into conversations: layout detection, validation, skipping, mixing, splits."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmtune.config import DataSettings, DatasetSpec
from vlmtune.data.alpaca import (
    QUERY_RESPONSE_COLUMNS,
    alpaca_to_conversation,
    looks_like_alpaca,
    looks_like_query_response,
)
from vlmtune.data.conversation import Conversation
from vlmtune.data.messages import looks_like_messages, messages_to_conversation
from vlmtune.data.hub import spec_files
from vlmtune.data.records import ReadProblem, Record, iter_records
from vlmtune.data.sharegpt import looks_like_sharegpt, sharegpt_to_conversation
from vlmtune.data.validate import check_conversation, conversation_key
from vlmtune.errors import DataError

logger = logging.getLogger(__name__)

Converter = Callable[[Record, "str | None"], Conversation]
CONVERTERS: dict[str, Converter] = {
    "alpaca": alpaca_to_conversation,
    "query_response": alpaca_to_conversation,
    "sharegpt": sharegpt_to_conversation,
    "messages": messages_to_conversation,
}
DEFAULT_COLUMNS = {"query_response": QUERY_RESPONSE_COLUMNS}
# Checked in order; the first match wins.
DETECTORS: list[tuple[str, Callable[[Any], bool]]] = [
    ("messages", looks_like_messages),
    ("sharegpt", looks_like_sharegpt),
    ("alpaca", looks_like_alpaca),
    ("query_response", looks_like_query_response),
]
# Prompt files (predict --data, eval --data) are read without a config, so `columns` cannot rename their keys.
NO_CONFIG_HINT = ". A --data file is read with its keys as they are (no columns mapping applies), so rename the keys in the file"
LAYOUT_KEYS = "messages: 'messages'; sharegpt: 'conversations'; alpaca: 'instruction', 'output'; query_response: 'query', 'response'"


@dataclass
class SkipReport:
    """Invalid examples skipped with on_invalid: skip, and duplicates, by reason."""

    skipped: dict[str, list[str]] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    originals: dict[str, str] = field(default_factory=dict)
    """For each duplicate, the earlier example it repeats."""
    duplicates_removed: bool = False
    validation_overlap: list[str] = field(default_factory=list)
    """Validation examples that repeat a training example (each mapped to it in `originals`)."""
    first_messages: dict[str, str] = field(default_factory=dict)
    """The full error message of the first example skipped for each reason."""

    def add(self, reason: str, location: str, message: str = "") -> None:
        self.skipped.setdefault(reason, []).append(location)
        self.first_messages.setdefault(reason, message)

    @property
    def skipped_count(self) -> int:
        return sum(len(locations) for locations in self.skipped.values())

    def log(self) -> None:
        if self.skipped:
            logger.warning("skipped %d invalid example(s):", self.skipped_count)
            for reason, locations in sorted(self.skipped.items(), key=lambda item: -len(item[1])):
                first = "; ".join(locations[:3])
                logger.warning("  %-32s %5d   at: %s", reason, len(locations), first)
                if self.first_messages.get(reason):
                    logger.warning("  %32s         first: %s", "", self.first_messages[reason])
        if self.duplicates:
            action = "removed (data.dedup=true)" if self.duplicates_removed else "kept; set data.dedup: true to remove them"
            first = "; ".join(f"{source} repeats {self.originals[source]}" for source in self.duplicates[:3])
            logger.warning("%d duplicated example(s), %s. First: %s", len(self.duplicates), action, first)
        if self.validation_overlap:
            action = "removed from validation (data.dedup=true)" if self.duplicates_removed else "kept; set data.dedup: true to remove them"
            first = "; ".join(f"{source} repeats {self.originals[source]}" for source in self.validation_overlap[:3])
            logger.warning(
                "%d validation example(s) repeat a training example, so their evaluation loss measures memorisation; %s. "
                "First: %s", len(self.validation_overlap), action, first,
            )


def _rename_columns(record: Record, columns: dict[str, str], configured: dict[str, str] | None = None) -> Record:
    """Rename the file's columns to the layout's field names; configured is the config's own part of columns."""
    if not columns or not isinstance(record.data, dict):
        return record
    data = dict(record.data)
    for layout_name, file_column in columns.items():
        if file_column in data:
            data[layout_name] = data.pop(file_column)
    return Record(
        data, record.path, record.index, record.line, columns=dict(columns), configured_columns=frozenset(configured or {})
    )


def detect_layout(record: Record) -> str:
    for layout, matches in DETECTORS:
        if matches(record.data):
            return layout
    if not isinstance(record.data, dict):
        raise DataError(
            f"{record.location}: an example must be a JSON object, got {type(record.data).__name__} {record.data!r:.60}",
            "wrong type",
        )
    keys = sorted(record.field_name(key) for key in record.data)
    absent = [record.columns[name] for name in sorted(record.configured_columns) if name not in record.data]
    absent_note = f" (the config's columns names {absent}, missing from these keys)" if absent else ""
    raise DataError(
        f"{record.location}: cannot tell the dataset layout from the keys {keys}{absent_note}; supported layouts "
        f"and their keys: {LAYOUT_KEYS}",
        "unknown layout",
        columns_hint=". Map your column names to a layout's in the data.train entry, for example "
        "columns: {instruction: question, output: answer} for Alpaca with question/answer keys; set layout as "
        "well to force one.",
    )


def _mixed_layout_note(item: Record | ReadProblem, layout: str | None, spec: DatasetSpec) -> str:
    """Explain a record that failed because it is in another layout than the one detected for its file."""
    if not isinstance(item, Record) or layout is None:
        return ""
    try:
        own = detect_layout(_rename_columns(item, spec.columns))
    except DataError:
        return ""
    if own == layout:
        return ""
    return (
        f"; this record looks like the {own} layout, but the file's layout is {layout}, detected from its first "
        "record: keep one layout per file"
    )


SKIP_HINT = "set data.on_invalid: skip"
"""The default advice after an invalid example: the training config setting that skips such examples."""


def _read_one_file(
    spec: DatasetSpec,
    path,
    default_system: str | None,
    on_invalid: str,
    report: SkipReport,
    prompts_only: bool,
    skip_hint: str | None,
) -> list[Conversation]:
    columns = {**DEFAULT_COLUMNS.get(spec.layout, {}), **spec.columns}
    layout = spec.layout if spec.layout != "auto" else None
    conversations = []
    seen = skipped = 0
    for item in iter_records(path, spec.split):
        seen += 1
        try:
            if isinstance(item, ReadProblem):
                raise DataError(item.message, item.reason)
            if layout is None:
                layout = detect_layout(_rename_columns(item, spec.columns, spec.columns))
                columns = {**DEFAULT_COLUMNS.get(layout, {}), **spec.columns}
            record = _rename_columns(item, columns, spec.columns)
            if prompts_only and CONVERTERS[layout] is alpaca_to_conversation:
                conversation = alpaca_to_conversation(record, default_system, reply_required=False)
            else:
                conversation = CONVERTERS[layout](record, default_system)
            check_conversation(conversation, reply_required=not prompts_only)
        except DataError as error:
            if prompts_only and error.columns_hint:
                error = DataError(error.detail + NO_CONFIG_HINT, error.reason)
            if on_invalid == "error":
                mixed = _mixed_layout_note(item, layout, spec) if spec.layout == "auto" else ""
                # A layout that cannot be detected from the keys fails every example, so skipping would skip the file.
                hint = "" if error.reason == "unknown layout" or skip_hint is None else f" ({skip_hint} to skip such examples)"
                raise DataError(f"{error}{mixed}{hint}", error.reason) from None
            report.add(error.reason, item.location, str(error))
            skipped += 1
            continue
        conversations.append(conversation)
    if seen == 0:
        raise DataError(f"{path}: the file has no examples", "empty file")
    skipped_note = f", skipped {skipped} invalid (listed below)" if skipped else ""
    logger.info("read %d examples from %s (layout: %s)%s", len(conversations), path, layout or "none detected", skipped_note)
    return conversations


def load_dataset_file(
    spec: DatasetSpec,
    default_system: str | None = None,
    on_invalid: str = "error",
    report: SkipReport | None = None,
    prompts_only: bool = False,
    skip_hint: str | None = None,
) -> list[Conversation]:
    """Read and convert one dataset path (a file, a folder of files or a saved dataset).

    With prompts_only (prompts to generate from), examples need no final assistant reply.
    `skip_hint` follows the error of an invalid example: how to skip such examples in the command
    at hand. Default: the data.on_invalid setting for training data, none for prompt files.
    """
    report = report if report is not None else SkipReport()
    if skip_hint is None and not prompts_only:
        skip_hint = SKIP_HINT
    conversations = []
    for path in spec_files(spec):
        conversations.extend(_read_one_file(spec, path, default_system, on_invalid, report, prompts_only, skip_hint))
    return conversations


def _sample(conversations: list[Conversation], ratio: float, rng: random.Random) -> list[Conversation]:
    """Take ratio * len examples: whole copies for the integer part, a random subset for the rest."""
    whole, fraction = divmod(ratio, 1.0)
    sampled = conversations * int(whole)
    extra = round(fraction * len(conversations))
    sampled += rng.sample(conversations, extra)
    return sampled


def _drop_duplicates(
    conversations: list[Conversation], dedup: bool, report: SkipReport, first_seen: dict[tuple, str]
) -> list[Conversation]:
    """Report (and with dedup, remove) the conversations already in first_seen, which maps content keys to sources."""
    kept = []
    report.duplicates_removed = dedup
    for conversation in conversations:
        key = conversation_key(conversation)
        if key in first_seen:
            report.duplicates.append(conversation.source)
            report.originals[conversation.source] = first_seen[key]
            if dedup:
                continue
        first_seen.setdefault(key, conversation.source)
        kept.append(conversation)
    return kept


@dataclass
class LoadedData:
    train: list[Conversation]
    validation: list[Conversation]
    report: SkipReport


def _load_specs(specs: list[DatasetSpec], settings: DataSettings, report: SkipReport, rng: random.Random) -> list[Conversation]:
    conversations: list[Conversation] = []
    first_seen: dict[tuple, str] = {}
    for spec in specs:
        # Duplicates are looked for across the files before sampling, since a ratio above 1 repeats on purpose.
        read = load_dataset_file(spec, settings.system_prompt, settings.on_invalid, report)
        read = _drop_duplicates(read, settings.dedup, report, first_seen)
        if spec.ratio != 1.0:
            sampled = _sample(read, spec.ratio, rng)
            logger.info("using %d examples from %s (%d examples x ratio %g)", len(sampled), spec.label, len(read), spec.ratio)
            read = sampled
        conversations.extend(read)
    return conversations


def load_data(settings: DataSettings) -> LoadedData:
    """Load training and validation conversations as the data settings describe."""
    rng = random.Random(settings.seed)
    report = SkipReport()
    train = _load_specs(settings.train, settings, report, rng)
    validation = _load_specs(settings.validation, settings, report, rng)
    if settings.val_size > 0 and train:
        # The copies that a ratio above 1 makes share their source, so an example is held out with all of them.
        distinct = list({conversation.source: conversation for conversation in train}.values())
        rng.shuffle(distinct)
        held_out = max(1, round(settings.val_size * len(distinct)))
        if held_out >= len(distinct):
            raise DataError(
                f"data.val_size={settings.val_size:g} holds out {held_out} of the {len(distinct)} training example(s), "
                "leaving none to train on. Add examples or set data.val_size: 0",
                "no examples",
            )
        validation = distinct[:held_out]
        held_sources = {conversation.source for conversation in validation}
        train = [conversation for conversation in train if conversation.source not in held_sources]
        rng.shuffle(train)
        logger.info("held out %d of %d examples for validation (data.val_size=%g)", held_out, len(distinct), settings.val_size)
    if settings.max_samples is not None and len(train) > settings.max_samples:
        logger.info("using the first %d of %d examples (data.max_samples)", settings.max_samples, len(train))
        train = train[: settings.max_samples]
    validation = _check_overlap(train, validation, settings.dedup, report)
    report.log()
    if not train:
        raise DataError("no valid training example was read; check the files and data.on_invalid", "no examples")
    return LoadedData(train, validation, report)


def _check_overlap(
    train: list[Conversation], validation: list[Conversation], dedup: bool, report: SkipReport
) -> list[Conversation]:
    """Report the validation examples that repeat a training example; with dedup, leave them out of validation."""
    training_sources = {conversation_key(conversation): conversation.source for conversation in reversed(train)}
    kept = []
    for conversation in validation:
        original = training_sources.get(conversation_key(conversation))
        if original is None:
            kept.append(conversation)
            continue
        report.validation_overlap.append(conversation.source)
        report.originals[conversation.source] = original
        if not dedup:
            kept.append(conversation)
    return kept


def load_conversations(settings: DataSettings) -> list[Conversation]:
    """Load the training conversations only."""
    return load_data(settings).train
