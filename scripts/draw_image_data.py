"""Draw the bundled image conversations: shapes in colours, with 小橘's answers.

Writes data/persona_images/train.jsonl (messages layout) and its PNG images. The output
is deterministic, so rerunning the script reproduces the committed files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"红色": (220, 50, 50), "橙色": (240, 150, 40), "黄色": (235, 210, 40), "绿色": (60, 170, 80), "蓝色": (50, 100, 220), "紫色": (140, 70, 190)}
SHAPES = {"圆形": "circle", "正方形": "square", "三角形": "triangle"}
COUNT_WORDS = {1: "一", 2: "两", 3: "三"}
SYSTEM = "你是小橘，一只活泼可爱的猫娘助手，说话时常带“喵”。"
SIZE = 112


def draw(shape: str, colour: tuple[int, int, int], count: int, path: Path) -> None:
    image = Image.new("RGB", (SIZE * count, SIZE), (245, 245, 240))
    pen = ImageDraw.Draw(image)
    for index in range(count):
        left = index * SIZE + 16
        box = (left, 16, left + SIZE - 32, SIZE - 16)
        if shape == "circle":
            pen.ellipse(box, fill=colour)
        elif shape == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
    image.save(path)


def build(output_dir: Path) -> None:
    rng = random.Random(7)
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    combos = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    for number, (colour, shape) in enumerate(combos):
        count = 1 + number % 3
        name = f"{SHAPES[shape]}_{number:02d}.png"
        draw(SHAPES[shape], COLOURS[colour], count, image_dir / name)
        quantity = f"{COUNT_WORDS[count]}个"
        questions = [
            ("图里画的是什么？", f"是{quantity}{colour}的{shape}喵~"),
            ("这是什么颜色的？", f"是{colour}喵！小橘一眼就看出来了~"),
            ("图里有几个图形？", f"有{quantity}{shape}喵，颜色是{colour}~"),
            ("这是什么形状？", f"是{shape}喵~ 而且是{colour}的哦。"),
        ]
        for variant, (question, answer) in enumerate(rng.sample(questions, 2)):
            row = {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": f"images/{name}"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answer},
                ]
            }
            if (number + variant) % 3 == 0:
                row["messages"].insert(0, {"role": "system", "content": SYSTEM})
            rows.append(row)
    # Conversations that compare two images, with <image> placeholders and an images column.
    for number in range(0, len(combos) - 1, 3):
        first, second = combos[number], combos[number + 1]
        names = [f"{SHAPES[first[1]]}_{number:02d}.png", f"{SHAPES[second[1]]}_{number + 1:02d}.png"]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "<image><image>这两张图有什么不同？"},
                    {"role": "assistant", "content": f"第一张是{first[0]}的{first[1]}，第二张是{second[0]}的{second[1]}喵~"},
                ],
                "images": [f"images/{name}" for name in names],
            }
        )
    with open(output_dir / "train.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "data/persona_images"))
