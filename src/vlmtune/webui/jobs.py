"""Training runs started from the page: a `vlmtune train` subprocess, its log and its progress.

The job lives in the server process, not in a browser session, so reloading the page (or
opening it in a second tab) shows the same running job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.errors import ConfigError
from vlmtune.outputs import PROGRESS_FILE

logger = logging.getLogger(__name__)

LOG_FILE_NAME = "train.log"


@dataclass
class Progress:
    """A run's state so far, as read from progress.jsonl."""

    step: int = 0
    max_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    training_started: bool = False
    training_ended: bool = False
    stop_requested: bool = False


def read_progress(path: str | Path, offset: int = 0) -> Progress:
    """Parse progress.jsonl from a byte offset; a line still being written is ignored."""
    progress = Progress()
    path = Path(path)
    if not path.is_file():
        return progress
    with open(path, "rb") as handle:
        handle.seek(offset)
        raw = handle.read()
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        progress.step = record.get("step", progress.step)
        progress.max_steps = record.get("max_steps", progress.max_steps)
        event = record.get("event")
        logs = record.get("logs") or {}
        if event == "train_begin":  # a resumed run's new session: the flags describe the latest one
            progress.training_started, progress.training_ended, progress.stop_requested = True, False, False
        elif event == "log" and "loss" in logs:
            progress.losses.append((progress.step, float(logs["loss"])))
        elif event == "log" and "eval_loss" in logs:
            progress.eval_losses.append((progress.step, float(logs["eval_loss"])))
        elif event == "save":
            progress.checkpoints.append(record.get("checkpoint", ""))
        elif event == "stop_requested":
            progress.stop_requested = True
        elif event == "train_end":
            progress.training_ended = True
    return progress


def tail_text(path: str | Path, max_chars: int = 20_000) -> str:
    """Return the end of a UTF-8 text file, or an empty string when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - max_chars * 4))
        text = handle.read().decode("utf-8", errors="replace")
    return text[-max_chars:]


@dataclass
class TrainingJob:
    """One `vlmtune train` subprocess and the files it writes."""

    command: list[str]
    shell_command: str
    output_dir: Path
    process: subprocess.Popen
    started: float
    progress_offset: int
    """Size of progress.jsonl before this run, so an earlier run's lines are skipped."""
    stop_requested_at: float | None = None
    form: Any = None
    """The page's form values that started the run, shown again when a page opens."""

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_FILE_NAME

    @property
    def progress_path(self) -> Path:
        return self.output_dir / PROGRESS_FILE

    @property
    def state(self) -> str:
        """running, stopping, finished, stopped or failed."""
        code = self.process.poll()
        if code is None:
            return "stopping" if self.stop_requested_at is not None else "running"
        if self.stop_requested_at is not None:
            return "stopped"
        return "finished" if code == 0 else "failed"

    @property
    def return_code(self) -> int | None:
        return self.process.poll()

    def progress(self) -> Progress:
        return read_progress(self.progress_path, self.progress_offset)

    def log_tail(self, max_chars: int = 20_000) -> str:
        return tail_text(self.log_path, max_chars)

    def stop(self) -> None:
        """Ask the run to stop: SIGINT makes it save a checkpoint after the current step and exit.

        A second call while the run is still stopping sends SIGINT again, which interrupts
        it without waiting for the checkpoint.
        """
        if self.process.poll() is not None:
            return
        logger.info("stopping training run %d (%s)", self.process.pid, self.shell_command)
        self.stop_requested_at = self.stop_requested_at or time.time()
        self.process.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)


class JobManager:
    """Starts at most one training run at a time and keeps it for every page session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.job: TrainingJob | None = None

    def start(
        self,
        command: list[str],
        shell_command: str,
        output_dir: str | Path,
        form: Any = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> TrainingJob:
        """Start the command with its output in OUTPUT_DIR/train.log; fail when a run is active.

        With overwrite (the command replaces an earlier run), the earlier run's progress.jsonl goes first,
        so the page shows only the new run's progress. With resume, the file's earlier sessions are the
        same run's, so the page shows them too.
        """
        with self._lock:
            if self.job is not None and self.job.return_code is None:
                raise ConfigError(
                    f"a training run is already active ({self.job.shell_command}); stop it before starting another"
                )
            folder = Path(output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            progress_path = folder / PROGRESS_FILE
            if overwrite:
                progress_path.unlink(missing_ok=True)
            offset = progress_path.stat().st_size if progress_path.is_file() and not resume else 0
            log = open(folder / LOG_FILE_NAME, "a", encoding="utf-8")
            log.write(f"\n$ {shell_command}\n")
            log.flush()
            environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            finally:
                log.close()  # the child keeps its own copy of the descriptor
            logger.info("started training run %d: %s", process.pid, shell_command)
            job = TrainingJob(
                command=command,
                shell_command=shell_command,
                output_dir=folder,
                process=process,
                started=time.time(),
                progress_offset=offset,
                form=form,
            )
            self.job = job
            threading.Thread(target=_log_end, args=(job,), daemon=True).start()
            return job

    def stop(self) -> None:
        with self._lock:
            if self.job is not None:
                self.job.stop()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop an active run and wait for its checkpoint, for server shutdown."""
        job = self.job
        if job is None or job.return_code is not None:
            return
        job.stop()
        try:
            job.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("training run %d did not stop within %.0f s; killing it", job.process.pid, timeout)
            job.process.kill()


def _log_end(job: TrainingJob) -> None:
    """Log how a training run ended, once its process exits (the page shows it only while open)."""
    code = job.process.wait()
    log = logger.info if job.state in ("finished", "stopped") else logger.warning
    log("training run %d %s (exit status %d); its log: %s", job.process.pid, job.state, code, job.log_path)
