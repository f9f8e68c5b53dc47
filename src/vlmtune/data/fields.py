"""Field access shared by the layout converters, with errors that name file, record and field."""

from __future__ import annotations

import json
import re
from typing import Any

from vlmtune.data.conversation import ContentPart, ImagePart, TextPart, image_path
from vlmtune.data.records import Record
from vlmtune.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
VIDEO_MESSAGE = (
    "videos are not supported for training yet; extract frames and pass them as images, "
    "or remove the example"
)
_REMOTE = re.compile(r"^(https?://|data:)")


def _missing_field(record: Record, name: str) -> DataError:
    """Return the error for a missing field, with the example's keys, since a misspelt column is a common cause."""
    keys = sorted(record.field_name(key) for key in record.data) if isinstance(record.data, dict) else []
    if name in record.configured_columns:
        return DataError(
            f"{record.location}: column '{record.field_name(name)}', which the config's columns maps {name} to, is "
            f"missing from the example's keys {keys}; fix the column name in the data.train entry's columns, or "
            "remove the example",
            "missing field",
        )
    return DataError(
        f"{record.location}: field '{record.field_name(name)}' is missing (the example has {keys}); add it or remove "
        "the example",
        "missing field",
        columns_hint=f". If a column of another name holds it, map it in the data.train entry: columns: {{{name}: COLUMN}}",
    )


def string_field(record: Record, name: str, *, required: bool, value: Any = None, allow_empty: bool = False) -> str:
    """Return a string field; raise for a missing, empty or non-string value."""
    if value is None:
        if name not in record.data:
            if not required:
                return ""
            raise _missing_field(record, name)
        value = record.data[name]
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"{record.location}: field '{record.field_name(name)}' is null; it must be a string", "wrong type")
    if not isinstance(value, str):
        raise DataError(
            f"{record.location}: field '{record.field_name(name)}' must be a string, got {type(value).__name__} {value!r:.60}",
            "wrong type",
        )
    if required and not allow_empty and not value.strip():
        raise DataError(f"{record.location}: field '{record.field_name(name)}' is empty; fill it in or remove the example", "empty field")
    return value


def list_field(record: Record, name: str, *, required: bool) -> list[Any]:
    """Return a list field. A string holding a JSON list is accepted, as CSV files store them."""
    value = record.data.get(name)
    if value is None or (value == "" and not required):
        if required:
            raise _missing_field(record, name)
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f"{record.location}: field '{record.field_name(name)}' must be a list, got {type(value).__name__} {value!r:.60}", "wrong type"
        )
    return list(value)


def image_source(record: Record, value: Any, field: str) -> str:
    """Resolve an image reference: URLs and data: URLs as given, paths relative to the data file."""
    if isinstance(value, dict):
        value = value.get("url") or value.get("path") or value.get("image")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{record.location}: field '{record.field_name(field)}' must be an image path or URL, got {value!r:.60}", "wrong type")
    if _REMOTE.match(value):
        return value
    path = image_path(value)
    if not path.is_absolute():
        path = record.path.parent / path
    if not path.is_file():
        raise DataError(
            f"{record.location}: field '{record.field_name(field)}': image not found: {path} (a relative path is read from the data "
            "file's folder); fix the path or remove the image from the example",
            "missing image",
        )
    return str(path)


def reject_videos(record: Record, field: str) -> None:
    raise DataError(f"{record.location}: field '{record.field_name(field)}' contains a video; {VIDEO_MESSAGE}", "unsupported video")


def images_field(record: Record, name: str = "images") -> list[str]:
    if record.data.get("videos"):
        reject_videos(record, "videos")
    return [image_source(record, item, f"{name}[{index}]") for index, item in enumerate(list_field(record, name, required=False))]


def split_placeholders(text: str, images: list[str], cursor: int, record: Record, field: str) -> tuple[list[ContentPart], int]:
    """Replace each `<image>` in text with the next image of the example, in order."""
    if VIDEO_PLACEHOLDER in text:
        reject_videos(record, field)
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[ContentPart] = []
    for number, piece in enumerate(pieces):
        if number > 0:
            if cursor >= len(images):
                raise DataError(
                    f"{record.location}: field '{record.field_name(field)}' has more {IMAGE_PLACEHOLDER} placeholders than the "
                    f"{len(images)} image(s) in '{record.field_name('images')}'; the counts must be equal: add the "
                    f"missing images or remove the extra {IMAGE_PLACEHOLDER}",
                    "placeholder/image count mismatch",
                )
            parts.append(ImagePart(images[cursor]))
            cursor += 1
        if piece:
            parts.append(TextPart(piece))
    return parts, cursor


def check_all_images_used(record: Record, images: list[str], used: int) -> None:
    if used != len(images):
        raise DataError(
            f"{record.location}: the text has {used} {IMAGE_PLACEHOLDER} placeholder(s) but "
            f"'{record.field_name('images')}' lists {len(images)} image(s); the counts must be equal: put one "
            f"{IMAGE_PLACEHOLDER} in the text where each image goes, or remove the extra images",
            "placeholder/image count mismatch",
        )
