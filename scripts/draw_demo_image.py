"""Draw the demo's test image (an orange cat face) with PIL, so no image is downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw


def draw_cat(path: Path, size: int = 224) -> None:
    image = Image.new("RGB", (size, size), (200, 230, 255))
    draw = ImageDraw.Draw(image)
    orange, dark = (240, 150, 40), (60, 40, 20)
    draw.polygon([(40, 90), (70, 20), (105, 75)], fill=orange)  # left ear
    draw.polygon([(184, 90), (154, 20), (119, 75)], fill=orange)  # right ear
    draw.ellipse((30, 50, 194, 204), fill=orange)  # head
    draw.ellipse((70, 100, 95, 125), fill=dark)  # eyes
    draw.ellipse((129, 100, 154, 125), fill=dark)
    draw.polygon([(104, 140), (120, 140), (112, 150)], fill=(230, 100, 120))  # nose
    for offset in (-8, 0, 8):  # whiskers
        draw.line((40, 150 + offset, 95, 148), fill=dark, width=2)
        draw.line((184, 150 + offset, 129, 148), fill=dark, width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


if __name__ == "__main__":
    draw_cat(Path(sys.argv[1] if len(sys.argv) > 1 else "data/images/orange_cat.png"))
