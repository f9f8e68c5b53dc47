"""The ShareGPT layout: `conversations` of `{"from": ..., "value": ...}` turns.

    {"conversations": [{"from": "human", "value": "<image>这是什么？"},
                       {"from": "gpt", "value": "一只猫喵~"}],
     "system": "你是小橘。", "images": ["cat.png"]}

Roles: human/user -> user, gpt/assistant -> assistant, system -> system. Tool turns
(observation, function_call) are rejected because vlmtune does not train tool use yet.
"""

from __future__ import annotations

from typing import Any

from vlmtune.data.conversation import Conversation, Message, TextPart
from vlmtune.data.fields import check_all_images_used, images_field, list_field, split_placeholders, string_field
from vlmtune.data.records import Record
from vlmtune.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TOOL_ROLES = ("observation", "function_call", "tool", "function")


def looks_like_sharegpt(data: Any) -> bool:
    return isinstance(data, dict) and "conversations" in data


def sharegpt_to_conversation(record: Record, default_system: str | None = None) -> Conversation:
    """Convert one ShareGPT example; raises DataError naming the file, record and turn."""
    if not isinstance(record.data, dict):
        raise DataError(f"{record.location}: an example must be a JSON object, got {type(record.data).__name__}", "wrong type")
    turns = list_field(record, "conversations", required=True)
    own_system = string_field(record, "system", required=False)
    images = images_field(record)

    messages: list[Message] = []
    used = 0
    for number, turn in enumerate(turns):
        field = f"conversations[{number}]"
        if not isinstance(turn, dict):
            raise DataError(f"{record.location}: field '{record.field_name(field)}' must be an object with 'from' and 'value'", "wrong type")
        speaker = turn.get("from", turn.get("role"))
        if speaker in TOOL_ROLES:
            raise DataError(
                f"{record.location}: field '{record.field_name(field)}.from' is {speaker!r}; tool turns are not supported yet, "
                "remove them or the example",
                "unsupported role",
            )
        if speaker not in ROLES:
            raise DataError(
                f"{record.location}: field '{record.field_name(field)}.from' is {speaker!r}; expected one of {', '.join(ROLES)}",
                "unknown role",
            )
        text = string_field(record, f"{field}.value", required=True, value=turn.get("value", turn.get("content")))
        role = ROLES[speaker]
        if role == "user":
            parts, used = split_placeholders(text, images, used, record, f"{field}.value")
            messages.append(Message("user", parts))
        else:
            messages.append(Message(role, [TextPart(text)]))
    check_all_images_used(record, images, used)
    has_system_turn = bool(messages) and messages[0].role == "system"
    if own_system and has_system_turn and messages[0].text != own_system:
        raise DataError(
            f"{record.location}: the example has two system prompts, field '{record.field_name('system')}' "
            f"({own_system!r}) and field '{record.field_name('conversations[0]')}' ({messages[0].text!r}); keep one",
            "two system prompts",
        )
    system = own_system or default_system
    if system and not has_system_turn:
        messages.insert(0, Message("system", [TextPart(system)]))
    return Conversation(messages, source=record.location)
