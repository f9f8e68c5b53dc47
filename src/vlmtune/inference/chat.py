"""A chat session: history, system prompt and images attached to the next message."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from vlmtune.data.conversation import Conversation, ContentPart, ImagePart, Message, TextPart
from vlmtune.data.fields import IMAGE_PLACEHOLDER
from vlmtune.errors import DataError
from vlmtune.inference.generate import Generator, Reply

logger = logging.getLogger(__name__)


def message_content(text: str, images: list[str]) -> list[ContentPart]:
    """Lay out a user message: each attached image at its <image> placeholder as in training data, else all before the text."""
    if not images or IMAGE_PLACEHOLDER not in text:
        return [*(ImagePart(image) for image in images), TextPart(text)]
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        raise DataError(
            f"the message has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) are attached; "
            f"put one {IMAGE_PLACEHOLDER} where each image goes, or none to put the images before the text"
        )
    content: list[ContentPart] = [TextPart(pieces[0])] if pieces[0] else []
    for image, piece in zip(images, pieces[1:]):
        content.append(ImagePart(image))
        if piece:
            content.append(TextPart(piece))
    return content


@dataclass
class ChatSession:
    """Keeps the conversation so far; each reply is added to the history without its reasoning."""

    generator: Generator
    system_prompt: str | None = None
    history: list[Message] = field(default_factory=list)

    def conversation(self) -> Conversation:
        system = [Message("system", [TextPart(self.system_prompt)])] if self.system_prompt else []
        return Conversation([*system, *self.history], source="chat")

    def ask(
        self, text: str, images: list[str] | None = None, on_text=None, on_parts=None, cancel: threading.Event | None = None
    ) -> Reply:
        """Send one user message and add the reply to the history; streams when on_text or on_parts is given.

        Setting `cancel` stops the reply after the current token; the history keeps the part generated so far.
        """
        content = message_content(text, images or [])
        logger.debug("sending a message with %d image(s) after %d earlier message(s)", len(images or []), len(self.history))
        self.history.append(Message("user", content))
        try:
            if on_text is None and on_parts is None:
                reply = self.generator.generate(self.conversation(), cancel=cancel)
            else:
                reply = self.generator.stream(self.conversation(), on_text, on_parts=on_parts, cancel=cancel)
        except Exception:
            self.history.pop()
            raise
        self.history.append(Message("assistant", [TextPart(reply.answer)], reasoning=reply.reasoning))
        return reply

    def clear(self) -> None:
        self.history.clear()
