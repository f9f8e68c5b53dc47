"""The OpenAI messages layout: `messages` of `{"role": ..., "content": ...}`.

    {"messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "cat.png"}},
            {"type": "text", "text": "这是什么？"}]},
        {"role": "assistant", "content": "一只猫喵~", "reasoning_content": "图里有猫。"}]}

Content is a string or a list of parts: `text`, `image_url` (a path, file://, http(s)://
or data: URL) and `image` (a path). An `images` column with `<image>` placeholders in
string content works as in the other layouts. `reasoning_content` on an assistant
message is kept as its reasoning.
"""

from __future__ import annotations

from typing import Any

from vlmtune.data.conversation import ContentPart, Conversation, ImagePart, Message, TextPart
from vlmtune.data.fields import (
    check_all_images_used,
    image_source,
    images_field,
    list_field,
    reject_videos,
    split_placeholders,
    string_field,
)
from vlmtune.data.records import Record
from vlmtune.data.sharegpt import TOOL_ROLES
from vlmtune.errors import DataError

ROLES = ("system", "user", "assistant")


def looks_like_messages(data: Any) -> bool:
    return isinstance(data, dict) and "messages" in data


def _content_parts(record: Record, content: list[Any], field: str) -> list[ContentPart]:
    parts: list[ContentPart] = []
    for number, part in enumerate(content):
        part_field = f"{field}[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(TextPart(string_field(record, f"{part_field}.text", required=True, value=part.get("text"))))
        elif kind == "image_url":
            parts.append(ImagePart(image_source(record, part.get("image_url"), f"{part_field}.image_url")))
        elif kind == "image":
            parts.append(ImagePart(image_source(record, part.get("image"), f"{part_field}.image")))
        elif kind in ("video", "video_url"):
            reject_videos(record, part_field)
        else:
            raise DataError(
                f"{record.location}: field '{record.field_name(part_field)}' must be a part with type text, image_url or image, "
                f"got {part!r:.80}",
                "wrong type",
            )
    return parts


def messages_to_conversation(record: Record, default_system: str | None = None) -> Conversation:
    """Convert one OpenAI-style example; raises DataError naming the file, record and message."""
    if not isinstance(record.data, dict):
        raise DataError(f"{record.location}: an example must be a JSON object, got {type(record.data).__name__}", "wrong type")
    images = images_field(record)
    messages: list[Message] = []
    used = 0
    for number, item in enumerate(list_field(record, "messages", required=True)):
        field = f"messages[{number}]"
        role = item.get("role") if isinstance(item, dict) else None
        if role in TOOL_ROLES:
            raise DataError(
                f"{record.location}: field '{record.field_name(field)}.role' is {role!r}; tool messages are not supported yet, "
                "remove them or the example",
                "unsupported role",
            )
        if role not in ROLES:
            raise DataError(
                f"{record.location}: field '{record.field_name(field)}.role' is {role!r}; expected one of {', '.join(ROLES)}", "unknown role"
            )
        content = item.get("content")
        if content is None:
            state, reason = ("is null", "wrong type") if "content" in item else ("is missing", "missing field")
            raise DataError(
                f"{record.location}: field '{record.field_name(field)}.content' {state}; give the message's text as a "
                "string or a list of content parts, or remove the message",
                reason,
            )
        if isinstance(content, list):
            parts = _content_parts(record, content, f"{field}.content")
        else:
            text = string_field(record, f"{field}.content", required=True, value=content)
            parts, used = split_placeholders(text, images, used, record, f"{field}.content")
        reasoning = item.get("reasoning_content") if role == "assistant" else None
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"{record.location}: field '{record.field_name(field)}.reasoning_content' must be a string", "wrong type")
        messages.append(Message(role, parts, reasoning=reasoning or None))
    check_all_images_used(record, images, used)
    if default_system and not (messages and messages[0].role == "system"):
        messages.insert(0, Message("system", [TextPart(default_system)]))
    return Conversation(messages, source=record.location)
