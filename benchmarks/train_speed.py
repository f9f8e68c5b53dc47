"""Training speed and memory: the tutorial's approach against vlmtune, in one run, same model and data.

    .venv/bin/python benchmarks/train_speed.py             # tiny GLM-4.1V built offline, bundled data
    .venv/bin/python benchmarks/train_speed.py --model PATH --device cuda

Each variant runs in its own process, so peak memory is measured per variant, twice: the
peak RSS the kernel records, and the peak of anonymous memory (RssAnon, sampled every 5 ms on
Linux). RSS also counts the shared-library pages a process maps, and how many of those are
resident depends on the page cache, so it varies between runs of the same code by up to a few
hundred MiB. Anonymous memory is what the process allocates itself: weights, activations,
optimizer state.

The variants:

- baseline: the tutorial's code, re-written here: `datasets.map` over a hand-written prompt
  one example at a time, `DataCollatorForSeq2Seq`, random order, gradient checkpointing,
  the transformers Trainer;
- vlmtune: `vlmtune train` defaults (chat-template encoding through the keyed cache,
  batches grouped by length, gradient checkpointing on from 1B parameters);
- vlmtune, cache hit: the same preprocessing again, loaded from the cache;
- vlmtune + checkpointing, vlmtune padding-free: the cost of those switches.

All variants train one epoch with the same batch size, learning rate, LoRA rank and
dtype. `--repeat N` runs all variants N times, round by round, each round with a fresh
encoding cache. The table shows each measure's median over the rounds, and each target its
median ratio and range, a ratio taken within one round so that a change in the machine's load
between rounds moves both sides. Results go to outputs/benchmarks/ (or --out;
benchmarks/results/ contains the recorded ones) as JSON and Markdown, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO_ROOT / "outputs" / "benchmarks"
DATA = REPO_ROOT / "data" / "persona_zh" / "train.json"
SYSTEM_PROMPT = "你是小橘，一只活泼可爱的猫娘助手，说话时常带“喵”。"
# The tutorial's LoRA target list (a Llama list; on GLM-4.1V it misses gate_up_proj, see the README).
TUTORIAL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    "baseline": "tutorial code",
    "vlmtune": "vlmtune defaults",
    "vlmtune_cached": "vlmtune, cache hit",
    "vlmtune_checkpointing": "vlmtune + gradient checkpointing",
    "vlmtune_padding_free": "vlmtune, padding-free batches",
}


class TokenCounter:
    """Wraps a data collator and counts real and computed (real + padding) tokens."""

    def __init__(self, collator):
        self.collator = collator
        self.real = 0
        self.computed = 0

    def __call__(self, features):
        batch = self.collator(features)
        # vlmtune's collator may leave the attention mask out, so real tokens are counted from the inputs.
        self.real += sum(len(feature["input_ids"]) for feature in features)
        self.computed += batch["input_ids"].numel()
        return batch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonymousMemoryPeak:
    """Peak of this process's anonymous memory, sampled from /proc/self/status by a daemon thread.

    The kernel keeps no peak of anonymous memory, so a spike shorter than the interval can be missed.
    """

    STATUS = Path("/proc/self/status")

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_kib = 0
        if self.STATUS.is_file():
            threading.Thread(target=self._sample, daemon=True).start()

    def current_kib(self) -> int:
        for line in self.STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, self.current_kib())
            time.sleep(self.interval)

    def peak_mib(self) -> float | None:
        if not self.STATUS.is_file():
            return None
        self.peak_kib = max(self.peak_kib, self.current_kib())
        return self.peak_kib / 1024


def training_arguments(args, output_dir: str, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=1,
        learning_rate=1e-4,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=args.device == "cpu",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def run_baseline(args, workdir: Path) -> dict:
    import pandas
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Glm4vForConditionalGeneration, Trainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    max_length = args.max_length

    def process_func(example):
        instruction = tokenizer(
            f"[gMASK]<sop><|system|>\n{SYSTEM_PROMPT}"
            f"<|user|>\n{example['instruction'] + example['input']}"
            f"<|assistant|>\n<think></think>\n",
            add_special_tokens=False,
        )
        response = tokenizer(f"{example['output']}", add_special_tokens=False)
        input_ids = instruction["input_ids"] + response["input_ids"]
        attention_mask = instruction["attention_mask"] + response["attention_mask"]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"]
        return {"input_ids": input_ids[:max_length], "attention_mask": attention_mask[:max_length], "labels": labels[:max_length]}

    started = time.perf_counter()
    frame = pandas.read_json(args.data)
    dataset = Dataset.from_pandas(frame)
    tokenized = dataset.map(process_func, remove_columns=dataset.column_names)
    preprocess_seconds = time.perf_counter() - started

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = Glm4vForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(args.device)
    model.enable_input_require_grads()
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=TUTORIAL_TARGETS, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0)
    model = get_peft_model(model, lora)
    counter = TokenCounter(DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True))
    trainer = Trainer(
        model=model,
        args=training_arguments(
            args, str(workdir / "baseline"), gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=dtype == torch.bfloat16,
        ),
        train_dataset=tokenized,
        data_collator=counter,
    )
    result = trainer.train()
    return {
        "examples": len(tokenized),
        "preprocess_seconds": preprocess_seconds,
        "train_seconds": result.metrics["train_runtime"],
        "real_tokens": counter.real,
        "computed_tokens": counter.computed,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": result.metrics["train_loss"],
    }


def run_vlmtune(args, workdir: Path, variant: str) -> dict:
    from vlmtune.config import build_config
    from vlmtune.data.loading import load_data
    from vlmtune.encoding import ConversationEncoder
    from vlmtune.encoding.cache import encode_dataset
    from vlmtune.model.loading import load_processor_and_stop_ids
    from vlmtune.training.recipe import LoraRecipe

    train = {
        "output_dir": str(workdir / variant),
        "num_train_epochs": 1,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "learning_rate": 1e-4,
        "warmup_steps": 0,
        "logging_steps": 10,
        "save_steps": 10**6,
        "seed": 0,
    }
    if variant == "vlmtune_checkpointing":
        train["gradient_checkpointing"] = True
    if variant == "vlmtune_padding_free":
        train["padding_free"] = True
    config = build_config(
        {
            "model": {"name_or_path": args.model, "hub": "local", "device": args.device},
            "data": {
                "train": [args.data], "max_length": args.max_length, "system_prompt": SYSTEM_PROMPT,
                "cache_dir": str(workdir / f"cache-{args.round}"), "on_overlength": "trim_history",
            },
            "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0},
            "train": train,
            "tracking": {"backend": "none"},
            "evaluation": {"generate": False},
        }
    )
    # The processor alone encodes. The recipe then finds the encoded samples in the cache, so the
    # process encodes once and loads the weights once, as `vlmtune train` does.
    processor, stop_ids = load_processor_and_stop_ids(config.model)
    started = time.perf_counter()
    data = load_data(config.data)
    encoder = ConversationEncoder.from_settings(processor, stop_ids, config.data)
    report = encode_dataset(encoder, data.train, config.data)
    preprocess_seconds = time.perf_counter() - started
    result = {"examples": len(report.samples), "preprocess_seconds": preprocess_seconds, "cache_hit": report.from_cache}
    if variant == "vlmtune_cached":
        return result
    del processor, encoder, data, report
    recipe = LoraRecipe(config, overwrite=True)
    recipe.setup()
    counter = TokenCounter(recipe.trainer.data_collator)
    recipe.trainer.data_collator = counter
    recipe.train()
    model = recipe.loaded.model
    return {
        **result,
        "train_seconds": recipe.metrics["train_runtime"],
        "real_tokens": counter.real,
        "computed_tokens": counter.computed,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": recipe.metrics["train_loss"],
    }


def run_variant(args) -> None:
    """Child process: run one variant and print its measurements as JSON on the last line."""
    workdir = Path(args.workdir)
    anonymous = AnonymousMemoryPeak()
    if args.variant == "baseline":
        result = run_baseline(args, workdir)
    else:
        result = run_vlmtune(args, workdir, args.variant)
    result["peak_rss_mib"] = peak_rss_mib()
    result["peak_anonymous_mib"] = anonymous.peak_mib()
    if args.device == "cuda":
        import torch

        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    description = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
    return description


def measures(result: dict) -> dict:
    """Add the rates and shares derived from one run's counts and times."""
    row = {**result, "preprocess_examples_per_second": result["examples"] / result["preprocess_seconds"]}
    if "train_seconds" in result:
        row["train_tokens_per_second"] = result["real_tokens"] / result["train_seconds"]
        row["padding_share"] = 1 - result["real_tokens"] / result["computed_tokens"]
    return row


