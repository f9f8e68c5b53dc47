"""The conversation type that every dataset layout is converted into.

    Conversation(messages=[
        Message("system", [TextPart("你是小橘。")]),
        Message("user", [ImagePart("cat.png"), TextPart("这是什么？")]),
        Message("assistant", [TextPart("是一只猫喵~")]),
    ], source="train.json, record 3")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:
    from PIL import Image

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image given as a local path, a file://, http(s):// or data: URL; opened when encoded unless `decoded` is set."""

    source: str
    decoded: Image.Image | None = field(default=None, compare=False, repr=False)
    """The image already opened from `source` (RGB), which encoding then uses in place of opening it again."""


def image_path(source: str) -> Path | None:
    """Return the local file an image source names (a path or file:// URL), or None for an http(s) or data: URL."""
    if source.startswith(("http://", "https://", "data:")):
        return None
    return Path(source.removeprefix("file://")).expanduser()


ContentPart = Union[TextPart, ImagePart]


@dataclass
class Message:
    role: Role
    content: list[ContentPart]
    reasoning: str | None = None
    """The assistant's thinking, kept apart from the answer in `content`."""

    @property
    def text(self) -> str:
        """The text parts joined, without images."""
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [part for part in self.content if isinstance(part, ImagePart)]


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""
    """Origin of the example as `FILE, record N (line L)`, for error messages."""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def images(self) -> list[ImagePart]:
        return [image for message in self.messages for image in message.images]
