"""Measure training memory and step time per mode, next to `vlmtune estimate`'s number.

On a CUDA GPU (the default) it builds GLM-4.1V-9B-Thinking's shape from the bundled config
with random weights, writes it once to a scratch folder (about 21 GB in bfloat16) and loads
it the way vlmtune does, once per mode. Each mode applies LoRA as the recipe does and runs a
few AdamW steps on a synthetic batch of text only, then on one with an image. It records
torch.cuda.max_memory_allocated and the step time. On CPU (`--model PATH --device cpu`,
e.g. the tiny model) the peak is the CPU tensor memory that torch.profiler records.

    .venv/bin/python benchmarks/gpu_memory.py                                  # GPU, 9B shape
    .venv/bin/python benchmarks/gpu_memory.py --model outputs/tiny-glm4v --device cpu --modes bf16

Results go to outputs/benchmarks/gpu_memory.json and .md; pass --output benchmarks/results to record them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from vlmtune.config import build_config
from vlmtune.encoding.collator import supervised_positions
from vlmtune.model.estimate import GIB, Workload, bundled_config_path, estimate_memory, image_tokens, load_model_config
from vlmtune.model.loading import prepare_for_training, quantization_config
from vlmtune.model.lora import apply_lora
from vlmtune.training.loss import token_mean_loss
from vlmtune.training.memory import cpu_peak_bytes, cuda_peak_bytes, tensor_bytes

# Mode name -> (quantization section, lora section, gradient checkpointing).
MODES = {
    "bf16": ({}, {}, False),
    "bf16-checkpointing": ({}, {}, True),
    "bf16-dora": ({}, {"use_dora": True}, True),
    "8bit": ({"bits": 8}, {}, True),
    "qlora-nf4": ({"bits": 4, "type": "nf4"}, {}, True),
    "qlora-nf4-no-checkpointing": ({"bits": 4, "type": "nf4"}, {}, False),
}
TEXT_TOKEN_RANGE = (32, 1000)  # ordinary tokens in both the tiny and the real vocabulary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Model folder. Default: the bundled GLM-4.1V-9B-Thinking config, random weights.")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu.")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated modes: {', '.join(MODES)}.")
    parser.add_argument("--max-length", type=int, default=1024, help="Tokens per sample, image tokens included.")
    parser.add_argument("--batch-size", type=int, default=1, help="Samples per step.")
    parser.add_argument("--steps", type=int, default=3, help="Training steps per mode; the first is not timed.")
    parser.add_argument("--image-pixels", type=int, default=28 * 28 * 256, help="Pixels of the image in the image batch.")
    parser.add_argument("--output", default="outputs/benchmarks", help="Folder for gpu_memory.json and .md (benchmarks/results to record them).")
    return parser.parse_args()


def random_checkpoint(folder: Path) -> Path:
    """Write the bundled 9B config with random bfloat16 weights, initialised on the GPU."""
    if (folder / "config.json").is_file():
        return folder
    config = load_model_config(str(bundled_config_path("zai-org/GLM-4.1V-9B-Thinking")))
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def synthetic_batch(model_config, batch_size: int, length: int, pixels: int | None, device: torch.device) -> dict:
    """Random text ids, and with pixels one image of that area per sample, in the collator's layout."""
    input_ids = torch.randint(*TEXT_TOKEN_RANGE, (batch_size, length))
    token_types = torch.zeros_like(input_ids)
    batch = {}
    if pixels:
        vision = model_config.vision_config
        patches, tokens = image_tokens(model_config, pixels)
        merge = vision.spatial_merge_size
        side = int((patches // (merge * merge)) ** 0.5) * merge
        tokens = (side // merge) ** 2
        input_ids[:, 1] = model_config.image_start_token_id
        input_ids[:, 2 : 2 + tokens] = model_config.image_token_id
        input_ids[:, 2 + tokens] = model_config.image_end_token_id
        token_types[:, 2 : 2 + tokens] = 1
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        batch["pixel_values"] = torch.randn(batch_size * side * side, width)
        batch["image_grid_thw"] = torch.tensor([[1, side, side]] * batch_size)
        batch["mm_token_type_ids"] = token_types
    # No attention mask: vlmtune's training batches leave it out (ChatCollator.padding_mask).
    batch.update(input_ids=input_ids, labels=input_ids.clone())
    batch["logits_to_keep"] = supervised_positions(batch["labels"])
    return {key: value.to(device) for key, value in batch.items()}


def run_config(model_path: str, mode: str, args: argparse.Namespace):
    quantization, lora, checkpointing = MODES[mode]
    return build_config({
        "model": {"name_or_path": model_path, "device": args.device},
        "data": {"train": ["unused.json"], "max_length": args.max_length},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, **lora},
        "quantization": quantization,
        "train": {"per_device_train_batch_size": args.batch_size, "gradient_checkpointing": checkpointing},
    })


def load_for_training(config, device: torch.device):
    """Load and prepare the model as load_model and the recipe do, without a processor."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    extra = {}
    if config.quantization.bits is not None:
        # bitsandbytes places the quantized weights on one device, named with its index.
        target = device if device.type == "cpu" or device.index is not None else torch.device(device.type, torch.cuda.current_device())
        extra = {"quantization_config": quantization_config(config.quantization), "device_map": {"": target}}
    model = AutoModelForImageTextToText.from_pretrained(config.model.name_or_path, dtype=dtype, **extra)
    if config.quantization.bits is None:
        model.to(device)
    prepare_for_training(model, config.train.gradient_checkpointing)
    model = apply_lora(model, config.lora, log=False)
    model.train()
    return model, dtype


def measure(config, batches: list[dict], device: torch.device, steps: int) -> list[dict]:
    """Load the model once for a mode, train `steps` steps on each batch in turn, and return one result per batch.

    The optimizer state made by the first batch's steps stays for the next ones, as in a run.
    """
    model, dtype = load_for_training(config, device)
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-4)
    results = []
    for batch in batches:
        times: list[float] = []

        def train_steps() -> None:
            for _ in range(steps):
                started = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    # The recipe's loss: logits only where the next token is supervised, chunked cross-entropy.
                    inputs = {key: value for key, value in batch.items() if key != "labels"}
                    loss = token_mean_loss(model(**inputs), batch["labels"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - started)

        if device.type == "cuda":
            peak = cuda_peak_bytes(train_steps, device)
        else:  # the profiler records only new allocations, so add the weights and the optimizer state already there
            state = [value for values in optimizer.state.values() for value in values.values() if torch.is_tensor(value)]
            existing = tensor_bytes(model) + sum(value.nbytes for value in state)
            peak = existing + cpu_peak_bytes(train_steps)
        timed = times[1:] or times
        results.append({"peak_bytes": peak, "step_seconds": statistics.median(timed)})
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def write_results(rows: list[dict], args: argparse.Namespace, model_name: str) -> tuple[Path, Path]:
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "CPU"
    header = {"model": model_name, "device": args.device, "device_name": device_name, "max_length": args.max_length,
              "batch_size": args.batch_size, "steps": args.steps, "torch": torch.__version__}
    json_path = folder / "gpu_memory.json"
    json_path.write_text(json.dumps({"setup": header, "results": rows}, indent=2), encoding="utf-8")
    lines = [
        "# Training memory: measured against `vlmtune estimate`", "",
        f"Model {model_name} on {device_name} ({args.device}), batch {args.batch_size} x {args.max_length} tokens, "
        f"{args.steps} steps per mode, torch {torch.__version__}. Written by `benchmarks/gpu_memory.py`.", "",
        "| mode | batch | measured GiB | estimated GiB | estimate / measured | step s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['batch']} | {row['measured_bytes'] / GIB:.3f} | "
                     f"{row['estimated_bytes'] / GIB:.3f} | {row['ratio']:.2f} | {row['step_seconds']:.3f} |")
    markdown_path = folder / "gpu_memory.md"
    markdown_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return json_path, markdown_path


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    unknown = [mode for mode in args.modes.split(",") if mode not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible; pass --device cpu with --model PATH")
    if args.model:
        model_path, model_name = args.model, args.model
    else:
        if device.type != "cuda":
            raise SystemExit("the 9B shape needs a CUDA GPU; pass --model PATH (e.g. the tiny model) with --device cpu")
        model_path = str(random_checkpoint(Path(tempfile.gettempdir()) / "vlmtune-glm4v-9b-random"))
        model_name = "GLM-4.1V-9B-Thinking shape, random weights"
    model_config = load_model_config(model_path)
    rows = []
    kinds = (("text", None), ("image", args.image_pixels))
    for mode in args.modes.split(","):
        config = run_config(model_path, mode, args)
        batches = [synthetic_batch(model_config, args.batch_size, args.max_length, pixels, device) for _, pixels in kinds]
        for (label, pixels), result in zip(kinds, measure(config, batches, device, args.steps)):
            workload = Workload(args.batch_size, args.max_length, 1 if pixels else 0, pixels)
            estimate = estimate_memory(config, model_config, workload, device="cpu" if device.type == "cpu" else "cuda")
            rows.append({"mode": mode, "batch": label, "measured_bytes": result["peak_bytes"],
                         "estimated_bytes": estimate.total, "ratio": estimate.total / result["peak_bytes"],
                         "step_seconds": result["step_seconds"]})
            print(f"{mode} {label}: measured {result['peak_bytes'] / GIB:.3f} GiB, estimated {estimate.total / GIB:.3f} GiB, "
                  f"{result['step_seconds']:.3f} s/step", flush=True)
    json_path, markdown_path = write_results(rows, args, model_name)
    print(f"results written to {json_path} and {markdown_path}")


if __name__ == "__main__":
    main()
