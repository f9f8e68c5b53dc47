"""Loading images named by conversations, with errors that name the example."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import urllib.request
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlmtune.data.conversation import ImagePart, image_path
from vlmtune.data.validate import check_image_file
from vlmtune.errors import DataError
from vlmtune.notices import log_once

logger = logging.getLogger(__name__)

URL_TIMEOUT_SECONDS = 30


def apply_image_limits(processor: Any, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int] | None:
    """Set the image processor's pixel limits (GLM-4.1V and Qwen2-VL keep them in `size`).

    Returns the limits in force as (min_pixels, max_pixels), or None for a processor
    without images or without such limits.
    """
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if image_processor is None or not size or "longest_edge" not in size:
        if min_pixels or max_pixels:
            raise DataError("data.min_pixels / data.max_pixels are set but the model's image processor has no pixel limits")
        return None
    size = dict(size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        # One setting against the processor's own other limit, which resizes images inconsistently.
        raise DataError(
            f"image pixel limits conflict: the smallest image area ({size['shortest_edge']} pixels"
            f"{', data.min_pixels' if min_pixels is not None else ', the processor limit'}) is larger than the largest "
            f"({size['longest_edge']} pixels{', data.max_pixels' if max_pixels is not None else ', the processor limit'}). "
            "Set data.min_pixels at most data.max_pixels, setting both when you change one"
        )
    image_processor.size = size
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and hasattr(image_processor, name):
            setattr(image_processor, name, value)
    return size["shortest_edge"], size["longest_edge"]


def load_image(source: str, where: str = "") -> Image.Image:
    """Open a local path, file:// path, http(s) URL or data: URL as an RGB image."""
    prefix = f"{where}: " if where else ""
    try:
        with warnings.catch_warnings():
            # Pillow's warning names no example; the size is logged below with the example.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_image(source, prefix)
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(f"{prefix}image {shown_source(source)} is too large to open: {error}; scale it down", "image too large") from None
    except UnidentifiedImageError:
        raise DataError(f"{prefix}cannot load image {shown_source(source)}: not a recognised image format", "corrupt image") from None
    except (OSError, ValueError, binascii.Error) as error:
        raise DataError(f"{prefix}cannot load image {shown_source(source)}: {error}", "corrupt image") from None
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:
        log_once(
            logger, logging.WARNING,
            "%simage %s has %.0f megapixels, more than Pillow's warning limit of %.0f: it is decoded again for every "
            "batch it is in, so scale it down beforehand to save that time",
            prefix, shown_source(source), image.width * image.height / 1e6, Image.MAX_IMAGE_PIXELS / 1e6,
        )
    return image.convert("RGB")


def _open_image(source: str, prefix: str) -> Image.Image:
    """Open and decode an image from a path, file:// path, http(s) URL or data: URL (errors as Pillow raises them)."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=URL_TIMEOUT_SECONDS) as response:
            data = response.read()
        image = Image.open(io.BytesIO(data))
    elif source.startswith("data:"):
        image = Image.open(io.BytesIO(_data_url_bytes(source, prefix)))
    else:
        path = image_path(source)
        check_image_file(path, prefix)
        image = Image.open(path)
    image.load()
    return image


def _data_url_bytes(source: str, prefix: str) -> bytes:
    """Decode a data: URL's base64 payload, rejecting one that is not base64 rather than guessing."""
    header, _, payload = source.partition(",")
    if not header.endswith(";base64"):
        raise DataError(
            f"{prefix}cannot load image {shown_source(source)}: the data: URL is not base64-encoded; send "
            "data:image/png;base64,PAYLOAD",
            "corrupt image",
        )
    try:
        # Line breaks, as MIME encoders write them, are not part of the payload.
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as error:
        raise DataError(
            f"{prefix}cannot load image {shown_source(source)}: the data: URL's payload is not valid base64 ({error})",
            "corrupt image",
        ) from None


def reloadable_image_sources(parts: list[ImagePart]) -> list[str] | None:
    """Return sources to open the images again from, when all of them are local files or data: URLs, else None.

    Local files are given by absolute path. An http(s) URL would be downloaded again, and a decoded
    image has no source to open, so these return None.
    """
    sources = []
    for part in parts:
        if part.decoded is not None:
            return None
        if part.source.startswith("data:"):
            sources.append(part.source)
            continue
        path = image_path(part.source)
        if path is None:
            return None
        sources.append(str(path.resolve()))
    return sources or None


def load_image_part(part: ImagePart, where: str = "") -> Image.Image:
    """Return the part's already decoded image, or open its source with load_image."""
    return part.decoded if part.decoded is not None else load_image(part.source, where)


def shown_source(source: str) -> str:
    """Return an image source for a message: paths and URLs whole, a data: URL cut to its start."""
    return repr(source[:80] + "...") if source.startswith("data:") and len(source) > 80 else repr(source)
