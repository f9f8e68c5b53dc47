"""Memory of the training samples: token ids as NumPy views of the encoded table against Python lists.

    .venv/bin/python benchmarks/sample_memory.py               # the persona data 60 times over
    .venv/bin/python benchmarks/sample_memory.py --copies 200

A cache hit memory-maps the encoded table, and each sample's token ids, labels and token types
are read-only views of its int32 and int8 buffers. Before, they were lists of Python ints from
the table's `to_pydict`, which the "lists" variant makes again. The script encodes the bundled persona data, repeated `--copies`
times with a number added to each instruction so that no two records are equal. It then loads the
table from the cache both ways, each in its own process. It prints the anonymous memory
(RssAnon) that the loaded samples take, per token, and the time of the cache hit. Results go to
outputs/benchmarks/ (or --out) as JSON and Markdown.
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
DATA = REPO_ROOT / "data" / "persona_zh" / "train.json"
VARIANTS = {"lists": "lists of Python ints (before)", "arrays": "NumPy views of the table (vlmtune)"}


def write_data(folder: Path, copies: int) -> Path:
    records = json.loads(DATA.read_text(encoding="utf-8"))
    rows = [dict(record, instruction=f"{record['instruction']} #{copy}") for copy in range(copies) for record in records]
    path = folder / "train.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def run_variant(args) -> dict:
    """Child process: load the encoded samples from the cache and measure the memory they take."""
    import logging

    import pyarrow
    import pyarrow.ipc

    from vlmtune.config import build_config
    from vlmtune.data.loading import load_data
    from vlmtune.encoding import ConversationEncoder
    from vlmtune.encoding.cache import encode_dataset
    from vlmtune.model.loading import load_processor_and_stop_ids

    logging.disable(logging.INFO)
    config = build_config({
        "model": {"name_or_path": args.model, "hub": "local", "device": "cpu"},
        "data": {"train": [args.data], "max_length": 512, "val_size": 0, "cache_dir": str(Path(args.workdir) / "cache")},
        "train": {"output_dir": str(Path(args.workdir) / "unused")},
        "tracking": {"backend": "none"},
    })
    processor, stop_ids = load_processor_and_stop_ids(config.model)
    encoder = ConversationEncoder.from_settings(processor, stop_ids, config.data)
    conversations = load_data(config.data).train
    encode_dataset(encoder, conversations, config.data)  # encodes and saves on the first variant, a cache hit later
    gc.collect()
    before = anonymous_mib()
    started = time.perf_counter()
    report = encode_dataset(encoder, conversations, config.data)
    if args.variant == "lists":
        # As the samples were built before: one `to_pydict` of the table's columns.
        [path] = (Path(args.workdir) / "cache").glob("*.arrow")
        table = pyarrow.ipc.open_file(pyarrow.memory_map(str(path))).read_all()
        columns = table.select(["input_ids", "labels", "mm_token_type_ids"]).to_pydict()
        del table
        assert len(columns["input_ids"]) == len(report.samples), "every record becomes a sample"
        for sample, input_ids, labels, token_types in zip(report.samples, *columns.values()):
            sample.input_ids, sample.labels = input_ids, labels
            if sample.mm_token_type_ids is not None:
                sample.mm_token_type_ids = token_types
        del columns
    seconds = time.perf_counter() - started
    gc.collect()
    samples_mib = anonymous_mib() - before
    tokens = sum(len(sample) for sample in report.samples)
    return {
        "samples": len(report.samples),
        "tokens": tokens,
        "cache_hit": report.from_cache,
        "cache_hit_seconds": seconds,
        "samples_anonymous_mib": samples_mib,
        "bytes_per_token": samples_mib * 2**20 / tokens,
    }


def markdown(report: dict) -> str:
    rows = report["rows"]
    any_row = next(iter(rows.values()))
    lines = [
        "# Training samples in memory: lists against NumPy views",
        "",
        f"Measured {report['date']} by `{report['command']}`.",
        "",
        f"The bundled persona data {report['copies']} times over: {any_row['samples']:,} samples, "
        f"{any_row['tokens']:,} tokens, loaded from the encoding cache.",
        "",
        "| variant | samples in memory (MiB) | bytes per token | cache hit (s) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {VARIANTS[name]} | {row['samples_anonymous_mib']:.1f} | {row['bytes_per_token']:.1f} | {row['cache_hit_seconds']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=60, help="How many times the persona data is repeated.")
    add_common_arguments(parser, OUTPUT_DIR)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    with tempfile.TemporaryDirectory(prefix="vlmtune-samples-") as workdir:
        if args.model is None:
            args.model = tiny_model(workdir, DATA)
        data = write_data(Path(workdir), args.copies)
        rows = run_variants(__file__, VARIANTS, ["--workdir", workdir, "--data", str(data), "--model", args.model])

    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/sample_memory.py " + " ".join(sys.argv[1:]),
        "copies": args.copies,
        "rows": rows,
    }
    write_results(args.out, "sample_memory", report, markdown(report))

if __name__ == "__main__":
    main()