def summarise(name: str, runs: list[dict]) -> dict:
    """Build one variant's row: the median of each numeric measure over the rounds, and the rounds themselves."""
    runs = [measures(run) for run in runs]
    row = {"variant": VARIANTS[name]}
    for key, value in runs[0].items():
        numbers = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(numbers) == len(runs):
            # Counts stay whole numbers: the lower median of an even number of rounds.
            value = statistics.median_low(numbers) if isinstance(value, int) else statistics.median(numbers)
        row[key] = value
    row["runs"] = runs
    return row


def paired_ratios(rows: dict, name: str, key: str) -> list[float]:
    """Return variant / baseline for each round, both measured in that round."""
    return [ours[key] / base[key] for ours, base in zip(rows[name]["runs"], rows["baseline"]["runs"])]


def ratio_text(ratios: list[float], digits: int = 2) -> str:
    text = f"{statistics.median(ratios):.{digits}f}x"
    if len(ratios) > 1:
        text += f" ({min(ratios):.{digits}f}x to {max(ratios):.{digits}f}x over {len(ratios)} rounds)"
    return text


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = rows["baseline"]
    lines = [
        f"# Training speed: {report['model_name']}",
        "",
        f"Measured {report['date']} by `{report['command']}`.",
        "",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in report["machine"].items()),
        "",
        f"Data: {report['examples']} examples of `{report['data']}`; one epoch, batch {report['batch_size']} x "
        f"{report['grad_accum']} accumulation, max_length {report['max_length']}, LoRA rank {report['rank']}. "
        f"Each figure is the median of {report['repeat']} round(s).",
        "",
        "| variant | preprocessing (examples/s) | training tokens/s (real tokens) | padding share | peak RSS (MiB) "
        "| peak anonymous memory (MiB) | epoch wall time (s) | trainable parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(name: str, key: str, fmt: str, ratio: bool = True) -> str:
        row = rows[name]
        if row.get(key) is None:
            return "–"
        text = format(row[key], fmt)
        if ratio and row is not base and base.get(key):
            text += f" ({statistics.median(paired_ratios(rows, name, key)):.2f}x)"
        return text

    for name, row in rows.items():
        lines.append(
            f"| {row['variant']} | {cell(name, 'preprocess_examples_per_second', '.0f')} "
            f"| {cell(name, 'train_tokens_per_second', '.0f')} | {cell(name, 'padding_share', '.1%', ratio=False)} "
            f"| {cell(name, 'peak_rss_mib', '.0f')} | {cell(name, 'peak_anonymous_mib', '.0f')} "
            f"| {cell(name, 'train_seconds', '.1f')} "
            f"| {cell(name, 'trainable_parameters', ',', ratio=False)} |"
        )
    lines += ["", "Ratios in brackets are variant / baseline, the median of the ratios within each round.", ""]
    targets = report["targets"]
    lines += ["| target (vlmtune defaults against the baseline) | measured | met |", "|---|---|---|"]
    for target in targets:
        lines.append(f"| {target['target']} | {target['measured']} | {'yes' if target['met'] else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def targets(rows: dict) -> list[dict]:
    """Return each target's median ratio over the rounds. A target is met when that median meets it."""
    ours = rows["vlmtune"]
    wall = paired_ratios(rows, "vlmtune", "train_seconds")
    cold = paired_ratios(rows, "vlmtune", "preprocess_examples_per_second")
    warm = paired_ratios(rows, "vlmtune_cached", "preprocess_examples_per_second")
    rss = paired_ratios(rows, "vlmtune", "peak_rss_mib")
    found = [
        {"target": "epoch wall time <= 0.5x", "measured": ratio_text(wall), "met": statistics.median(wall) <= 0.5},
        {"target": "padding share <= 3%", "measured": f"{ours['padding_share']:.1%}", "met": ours["padding_share"] <= 0.03},
        {"target": "preprocessing >= 5x faster (cache hit)", "measured": ratio_text(warm, 1), "met": statistics.median(warm) >= 5},
        {"target": "preprocessing >= 5x faster (first run, no cache)", "measured": ratio_text(cold, 1),
         "met": statistics.median(cold) >= 5},
        {"target": "peak RSS no higher", "measured": ratio_text(rss), "met": statistics.median(rss) <= 1.0},
    ]
    if ours.get("peak_anonymous_mib") and rows["baseline"].get("peak_anonymous_mib"):
        anonymous = paired_ratios(rows, "vlmtune", "peak_anonymous_mib")
        found.append({"target": "peak anonymous memory no higher", "measured": ratio_text(anonymous),
                      "met": statistics.median(anonymous) <= 1.0})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Model folder. Default: build the tiny GLM-4.1V offline.")
    parser.add_argument("--data", default=str(DATA), help="Alpaca JSON file.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="Rounds of all variants; the table shows medians.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated; baseline, vlmtune and vlmtune_cached are needed for the targets.")
    parser.add_argument("--out", default=str(OUTPUT_DIR), help="Results folder (benchmarks/results to record them).")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="vlmtune-bench-") as workdir:
        if args.model is None:
            from vlmtune.model.tiny import build_tiny_model

            args.model = str(build_tiny_model(Path(workdir) / "tiny-glm4v", [DATA], seed=0))
            model_name = "tiny-glm4v"
        else:
            model_name = Path(args.model).name
        names = args.variants.split(",")
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for round_index in range(args.repeat):
            for name in names:
                command = [
                    sys.executable, __file__, "--variant", name, "--workdir", workdir, "--round", str(round_index),
                    "--model", args.model, "--data", args.data, "--device", args.device,
                    "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                    "--max-length", str(args.max_length), "--rank", str(args.rank),
                ]
                print(f"round {round_index + 1}/{args.repeat}: running {name} ...", flush=True)
                finished = subprocess.run(command, capture_output=True, text=True)
                if finished.returncode != 0:
                    sys.exit(f"{name} failed:\n{finished.stderr[-4000:]}")
                runs[name].append(json.loads(finished.stdout.strip().splitlines()[-1]))
                print(json.dumps(measures(runs[name][-1]), ensure_ascii=False), flush=True)
        rows = {name: summarise(name, runs[name]) for name in names}

    report = {
        "model_name": model_name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "data": str(Path(args.data).resolve().relative_to(REPO_ROOT)) if Path(args.data).resolve().is_relative_to(REPO_ROOT) else args.data,
        "examples": rows["baseline"]["examples"] if "baseline" in rows else None,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_length": args.max_length,
        "rank": args.rank,
        "repeat": args.repeat,
        "rows": rows,
    }
    if {"baseline", "vlmtune", "vlmtune_cached"} <= rows.keys():
        report["targets"] = targets(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_speed_{model_name}_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    if "targets" in report:
        (out / f"{stem}.md").write_text(markdown(report), encoding="utf-8")
        print(markdown(report))
    print(f"wrote {out / stem}.json")


if __name__ == "__main__":
    main()
