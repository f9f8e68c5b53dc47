"""The benchmark scripts end to end on the tiny model on CPU."""

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


@pytest.mark.slow
def test_train_speed_script_small_run(tiny_model_dir, tmp_path):
    rows = json.loads((REPO_ROOT / "data" / "persona_zh" / "train.json").read_text(encoding="utf-8"))[:24]
    data = tmp_path / "small.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "train_speed.py"), "--model", str(tiny_model_dir),
               "--data", str(data), "--batch-size", "4", "--grad-accum", "1", "--max-length", "256",
               "--variants", "baseline,vlmtune,vlmtune_cached", "--repeat", "2", "--out", str(tmp_path / "results")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results" / f"train_speed_{tiny_model_dir.name}_cpu.json").read_text())
    rows = report["rows"]
    assert set(rows) == {"baseline", "vlmtune", "vlmtune_cached"}
    assert rows["baseline"]["examples"] == rows["vlmtune"]["examples"] == 24
    assert rows["baseline"]["padding_share"] > rows["vlmtune"]["padding_share"]
    assert rows["vlmtune"]["real_tokens"] > rows["vlmtune"]["examples"] * 10
    assert rows["vlmtune_cached"]["preprocess_seconds"] > 0
    wall = report["targets"][0]
    assert wall["target"] == "epoch wall time <= 0.5x"
    assert "over 2 rounds" in wall["measured"]
    assert len(rows["vlmtune"]["runs"]) == 2
    # Each round encodes into a fresh cache, so every first run is a cache miss.
    assert [run["cache_hit"] for run in rows["vlmtune"]["runs"]] == [False, False]
    assert [run["cache_hit"] for run in rows["vlmtune_cached"]["runs"]] == [True, True]
    table = (tmp_path / "results" / f"train_speed_{tiny_model_dir.name}_cpu.md").read_text()
    assert "| vlmtune, cache hit |" in table
    assert rows["vlmtune"]["peak_anonymous_mib"] > 100  # torch alone allocates more
    assert "peak anonymous memory no higher" in table


@pytest.mark.slow
def test_image_data_script_small(tiny_model_dir, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "image_data.py"), "--model", str(tiny_model_dir),
               "--images", "4", "--size", "96", "64", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "image_data.json").read_text())["rows"]
    assert set(rows) == {"pixels", "sources"}
    for row in rows.values():
        assert row["samples"] == 4
        assert row["cache_hit"] is True
    # Sources are a few bytes per image; pixel values are thousands of floats.
    assert rows["sources"]["cache_file_mib"] < rows["pixels"]["cache_file_mib"]
    assert "| sources kept (image files, vlmtune) |" in (tmp_path / "image_data.md").read_text()
