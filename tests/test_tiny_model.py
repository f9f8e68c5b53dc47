"""The tiny checkpoint: real GLM-4.1V classes, GLM's special tokens and stop ids, deterministic."""

from __future__ import annotations

import hashlib

from transformers import AutoConfig, AutoProcessor

from conftest import PERSONA_DATA
from vlmtune.model.tiny import GLM_SPECIAL_TOKENS, GLM_STOP_TOKENS, build_tiny_model


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_classes_and_shapes(loaded):
    config = loaded.model.config
    assert type(loaded.model).__name__ == "Glm4vForConditionalGeneration"
    assert type(loaded.processor).__name__ == "Glm4vProcessor"
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    rope = config.text_config.rope_parameters
    assert sum(rope["mrope_section"]) == head_dim * rope["partial_rotary_factor"] / 2


def test_special_tokens_are_single_tokens(loaded):
    tokenizer = loaded.tokenizer
    for token in GLM_SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
        assert tokenizer.convert_ids_to_tokens(ids[0]) == token
    config = loaded.model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video|>")


def test_stop_ids_match_real_model(loaded):
    expected = [loaded.tokenizer.convert_tokens_to_ids(token) for token in GLM_STOP_TOKENS]
    assert loaded.model.generation_config.eos_token_id == expected
    assert loaded.stop_token_ids == expected


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    rebuilt = build_tiny_model(tmp_path / "again", [PERSONA_DATA], seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert digest(rebuilt / name) == digest(tiny_model_dir / name), name
    other_seed = build_tiny_model(tmp_path / "other", [PERSONA_DATA], seed=1)
    assert digest(other_seed / "model.safetensors") != digest(tiny_model_dir / "model.safetensors")


def test_loads_through_auto_classes(tiny_model_dir):
    assert AutoConfig.from_pretrained(tiny_model_dir).model_type == "glm4v"
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert processor.video_processor is not None
    assert processor.image_processor.merge_size == 2
