"""Two training processes on CPU (torchrun or accelerate launch, gloo backend) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_json

BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[1]
# Per-step training loss of 2 processes x batch 2 against 1 process x batch 4, float32 on CPU.
LOSS_TOLERANCE = 1e-4


def write_config(folder: Path, tiny_model_dir: Path, **train) -> Path:
    rows = [
        {"instruction": f"第{i}个问题：" + "喵" * (i % 5), "input": "", "output": "好的喵~" + "呀" * (i % 3)}
        for i in range(16)
    ]
    data = write_json(folder / "train.json", rows)
    settings = {
        "output_dir": str(folder / "out"), "max_steps": 4, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1,
        "save_steps": 4, "group_by_length": False, "seed": 3, **train,
    }
    path = folder / "run.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": [str(data)], "max_length": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": settings,
        "tracking": {"backend": "tensorboard"},
        "evaluation": {"generate": False},
    }), encoding="utf-8")
    return path


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={processes}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)


# progress.jsonl of a 4-step run that logs each step and saves at step 4, written by rank 0 alone:
# one line per event, the last log being the Trainer's closing summary.
PROGRESS_EVENTS = ["train_begin", "log", "log", "log", "log", "save", "log", "train_end"]


def progress_events(output_dir: Path) -> list[str]:
    lines = (output_dir / "progress.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["event"] for line in lines]


def step_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, tmp_path):
    double = tmp_path / "ddp"
    single = tmp_path / "single"
    double.mkdir()
    single.mkdir()
    ddp_config = write_config(double, tiny_model_dir)
    single_config = write_config(single, tiny_model_dir, per_device_train_batch_size=4)

    ddp = torchrun("-m", "vlmtune.cli.main", "train", str(ddp_config))
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single_run = subprocess.run([str(BIN / "vlmtune"), "train", str(single_config)], capture_output=True, text=True,
                                timeout=600, check=False)
    assert single_run.returncode == 0, single_run.stderr[-4000:]

    ddp_losses = step_losses(double / "out")
    single_losses = step_losses(single / "out")
    print("2 processes:", ddp_losses, "1 process:", single_losses)
    assert len(ddp_losses) == 4
    assert len(single_losses) == 4
    for step, (ddp_loss, single_loss) in enumerate(zip(ddp_losses, single_losses), start=1):
        allowed = LOSS_TOLERANCE * max(1.0, abs(single_loss))
        assert abs(ddp_loss - single_loss) <= allowed, f"step {step}: {ddp_loss} vs {single_loss}"

    # Only rank 0 writes the run's files and logs its decisions.
    output = double / "out"
    for name in ("adapter_model.safetensors", "run_manifest.json", "loss.png", "config.yaml"):
        assert (output / name).is_file(), name
    assert len(list((output / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert ddp.stderr.count("training on 16 samples") == 1
    assert "training on 2 processes: a global batch of 4 = 2 per process x 1 accumulation steps x 2 processes" in ddp.stderr
    assert progress_events(output) == PROGRESS_EVENTS
    assert ddp.stderr.count("saved the adapter and run manifest") == 1
    assert ddp.stdout.count("adapter saved to") == 1
    assert "find_unused_parameters=True" not in ddp.stderr  # no per-step search when every parameter gets a gradient


@pytest.mark.slow
def test_ranks_share_order_and_encoding(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, group_by_length=True)
    settings = json.loads(config.read_text(encoding="utf-8"))
    settings["data"]["cache_dir"] = str(tmp_path / "encoded")  # empty: one of the ranks has to encode
    config.write_text(json.dumps(settings), encoding="utf-8")
    script = Path(__file__).parent / "scripts" / "sampler_ranks.py"
    result = torchrun(str(script), str(config), str(tmp_path / "seen"))
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / f"seen.{rank}.json").read_text()) for rank in range(2)]
    assert sorted(record["from_cache"] for record in records) == [False, True]  # one rank encoded, the other waited
    assert len(list((tmp_path / "encoded").glob("*.arrow"))) == 1
    ranks = [record["epochs"] for record in records]
    for epoch in range(2):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first) == 8
        assert len(second) == 8
        every = sorted(map(tuple, first + second))
        assert len(set(every)) == 16, f"epoch {epoch}: the ranks saw overlapping samples"
    assert ranks[0][0] != ranks[0][1], "both epochs used the same order"


@pytest.mark.slow
def test_accelerate_launch_matches_one_process(tiny_model_dir, tmp_path):
    """examples/accelerate/ddp.yaml, switched to CPU, runs 2 processes with the same losses as one."""
    launch = yaml.safe_load((REPO_ROOT / "examples" / "accelerate" / "ddp.yaml").read_text())
    launch.update(use_cpu=True, mixed_precision="no")  # accelerate then starts the processes with torchrun and gloo
    launch.pop("gpu_ids")
    launch_file = tmp_path / "accelerate.yaml"
    launch_file.write_text(yaml.safe_dump(launch))
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    ddp_config = write_config(tmp_path / "ddp", tiny_model_dir)
    single_config = write_config(tmp_path / "single", tiny_model_dir, per_device_train_batch_size=4)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "accelerate"), "launch", "--config_file", str(launch_file), "-m", "vlmtune.cli.main", "train",
               str(ddp_config)]
    ddp = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert ddp.stderr.count("training on 16 samples") == 1  # two processes, one of them logging
    assert "training on 2 processes: a global batch of 4 = 2 per process x 1 accumulation steps x 2 processes" in ddp.stderr
    assert progress_events(tmp_path / "ddp" / "out") == PROGRESS_EVENTS
    single = subprocess.run([str(BIN / "vlmtune"), "train", str(single_config)], capture_output=True, text=True,
                            timeout=600, check=False)
    assert single.returncode == 0, single.stderr[-4000:]

    state = json.loads((tmp_path / "ddp" / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == 1.0  # 4 steps of 2 processes x 2 samples cover the 16 samples once
    ddp_losses = step_losses(tmp_path / "ddp" / "out")
    single_losses = step_losses(tmp_path / "single" / "out")
    assert len(ddp_losses) == 4
    for step, (ddp_loss, single_loss) in enumerate(zip(ddp_losses, single_losses), start=1):
        assert abs(ddp_loss - single_loss) <= LOSS_TOLERANCE * max(1.0, abs(single_loss)), f"step {step}"
