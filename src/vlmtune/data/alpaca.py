"""The Alpaca layout: `instruction`, `input`, `output`, optional `system`, `history`, `images`.

    {"instruction": "你是谁？", "input": "", "output": "我是小橘喵~",
     "system": "你是小橘。", "history": [["早上好", "早上好喵~"]]}

becomes system, user, assistant (from history), user, assistant. The user text is
`instruction`, followed by a newline and `input` when `input` is not empty. The
query/response layout is the same with `query` and `response` as column names.
"""

from __future__ import annotations

from typing import Any

from vlmtune.data.conversation import Conversation, Message, TextPart
from vlmtune.data.fields import check_all_images_used, images_field, list_field, split_placeholders, string_field
from vlmtune.data.records import Record
from vlmtune.errors import DataError

QUERY_RESPONSE_COLUMNS = {"instruction": "query", "output": "response"}


def looks_like_alpaca(data: Any) -> bool:
    # `instruction` alone identifies the layout, so a missing `output` is reported as such.
    return isinstance(data, dict) and "instruction" in data


def looks_like_query_response(data: Any) -> bool:
    return isinstance(data, dict) and "query" in data and "instruction" not in data


def _history_pairs(record: Record) -> list[tuple[str, str]]:
    pairs = []
    for number, pair in enumerate(list_field(record, "history", required=False)):
        valid = (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(text, str) and text.strip() for text in pair)
        )
        if not valid:
            raise DataError(
                f"{record.location}: field 'history[{number}]' must be a pair of two non-empty strings "
                f"[user, assistant], got {pair!r:.80}",
                "wrong type",
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def alpaca_to_conversation(record: Record, default_system: str | None = None, reply_required: bool = True) -> Conversation:
    """Convert one Alpaca example; raises DataError naming the file, record and field.

    Without reply_required (prompts to generate from), a missing or empty `output` gives a
    conversation that ends with the user message.
    """
    if not isinstance(record.data, dict):
        raise DataError(f"{record.location}: an example must be a JSON object, got {type(record.data).__name__}", "wrong type")
    instruction = string_field(record, "instruction", required=True)
    extra_input = string_field(record, "input", required=False)
    output = string_field(record, "output", required=reply_required)
    system = string_field(record, "system", required=False) or default_system
    images = images_field(record)

    messages: list[Message] = []
    if system:
        messages.append(Message("system", [TextPart(system)]))
    used = 0
    for number, (user_text, assistant_text) in enumerate(_history_pairs(record)):
        parts, used = split_placeholders(user_text, images, used, record, f"history[{number}]")
        messages.append(Message("user", parts))
        messages.append(Message("assistant", [TextPart(assistant_text)]))
    user_text = f"{instruction}\n{extra_input}" if extra_input.strip() else instruction
    parts, used = split_placeholders(user_text, images, used, record, "instruction")
    check_all_images_used(record, images, used)
    messages.append(Message("user", parts))
    if output.strip():
        messages.append(Message("assistant", [TextPart(output)]))
    return Conversation(messages, source=record.location)
