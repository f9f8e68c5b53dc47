"""Image data: keeping each image's pixel values against keeping its source, in one run.

    .venv/bin/python benchmarks/image_data.py                # 40 generated photos, tiny GLM-4.1V processor
    .venv/bin/python benchmarks/image_data.py --images 200 --max-pixels 1003520

vlmtune keeps the source of an image given as a local file or data: URL, and the collator
processes the images of each batch again. An image that arrives decoded (as the OpenAI-compatible
server receives one) keeps its pixel values, as every image did before. This script encodes the
same generated photos both ways, each in its own process. For each variant it prints the first
encoding (no cache), a cache hit and the cache file's size. It also prints the anonymous memory
that the encoded samples take, and the time to batch every sample once, which for sources
includes processing the images again. Results go to outputs/benchmarks/ (or --out) as JSON and
Markdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import add_common_arguments, anonymous_mib, run_variants, tiny_model, write_results  # this script's folder is on sys.path when it runs

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO_ROOT / "outputs" / "benchmarks"
VARIANTS = {"pixels": "pixel values kept (decoded images)", "sources": "sources kept (image files, vlmtune)"}


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """Write `count` noise photos (noise compresses badly, like real photos) and a messages-layout JSONL naming them."""
    from PIL import Image

    rows = []
    for index in range(count):
        path = folder / f"photo_{index:03d}.jpg"
        Image.effect_noise(size, 60).convert("RGB").save(path, quality=90)
        content = [{"type": "image", "image": str(path)}, {"type": "text", "text": "图里有什么？"}]
        rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "有很多噪点喵~"}]})
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return data


def run_variant(args) -> dict:
    """Child process: encode twice (no cache, then a cache hit) and batch every sample once."""
    from vlmtune.config import build_config
    from vlmtune.data import ImagePart, Message
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.loading import load_data
    from vlmtune.encoding import ChatCollator, ConversationEncoder
    from vlmtune.encoding.cache import encode_dataset
    from vlmtune.encoding.images import load_image
    from vlmtune.model.loading import load_processor_and_stop_ids

    cache = Path(args.workdir) / f"cache-{args.variant}"
    config = build_config({
        "model": {"name_or_path": args.model, "hub": "local", "device": "cpu"},
        "data": {"train": [args.data], "max_length": args.max_length, "max_pixels": args.max_pixels, "cache_dir": str(cache)},
        "train": {"output_dir": str(Path(args.workdir) / "unused")},
        "tracking": {"backend": "none"},
    })
    processor, stop_ids = load_processor_and_stop_ids(config.model)
    encoder = ConversationEncoder.from_settings(processor, stop_ids, config.data)
    conversations = load_data(config.data).train
    if args.variant == "pixels":
        # Decoded images have no source to open again, so encoding keeps their pixel values.
        conversations = [
            Conversation(
                [Message(message.role, [ImagePart(part.source, decoded=load_image(part.source)) if isinstance(part, ImagePart) else part
                                        for part in message.content]) for message in conversation.messages],
                conversation.source,
            )
            for conversation in conversations
        ]
    gc.collect()
    before = anonymous_mib()
    started = time.perf_counter()
    first = encode_dataset(encoder, conversations, config.data)
    first_seconds = time.perf_counter() - started
    del first
    gc.collect()
    # The same conversation objects: the key of a decoded image includes the image object itself.
    started = time.perf_counter()
    hit = encode_dataset(encoder, conversations, config.data)
    hit_seconds = time.perf_counter() - started
    del conversations  # with their decoded images, which the samples do not need
    gc.collect()
    samples_mib = anonymous_mib() - before
    collator = ChatCollator(pad_token_id=processor.tokenizer.pad_token_id, pixel_loader=encoder.pixel_values)
    started = time.perf_counter()
    for start in range(0, len(hit.samples), 4):
        collator(hit.samples[start : start + 4])
    batch_seconds = time.perf_counter() - started
    [table] = list(cache.glob("*.arrow"))
    return {
        "samples": len(hit.samples),
        "cache_hit": hit.from_cache,
        "first_encoding_seconds": first_seconds,
        "cache_hit_seconds": hit_seconds,
        "cache_file_mib": table.stat().st_size / 2**20,
        "samples_anonymous_mib": samples_mib,
        "batching_seconds": batch_seconds,
    }


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = rows["pixels"]
    lines = [
        "# Image data: pixel values kept against sources kept",
        "",
        f"Measured {report['date']} by `{report['command']}`.",
        "",
        f"{report['images']} generated photos of {report['size'][0]}x{report['size'][1]} (JPEG), data.max_pixels "
        f"{report['max_pixels']:,}, the tiny GLM-4.1V model's processor, torch threads {report['threads']}. "
        "Ratios are sources kept / pixel values kept.",
        "",
        "| variant | first encoding (s) | cache hit (s) | cache file (MiB) | samples in memory (MiB) | batching every sample once (s) |",
        "|---|---|---|---|---|---|",
    ]
    keys = ("first_encoding_seconds", "cache_hit_seconds", "cache_file_mib", "samples_anonymous_mib", "batching_seconds")
    for name, row in rows.items():
        cells = []
        for key in keys:
            text = f"{row[key]:.2f}"
            if row is not base and base[key] > 0:
                text += f" ({row[key] / base[key]:.3f}x)"
            cells.append(text)
        lines.append(f"| {VARIANTS[name]} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--max-pixels", type=int, default=1003520)
    parser.add_argument("--max-length", type=int, default=4096)
    add_common_arguments(parser, OUTPUT_DIR)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    with tempfile.TemporaryDirectory(prefix="vlmtune-images-") as workdir:
        if args.model is None:
            args.model = tiny_model(workdir, REPO_ROOT / "data" / "persona_zh" / "train.json")
        data = write_photos(Path(workdir), args.images, tuple(args.size))
        arguments = ["--workdir", workdir, "--data", str(data), "--model", args.model,
                     "--max-pixels", str(args.max_pixels), "--max-length", str(args.max_length)]
        rows = run_variants(__file__, VARIANTS, arguments)

    import torch

    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/image_data.py " + " ".join(sys.argv[1:]),
        "images": args.images,
        "size": list(args.size),
        "max_pixels": args.max_pixels,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    write_results(args.out, "image_data", report, markdown(report))

if __name__ == "__main__":
    main()
