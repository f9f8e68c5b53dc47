"""Loading images named by conversations, with errors that name the example."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmtune.errors import DataError

URL_TIMEOUT_SECONDS = 30


def load_image(source: str, where: str = "") -> Image.Image:
    """Open a local path, file:// path, http(s) URL or data: URL as an RGB image."""
    prefix = f"{where}: " if where else ""
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_SECONDS) as response:
                data = response.read()
            image = Image.open(io.BytesIO(data))
        elif source.startswith("data:"):
            _, _, payload = source.partition(",")
            image = Image.open(io.BytesIO(base64.b64decode(payload)))
        else:
            path = Path(source.removeprefix("file://")).expanduser()
            if not path.is_file():
                raise DataError(f"{prefix}image not found: {path}", "missing image")
            image = Image.open(path)
        image.load()
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, binascii.Error) as error:
        raise DataError(f"{prefix}cannot load image {source!r}: {error}", "corrupt image") from None
    return image.convert("RGB")
