"""Checks every converted conversation must pass before it is encoded."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmtune.data.conversation import Conversation, image_path
from vlmtune.errors import DataError


def check_roles(conversation: Conversation, reply_required: bool = True) -> None:
    """Require: an optional system message, then user/assistant turns alternating, ending with assistant.

    Without reply_required (prompts to generate from), the last message may also be a user message.
    """
    messages = conversation.messages
    start = 1 if messages and messages[0].role == "system" else 0
    turns = messages[start:]
    if not turns:
        raise DataError(f"{conversation.source}: the conversation is empty", "empty conversation")
    for number, message in enumerate(turns):
        expected = "user" if number % 2 == 0 else "assistant"
        if message.role != expected:
            # The role sequence shows which message is meant, even where data.system_prompt added one.
            roles = ", ".join(item.role for item in messages)
            raise DataError(
                f"{conversation.source}: the roles are {roles}, so message {number + start + 1} (counting from 1) is "
                f"{message.role!r} where {expected!r} was expected; turns must alternate user, assistant, ... after "
                "an optional first system message",
                "roles out of order",
            )
        if not message.text.strip() and not message.images:
            raise DataError(
                f"{conversation.source}: message {number + start + 1} (counting from 1, {message.role}) is empty; "
                "fill it in or remove the example",
                "empty field",
            )
    if turns[-1].role != "assistant" and reply_required:
        raise DataError(
            f"{conversation.source}: the conversation ends with a {turns[-1].role} message; it must end with "
            "the assistant reply to train on",
            "no final assistant reply",
        )


def check_image_file(path: Path, prefix: str) -> None:
    """Raise DataError, its message starting with `prefix`, when `path` is a folder or no file."""
    if path.is_dir():
        raise DataError(f"{prefix}image path {path} is a folder; name an image file in it", "missing image")
    if not path.is_file():
        raise DataError(f"{prefix}image not found: {path}", "missing image")


def check_local_images(conversation: Conversation) -> None:
    """Open every local image once, so a missing or corrupt file is caught before training."""
    for image in conversation.images:
        path = image_path(image.source)
        if path is None:
            continue
        check_image_file(path, f"{conversation.source}: ")
        try:
            with Image.open(path) as opened:
                opened.verify()
        except Image.DecompressionBombError as error:
            raise DataError(
                f"{conversation.source}: image {path} is too large to open: {error}; scale it down or remove the "
                "image from the example",
                "image too large",
            ) from None
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(
                f"{conversation.source}: corrupt or unreadable image {path}: {error}; replace the file or remove the "
                "image from the example",
                "corrupt image",
            ) from None


def check_conversation(conversation: Conversation, reply_required: bool = True) -> None:
    check_roles(conversation, reply_required)
    check_local_images(conversation)


def conversation_key(conversation: Conversation) -> tuple:
    """Build a hashable key of a conversation's content, for finding duplicates."""
    return tuple(
        (message.role, message.text, tuple(image.source for image in message.images), message.reasoning or "")
        for message in conversation.messages
    )
