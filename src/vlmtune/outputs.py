"""Names of the files a training run writes into train.output_dir, and the search for an earlier run there.

The training recipe writes these files. The web UI follows and replaces runs with them, without
importing the training code.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

PROGRESS_FILE = "progress.jsonl"
"""Steps, losses and checkpoints as they happen, one JSON object per line."""

LENGTH_HISTOGRAM = "length_histogram.png"
"""The PNG that `vlmtune data stats` writes into train.output_dir by default.

It describes the config's data rather than one run, and is often written before the first run.
So it is not in RUN_OUTPUTS, which means it does not count as an earlier run and --overwrite keeps it.
"""

MODEL_CARD = "README.md"
"""The adapter's model card, which peft's save_pretrained writes beside the adapter."""

BASE_SAMPLES = "samples_base.json"
"""The base model's replies to the sample prompts, which a resumed run reuses instead of generating them again."""

# The run's own files in train.output_dir, besides the processor files that the next run rewrites.
# train_config.yaml and train.log belong to the web UI, which starts the run with them.
RUN_OUTPUTS = (
    "adapter_model.safetensors",
    "adapter_config.json",
    MODEL_CARD,
    "config.yaml",
    "run_manifest.json",
    "eval_report.md",
    "eval_report.json",
    BASE_SAMPLES,
    "loss.png",
    PROGRESS_FILE,
    "initial_adapter",
    "swanlog",
    "tensorboard",
    "eval",
    "eval_merged",
)
# Files that only a run that trained leaves. config.yaml alone, or a progress file without a
# step, is a run that failed before its first step.
RUN_MARKERS = ("adapter_model.safetensors", "run_manifest.json")
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")
"""The Trainer's checkpoint folders: checkpoint-N, N the global step."""


def _progress_has_steps(path: Path) -> bool:
    """Return whether a progress file records a training step; an unreadable line counts as one."""
    if not path.is_file():
        return False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return True
        if not isinstance(record, dict) or record.get("step", 1) > 0:
            return True
    return False


def earlier_run_files(output_dir: str | Path) -> list[Path]:
    """Return the files and folders of an earlier run in output_dir (checkpoints first), or [] when there is none."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    checkpoints = sorted(path for path in folder.iterdir() if path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name))
    trained = any((folder / name).exists() for name in RUN_MARKERS) or _progress_has_steps(folder / PROGRESS_FILE)
    if not checkpoints and not trained:
        return []
    return checkpoints + [folder / name for name in RUN_OUTPUTS if (folder / name).exists()]


def _umask() -> int:
    """Return the process's umask, from /proc on Linux, else by setting and restoring it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_weight_files(folder: str | Path) -> None:
    """Give the safetensors files in `folder` the mode that a new file gets under the umask (0644 under 022).

    safetensors 0.8 writes through a temporary file that has mode 0600 and renames it into place. Saved
    weights were therefore readable by their owner only, unlike the JSON files beside them, and another
    account, such as a vLLM server's, could not load them.
    """
    mode = 0o666 & ~_umask()
    for path in Path(folder).glob("*.safetensors"):
        if path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def probe_writable(folder: Path) -> None:
    """Write and remove a test file in `folder`, or in its nearest existing parent if it does not exist yet.

    Raises OSError where that fails, and creates no folder, so a run that stops at a later check leaves none behind.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    probe = existing / f".vlmtune-write-test-{os.getpid()}"
    probe.touch()
    probe.unlink()
