"""benchmarks/gpu_memory.py end to end on the tiny model on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_memory_script_on_cpu(tiny_model_dir, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_memory.py"), "--model", str(tiny_model_dir),
               "--device", "cpu", "--modes", "bf16-checkpointing", "--max-length", "96", "--batch-size", "2",
               "--steps", "2", "--image-pixels", str(28 * 28 * 16), "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "gpu_memory.json").read_text())
    rows = written["results"]
    assert [row["batch"] for row in rows] == ["text", "image"]
    for row in rows:
        assert row["measured_bytes"] > 0
        assert 0.8 < row["ratio"] < 1.2, row
    assert "| bf16-checkpointing | image |" in (tmp_path / "gpu_memory.md").read_text()
