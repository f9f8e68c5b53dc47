"""Loading dataset files into conversations, one layout converter per file."""

from __future__ import annotations

import logging
from typing import Callable

from vlmtune.config import DataSettings, DatasetSpec
from vlmtune.data.alpaca import alpaca_to_conversation, looks_like_alpaca
from vlmtune.data.conversation import Conversation
from vlmtune.data.records import Record, read_records
from vlmtune.errors import DataError

logger = logging.getLogger(__name__)

Converter = Callable[[Record, "str | None"], Conversation]
CONVERTERS: dict[str, Converter] = {"alpaca": alpaca_to_conversation}
DETECTORS: dict[str, Callable[[object], bool]] = {"alpaca": looks_like_alpaca}


def detect_layout(record: Record) -> str:
    for layout, matches in DETECTORS.items():
        if matches(record.data):
            return layout
    keys = sorted(record.data) if isinstance(record.data, dict) else type(record.data).__name__
    raise DataError(
        f"{record.location}: cannot tell the dataset layout from the keys {keys}; "
        f"supported layouts: {', '.join(CONVERTERS)} (alpaca: 'instruction', 'input', 'output'). "
        "Set data.train[].layout to force one."
    )


def load_dataset_file(spec: DatasetSpec, default_system: str | None = None) -> list[Conversation]:
    """Read one file and convert every example with its layout's converter."""
    records = read_records(spec.path)
    layout = spec.layout if spec.layout != "auto" else detect_layout(records[0])
    convert = CONVERTERS[layout]
    conversations = [convert(record, default_system) for record in records]
    logger.info("read %d examples from %s (layout: %s)", len(conversations), spec.path, layout)
    return conversations


def load_conversations(settings: DataSettings) -> list[Conversation]:
    """Load every training file of the config, in order, capped at data.max_samples."""
    conversations: list[Conversation] = []
    for spec in settings.train:
        conversations.extend(load_dataset_file(spec, settings.system_prompt))
    if settings.max_samples is not None and len(conversations) > settings.max_samples:
        logger.info("using the first %d of %d examples (data.max_samples)", settings.max_samples, len(conversations))
        conversations = conversations[: settings.max_samples]
    return conversations
