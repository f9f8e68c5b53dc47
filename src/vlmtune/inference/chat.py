"""A chat session: history, system prompt and images attached to the next message."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from vlmtune.data.conversation import Conversation, ContentPart, ImagePart, Message, TextPart
from vlmtune.inference.generate import Generator, Reply

logger = logging.getLogger(__name__)


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
        content: list[ContentPart] = [ImagePart(image) for image in images or []]
        content.append(TextPart(text))
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
