"""Names of the files a training run writes into train.output_dir, and the search for an earlier run there.

The training recipe writes these files. The web UI follows and replaces runs with them, without
importing the training code.
"""

from __future__ import annotations

from pathlib import Path

PROGRESS_FILE = "progress.jsonl"
"""Steps, losses and checkpoints as they happen, one JSON object per line."""

LENGTH_HISTOGRAM = "length_histogram.png"
"""The PNG that `vlmtune data stats` writes into train.output_dir by default.

It describes the config's data rather than one run, and is often written before the first run.
So it is not in RUN_OUTPUTS, which means it does not count as an earlier run and --overwrite keeps it.
"""

# The run's own files in train.output_dir, besides the processor files that the next run rewrites.
# train_config.yaml and train.log belong to the web UI, which starts the run with them.
RUN_OUTPUTS = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "config.yaml",
    "run_manifest.json",
    "eval_report.md",
    "eval_report.json",
    "loss.png",
    PROGRESS_FILE,
    "initial_adapter",
    "swanlog",
    "tensorboard",
    "eval",
    "eval_merged",
)
# Files that only a run that started training leaves; config.yaml alone is a run that failed to set up.
RUN_MARKERS = ("adapter_model.safetensors", "run_manifest.json", PROGRESS_FILE)


def earlier_run_files(output_dir: str | Path) -> list[Path]:
    """Return the files and folders of an earlier run in output_dir (checkpoints first), or [] when there is none."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    checkpoints = sorted(folder.glob("checkpoint-*"))
    if not checkpoints and not any((folder / name).exists() for name in RUN_MARKERS):
        return []
    return checkpoints + [folder / name for name in RUN_OUTPUTS if (folder / name).exists()]
