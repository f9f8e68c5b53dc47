"""Shared fixtures: one tiny GLM-4.1V checkpoint per test session, built offline."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from vlmtune.config import DataSettings, ModelSettings
from vlmtune.encoding import ConversationEncoder, EncodedSample
from vlmtune.model.loading import LoadedModel, load_model
from vlmtune.model.tiny import build_tiny_model

# Tests make no network call. bitsandbytes (imported by transformers whenever it is installed)
# otherwise looks up a CPU kernel on the Hugging Face Hub; offline mode makes it skip that.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
PERSONA_DATA = REPO_ROOT / "data" / "persona_zh" / "train.json"
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def encoded_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("encoded-cache")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, encoded_cache_dir):
    # Keeps SwanLab from asking for a login or reaching the network in any test, and keeps
    # encoded-data caches out of the user's home folder.
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("VLMTUNE_CACHE", str(encoded_cache_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    logging.getLogger("vlmtune").setLevel(logging.INFO)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-glm4v", [PERSONA_DATA], seed=0)


@pytest.fixture(scope="session")
def loaded(tiny_model_dir) -> LoadedModel:
    return load_model(ModelSettings(name_or_path=str(tiny_model_dir), hub="local", device="cpu"))


@pytest.fixture(scope="session")
def encoder(loaded) -> ConversationEncoder:
    return ConversationEncoder(loaded.processor, loaded.stop_token_ids)


def encode_with_pixels(encoder: ConversationEncoder, conversations) -> list[EncodedSample]:
    """Encode conversations and process their image files, so that any collator can batch the samples."""
    samples = [encoder.encode(conversation) for conversation in conversations]
    return [replace(sample, pixel_values=encoder.pixel_values(sample)) if sample.image_sources else sample for sample in samples]


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def data_settings(path: Path | str = "unused.json", **overrides) -> DataSettings:
    return DataSettings(train=[str(path)], **overrides)


def train_fixed_reply_adapter(model_dir: Path, data_path: Path, output_dir: Path, **lora) -> Path:
    """Train an adapter for 20 steps on data with one fixed reply, so its generations stop on a stop token."""
    from vlmtune.config import build_config
    from vlmtune.training.recipe import LoraRecipe

    tree = {
        "model": {"name_or_path": str(model_dir), "device": "cpu"},
        "data": {"train": [str(data_path)], "max_length": 128},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, **lora},
        "train": {"output_dir": str(output_dir), "max_steps": 20, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "warmup_steps": 0, "save_steps": 100, "seed": 7},
        "tracking": {"backend": "none"},
        "evaluation": {"generate": False},
    }
    recipe = LoraRecipe(build_config(tree))
    recipe.setup()
    recipe.train()
    return recipe.save()


@pytest.fixture(scope="session")
def trained_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An adapter trained briefly on one fixed reply, so generations stop on a stop token."""
    folder = tmp_path_factory.mktemp("adapter")
    rows = [{"instruction": f"第{i}个问题", "input": "", "output": "好的喵~"} for i in range(8)]
    return train_fixed_reply_adapter(tiny_model_dir, write_json(folder / "train.json", rows), folder / "out")


def new_file_mode() -> int:
    """The permission bits that open() gives a new file under this process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
