"""Raw dataset files -> conversations. Imports no torch and no model code."""

from vlmtune.data.conversation import Conversation, ContentPart, ImagePart, Message, TextPart
from vlmtune.data.loading import load_conversations, load_dataset_file

__all__ = [
    "Conversation",
    "ContentPart",
    "ImagePart",
    "Message",
    "TextPart",
    "load_conversations",
    "load_dataset_file",
]
