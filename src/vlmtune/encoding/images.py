"""Loading images named by conversations, with errors that name the example."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmtune.errors import DataError

URL_TIMEOUT_SECONDS = 30


def load_image(source: str, where: str = "") -> Image.Image:
    """Open a local path or an http(s) URL as an RGB image."""
    prefix = f"{where}: " if where else ""
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_SECONDS) as response:
                data = response.read()
            image = Image.open(io.BytesIO(data))
        else:
            path = Path(source.removeprefix("file://")).expanduser()
            if not path.is_file():
                raise DataError(f"{prefix}image not found: {path}")
            image = Image.open(path)
        image.load()
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"{prefix}cannot load image {source!r}: {error}") from None
    return image.convert("RGB")
