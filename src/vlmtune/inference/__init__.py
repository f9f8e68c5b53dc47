"""Generation, chat sessions and (later) predict and export."""

from vlmtune.inference.chat import ChatSession
from vlmtune.inference.generate import Generator, Reply

__all__ = ["ChatSession", "Generator", "Reply"]
