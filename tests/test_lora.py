"""LoRA targets resolve to real GLM-4.1V module names, inside the language model only."""

from __future__ import annotations

import pytest

from vlmtune.config import LoraSettings
from vlmtune.errors import ConfigError
from vlmtune.model.lora import apply_lora, count_parameters, resolve_target_modules

TUTORIAL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LANGUAGE_MODEL_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.fixture
def fresh_model(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir)


def test_auto_targets_are_language_model_linears(loaded):
    targets = resolve_target_modules(loaded.model, "auto")
    assert {name.rsplit(".", 1)[-1] for name in targets} == LANGUAGE_MODEL_NAMES
    assert all(name.startswith("model.language_model.layers.") for name in targets)
    assert len(targets) == 6 * loaded.model.config.text_config.num_hidden_layers


def test_tutorial_target_list_rejected(loaded):
    with pytest.raises(ConfigError) as caught:
        resolve_target_modules(loaded.model, TUTORIAL_TARGETS)
    message = str(caught.value)
    assert "'gate_proj' matches" in message
    assert "in the vision" in message
    assert "'up_proj' matches" in message
    assert "gate_up_proj" in message  # the name to use instead is listed


def test_name_matching_nothing_rejected(loaded):
    with pytest.raises(ConfigError, match=r"'qkv_proj' matches nothing"):
        resolve_target_modules(loaded.model, ["q_proj", "qkv_proj"])


def test_shared_name_limited_to_language_model(loaded):
    targets = resolve_target_modules(loaded.model, ["down_proj"])
    assert targets
    assert all(".language_model." in name for name in targets)


def test_regex_targets(loaded):
    targets = resolve_target_modules(loaded.model, r".*language_model.*\.(q_proj|v_proj)")
    assert {name.rsplit(".", 1)[-1] for name in targets} == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="narrow the expression"):
        resolve_target_modules(loaded.model, r".*\.down_proj")
    with pytest.raises(ConfigError, match="matches no Linear layer"):
        resolve_target_modules(loaded.model, r"nothing\.here")


def test_apply_lora_freezes_vision_and_head(fresh_model):
    peft_model = apply_lora(fresh_model, LoraSettings(r=4, alpha=8))
    counts = count_parameters(peft_model)
    assert counts["vision"][0] == 0
    assert counts["output head"][0] == 0
    assert counts["language model"][0] > 0
    adapted = {name for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert adapted
    assert not any(".visual." in name for name in adapted)
    assert any("gate_up_proj" in name for name in adapted)
