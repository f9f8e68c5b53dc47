"""Experiment tracking behind one small interface: SwanLab, TensorBoard or nothing.

SwanLab runs offline by default: the run folder is written locally, no account and no
network are needed, and `swanlab sync RUN_FOLDER` can upload it later.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlmtune.config import TrackingSettings
from vlmtune.errors import ConfigError

logger = logging.getLogger(__name__)

SWANLAB_MODES = {"offline": "offline", "local": "local", "cloud": "online"}


@dataclass
class Tracking:
    """Trainer callbacks for one tracking backend, and the run location to show the user."""

    backend: str
    log_dir: Path | None
    callbacks: list[TrainerCallback] = field(default_factory=list)
    writer: Any = None
    """The TensorBoard SummaryWriter. transformers' TensorBoardCallback drops its reference at train
    end, before the last sample generation is logged, so Tracking keeps one. A closed writer reopens
    on its next write, in a new event file of the same folder."""
    swanlab_mode: str = "offline"
    """tracking.swanlab_mode: offline, local or cloud."""

    def run_folder(self) -> Path | None:
        """Return the newest run folder under log_dir (SwanLab writes one `run-*` folder per run)."""
        if self.log_dir is None or not self.log_dir.is_dir():
            return None
        if self.backend != "swanlab":
            return self.log_dir
        runs = self.swanlab_runs()
        return runs[-1] if runs else None

    def swanlab_runs(self) -> list[Path]:
        """Return the SwanLab `run-*` folders under log_dir, oldest first: one per training session."""
        if self.log_dir is None or not self.log_dir.is_dir():
            return []
        return sorted(self.log_dir.glob("run-*"), key=lambda path: path.stat().st_mtime)

    def record_config(self, values: dict[str, Any]) -> None:
        """Attach extra facts (such as length statistics) to the run's config."""
        for callback in self.callbacks:
            if hasattr(callback, "update_config"):
                callback.update_config(values)
        if self.writer is not None:
            self.writer.add_text("vlmtune", json.dumps(values, ensure_ascii=False, indent=1))

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if self.backend == "swanlab":
            import swanlab

            swanlab.log(values, step=step)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def log_texts(self, key: str, rows: list[tuple[str, str]], step: int) -> None:
        """Log (caption, text) pairs, e.g. prompt and reply, as one text table for this step."""
        if self.backend == "swanlab":
            import swanlab

            swanlab.log({key: [swanlab.Text(text, caption=caption) for caption, text in rows]}, step=step)
        if self.writer is not None:
            table = "| prompt | reply |\n|---|---|\n" + "\n".join(
                f"| {caption} | {text} |".replace("\n", " ") for caption, text in rows
            )
            self.writer.add_text(key, table, step)

    def finish(self) -> None:
        """Close the run so its folder is complete; safe to call when no run started."""
        if self.backend == "swanlab":
            import swanlab

            swanlab.finish()
        if self.writer is not None:
            self.writer.close()

    def describe(self) -> str:
        folder = self.run_folder()
        if self.backend == "swanlab" and folder is not None:
            # A resumed run adds one SwanLab run folder per training session, and all of them make up the run.
            runs = self.swanlab_runs()
            if len(runs) > 1:
                text = f"SwanLab run folders, one per training session: {', '.join(str(run) for run in runs)}"
            else:
                text = f"SwanLab run folder: {folder}"
            if self.swanlab_mode == "cloud":
                return text + "\n  the run was uploaded as it trained: see it in your SwanLab project"
            if self.swanlab_mode == "local":
                return text + f"\n  view it in the browser: swanlab watch {self.log_dir}"
            text += "\n  upload to view in the browser: " + "; ".join(f"swanlab sync {run}" for run in runs or [folder])
            return text + "\n  or, to view runs without an account, train with tracking.swanlab_mode=local"
        if self.backend == "tensorboard" and folder is not None:
            return f"TensorBoard logs: {folder}\n  view them with: tensorboard --logdir {folder}"
        return "tracking is off (tracking.backend=none)"


def check_swanlab_login(settings: TrackingSettings) -> None:
    """Fail before the model loads when SwanLab's cloud mode has no API key and no terminal to ask for one.

    SwanLab itself finds that out when the run starts, after the model and data have loaded.
    """
    if settings.backend != "swanlab" or settings.swanlab_mode != "cloud" or sys.stdin.isatty():
        return
    try:
        from swanlab.sdk.internal.settings import Settings

        api_key = Settings().api_key  # from SWANLAB_API_KEY or the .netrc that `swanlab login` saves
    except Exception:  # another SwanLab version: its own error comes when the run starts
        return
    if api_key is None:
        raise ConfigError(
            "tracking.swanlab_mode=cloud needs a SwanLab API key, and none is saved or set, and there is no terminal "
            "to ask for one: run `swanlab login` first or set SWANLAB_API_KEY, or use tracking.swanlab_mode=offline, "
            "which needs no account (upload the run later with swanlab sync)"
        )


def make_tracking(settings: TrackingSettings, output_dir: str, run_config: dict[str, Any]) -> Tracking:
    if settings.backend == "none":
        return Tracking("none", None)
    default_folder = "swanlog" if settings.backend == "swanlab" else "tensorboard"
    log_dir = Path(settings.log_dir or Path(output_dir) / default_folder)
    if settings.backend == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        writer = SummaryWriter(log_dir=str(log_dir))
        return Tracking("tensorboard", log_dir, callbacks=[TensorBoardCallback(tb_writer=writer)], writer=writer)

    from swanlab.integration.transformers import SwanLabCallback

    callback = SwanLabCallback(
        project=settings.project,
        experiment_name=settings.experiment_name or Path(output_dir).resolve().name,
        mode=SWANLAB_MODES[settings.swanlab_mode],
        log_dir=str(log_dir),
    )
    callback.update_config({"vlmtune": run_config})
    logger.info("tracking with SwanLab in %s mode under %s", settings.swanlab_mode, log_dir)
    return Tracking("swanlab", log_dir, callbacks=[callback], swanlab_mode=settings.swanlab_mode)
