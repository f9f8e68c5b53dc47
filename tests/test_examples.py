"""The several-GPU example files: they parse, and a run config pointing at them loads."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO_ROOT, write_json
from vlmtune.config import load_config

EXAMPLES = REPO_ROOT / "examples"


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_config_parses(name, stage):
    settings = json.loads((EXAMPLES / "deepspeed" / name).read_text(encoding="utf-8"))
    assert settings["zero_optimization"]["stage"] == stage
    # "auto" lets the Trainer fill these from train.* so the two cannot disagree.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert settings[key] == "auto", key


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP")])
def test_accelerate_config_loads(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    path = EXAMPLES / "accelerate" / name
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type.value == kind
    assert config.num_processes == yaml.safe_load(path.read_text(encoding="utf-8"))["num_processes"]
    if kind == "FSDP":
        assert "Glm4vTextDecoderLayer" in config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_run_config_points_at_deepspeed_file(tmp_path, name):
    data = write_json(tmp_path / "train.json", [{"instruction": "a", "output": "b"}])
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name_or_path: x}}\ndata: {{train: [{data}]}}\n", encoding="utf-8")
    config = load_config(path, [f"train.deepspeed={EXAMPLES / 'deepspeed' / name}"])
    assert config.train.deepspeed == str(EXAMPLES / "deepspeed" / name)


def test_relative_deepspeed_path_resolves_next_to_config(tmp_path):
    data = write_json(tmp_path / "train.json", [{"instruction": "a", "output": "b"}])
    (tmp_path / "zero2.json").write_text((EXAMPLES / "deepspeed" / "zero2.json").read_text(encoding="utf-8"))
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name_or_path: x}}\ndata: {{train: [{data}]}}\ntrain: {{deepspeed: zero2.json}}\n")
    assert load_config(path).train.deepspeed == str(tmp_path / "zero2.json")
