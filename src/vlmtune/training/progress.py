"""Trainer callbacks that let another process follow and stop a run, and that log its metrics.

`ProgressFileCallback` appends one JSON line per event to OUTPUT_DIR/progress.jsonl:

    {"event": "train_begin", "step": 0, "max_steps": 60, "time": 1764880000.0}
    {"event": "log", "step": 10, "max_steps": 60, "logs": {"loss": 2.31, "learning_rate": 0.003}, ...}
    {"event": "save", "step": 20, "max_steps": 60, "checkpoint": "outputs/run/checkpoint-20", ...}
    {"event": "stop_requested", "step": 23, "max_steps": 60, "signal": "SIGINT", ...}
    {"event": "train_end", "step": 23, "max_steps": 60, ...}

`StopOnSignalCallback` turns SIGINT or SIGTERM during training into a clean stop: the
Trainer saves a checkpoint at the end of the current step and leaves its loop, so the
recipe still saves the adapter, config.yaml and the run manifest. A second signal
interrupts at once.
"""

from __future__ import annotations

import json
import os
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from vlmtune.outputs import PROGRESS_FILE, share_weight_files

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ProgressFileCallback(TrainerCallback):
    """Appends the run's steps, logged metrics and checkpoints to a JSON-lines file."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / PROGRESS_FILE

    def write(self, event: str, state: TrainerState, **fields: Any) -> None:
        if not state.is_world_process_zero:  # under several processes, one line per event
            return
        record = {"event": event, "step": state.global_step, "max_steps": state.max_steps, "time": time.time(), **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.write("train_begin", state)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        numbers = {key: value for key, value in (logs or {}).items() if isinstance(value, (int, float))}
        self.write("log", state, logs=numbers)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.write("save", state, checkpoint=str(checkpoint))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.write("train_end", state)


class ShareWeightFilesCallback(TrainerCallback):
    """Callback that gives each checkpoint's weight files the mode that the umask gives new files (`outputs.share_weight_files`)."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            share_weight_files(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class StopOnSignalCallback(TrainerCallback):
    """Stops training with a checkpoint when the process receives SIGINT or SIGTERM.

    The handlers are installed for the duration of `Trainer.train` only, and only in the
    main thread, because Python delivers signals there alone.
    """

    def __init__(self, progress: ProgressFileCallback | None = None):
        self.progress = progress
        self.requested: str | None = None
        """The name of the signal that stopped training, or None."""
        self.stopping = threading.Event()
        """Set with `requested`, for work that can stop early, such as sample generation."""
        self.output_dir = ""
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            # A dataloader worker, forked from training with this handler. Ctrl-C in a terminal reaches it
            # too: it keeps preparing batches until training stops and shuts it down.
            return
        if self.requested is not None:
            # A second signal: the user does not want to wait for the checkpoint.
            logger.warning(
                "%s received again: stopping now, without a checkpoint. --resume continues from the last "
                "checkpoint-N in %s, if there is one",
                signal.Signals(signum).name,
                self.output_dir,
            )
            self._restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.stopping.set()
        logger.warning("%s received: stopping after the current step and saving a checkpoint", self.requested)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.output_dir = args.output_dir
        if threading.current_thread() is not threading.main_thread():
            logger.debug("training outside the main thread: SIGINT and SIGTERM keep their usual handlers")
            return
        self._pid = os.getpid()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.requested is None:
            return
        control.should_save = True
        control.should_training_stop = True
        if self.progress is not None:
            self.progress.write("stop_requested", state, signal=self.requested)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._restore()


class MetricsLogCallback(TrainerCallback):
    """Logs each of the Trainer's log records as one line: `step 10/60: loss 2.31, learning_rate 0.003`.

    transformers prints the records as Python dicts instead, which read poorly in log files and in
    the web UI's log view.
    """

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        values = [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in logs.items()
                  if key != "total_flos"]
        logger.info("step %d/%d: %s", state.global_step, state.max_steps, ", ".join(values))


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bars without their printed copy of each log record, which MetricsLogCallback writes."""

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        return
