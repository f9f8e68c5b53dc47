"""The Alpaca layout: `instruction`, `input`, `output`, optional `system` and `history`.

    {"instruction": "你是谁？", "input": "", "output": "我是小橘喵~",
     "system": "你是小橘。", "history": [["早上好", "早上好喵~"]]}

becomes system, user, assistant (from history), user, assistant. The user text is
`instruction`, followed by a newline and `input` when `input` is not empty.
"""

from __future__ import annotations

from typing import Any

from vlmtune.data.conversation import Conversation, Message, TextPart
from vlmtune.data.records import Record
from vlmtune.errors import DataError

def looks_like_alpaca(data: Any) -> bool:
    # `instruction` alone identifies the layout, so a missing `output` is reported as such.
    return isinstance(data, dict) and "instruction" in data


def _string_field(record: Record, name: str, *, required: bool) -> str:
    value = record.data.get(name)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"{record.location}: field '{name}' is missing; every Alpaca example needs it")
    if not isinstance(value, str):
        raise DataError(
            f"{record.location}: field '{name}' must be a string, got {type(value).__name__} {value!r:.60}"
        )
    if required and not value.strip():
        raise DataError(f"{record.location}: field '{name}' is empty; fill it in or remove the example")
    return value


def _history_turns(record: Record) -> list[Message]:
    history = record.data.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(
            f"{record.location}: field 'history' must be a list of [user, assistant] pairs, "
            f"got {type(history).__name__}"
        )
    turns: list[Message] = []
    for number, pair in enumerate(history):
        valid = (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(text, str) and text.strip() for text in pair)
        )
        if not valid:
            raise DataError(
                f"{record.location}: field 'history[{number}]' must be a pair of two non-empty strings "
                f"[user, assistant], got {pair!r:.80}"
            )
        turns.append(Message("user", [TextPart(pair[0])]))
        turns.append(Message("assistant", [TextPart(pair[1])]))
    return turns


def alpaca_to_conversation(record: Record, default_system: str | None = None) -> Conversation:
    """Convert one Alpaca example; raises DataError naming the file, record and field."""
    if not isinstance(record.data, dict):
        raise DataError(f"{record.location}: an Alpaca example must be a JSON object, got {type(record.data).__name__}")
    instruction = _string_field(record, "instruction", required=True)
    extra_input = _string_field(record, "input", required=False)
    output = _string_field(record, "output", required=True)
    system = _string_field(record, "system", required=False) or default_system

    messages: list[Message] = []
    if system:
        messages.append(Message("system", [TextPart(system)]))
    messages.extend(_history_turns(record))
    user_text = f"{instruction}\n{extra_input}" if extra_input.strip() else instruction
    messages.append(Message("user", [TextPart(user_text)]))
    messages.append(Message("assistant", [TextPart(output)]))
    return Conversation(messages, source=record.location)
