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
    assert "in the vision tower" in message
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
    assert counts["vision tower"][0] == 0
    assert counts["merger"][0] == 0
    assert counts["output head"][0] == 0
    assert counts["language model"][0] > 0
    adapted = {name for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert adapted
    assert not any(".visual." in name for name in adapted)
    assert any("gate_up_proj" in name for name in adapted)


def test_vision_lora_only_when_enabled(loaded):
    without = resolve_target_modules(loaded.model, "auto")
    with_vision = resolve_target_modules(loaded.model, "auto", vision=True)
    vision_names = sorted(set(with_vision) - set(without))
    assert {name.rsplit(".", 1)[-1] for name in vision_names} == {"qkv", "proj", "gate_proj", "up_proj", "down_proj"}
    assert all(name.startswith("model.visual.blocks.") for name in vision_names)
    assert not any("merger" in name for name in with_vision)
    assert resolve_target_modules(loaded.model, ["gate_proj"], vision=True)


def test_regex_selecting_some_layers_stays_exact(fresh_model):
    peft_model = apply_lora(fresh_model, LoraSettings(target_modules=r".*language_model\.layers\.0\.self_attn\.q_proj"))
    adapted = [name for name, _ in peft_model.named_modules() if name.endswith("q_proj.lora_A")]
    assert len(adapted) == 1
    assert ".layers.0." in adapted[0]


def test_train_merger_makes_merger_trainable(fresh_model):
    peft_model = apply_lora(fresh_model, LoraSettings(train_merger=True, vision=True))
    counts = count_parameters(peft_model)
    assert counts["merger"][0] > 0
    assert counts["vision tower"][0] > 0
    assert counts["output head"][0] == 0
