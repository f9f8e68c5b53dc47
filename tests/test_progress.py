"""The training callbacks that let another process follow and stop a run."""

from __future__ import annotations

import json
import os
import signal

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from vlmtune.training.progress import ProgressFileCallback, StopOnSignalCallback


@pytest.fixture
def trainer_objects(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(global_step=4, max_steps=10)
    return args, state, TrainerControl()


def test_sigterm_stops_with_checkpoint(trainer_objects, tmp_path):
    args, state, control = trainer_objects
    progress = ProgressFileCallback(tmp_path)
    callback = StopOnSignalCallback(progress)
    before = signal.getsignal(signal.SIGTERM)
    callback.on_train_begin(args, state, control)
    try:
        callback.on_step_end(args, state, control)
        assert not control.should_training_stop, "no signal, no stop"
        os.kill(os.getpid(), signal.SIGTERM)
        callback.on_step_end(args, state, control)
    finally:
        callback.on_train_end(args, state, control)
    assert callback.requested == "SIGTERM"
    assert control.should_save
    assert control.should_training_stop
    assert signal.getsignal(signal.SIGTERM) is before, "the earlier handler is back after training"
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text(encoding="utf-8").splitlines()]
    assert records[-1]["event"] == "stop_requested"
    assert records[-1]["signal"] == "SIGTERM"
    assert records[-1]["step"] == 4


def test_second_signal_interrupts(trainer_objects, tmp_path, caplog):
    args, state, control = trainer_objects
    callback = StopOnSignalCallback()
    before = signal.getsignal(signal.SIGINT)
    callback.on_train_begin(args, state, control)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        callback.on_train_end(args, state, control)
    assert signal.getsignal(signal.SIGINT) is before
    assert f"SIGINT received again: stopping now, without a checkpoint. --resume continues from the last checkpoint-N in {tmp_path}" in caplog.text


def test_progress_file_records_events(trainer_objects, tmp_path):
    args, state, control = trainer_objects
    progress = ProgressFileCallback(tmp_path)
    progress.on_train_begin(args, state, control)
    progress.on_log(args, state, control, logs={"loss": 1.5, "epoch": 0.4, "note": "text is dropped"})
    progress.on_save(args, state, control)
    progress.on_train_end(args, state, control)
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [record["event"] for record in records] == ["train_begin", "log", "save", "train_end"]
    assert records[1]["logs"] == {"loss": 1.5, "epoch": 0.4}
    assert records[2]["checkpoint"] == str(tmp_path / "checkpoint-4")
    assert all(record["max_steps"] == 10 for record in records)
