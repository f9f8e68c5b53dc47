"""Build tiny Qwen2.5-VL and Qwen2.5 (text-only) checkpoints offline.

They check that the design is not tied to GLM-4.1V. Qwen's template closes each reply
with its own stop token (`<|im_end|>`), its module names differ, its vision tower uses
window attention, and the text-only model loads through AutoModelForCausalLM with a
tokenizer as its processor. Like the tiny GLM-4.1V, both use the real transformers classes
with random weights, a byte-level BPE tokenizer with the real special tokens, and chat
templates that render like the published ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from vlmtune.model.tiny import (
    MAX_PIXELS,
    MIN_PIXELS,
    TEXT_INITIALIZER_RANGE,
    bundled_chat_template,
    build_tokenizer,
    write_checkpoint,
)

# The special tokens of the Qwen2.5 and Qwen2.5-VL tokenizers that their templates and processors use.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# generation_config.eos_token_id of the Qwen2.5 and Qwen2.5-VL Instruct checkpoints ([151645, 151643]), as token strings.
QWEN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

# Shared by both text models: head_dim = 128 / 4 = 32.
TEXT_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "initializer_range": TEXT_INITIALIZER_RANGE,
}


def _qwen_tokenizer(corpus_paths: list[Path]):
    return build_tokenizer(corpus_paths, QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _special_token_ids(tokenizer) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_qwen2_5_vl(output_dir: str | Path, corpus_files: Iterable[str | Path] = (), seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint (Qwen2_5_VLForConditionalGeneration and its processor).

    Shape rules: the vision tower's out_hidden_size equals the text hidden size,
    mrope_section sums to head_dim / 2 (here 16), and the window size is a multiple of
    patch_size * spatial_merge_size (here 28).
    """
    corpus_paths = [Path(path) for path in corpus_files]
    tokenizer = _qwen_tokenizer(corpus_paths)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=bundled_chat_template("qwen2_5_vl"),
    )
    token_id = tokenizer.convert_tokens_to_ids
    text_config = {
        **TEXT_SHAPE,
        **_special_token_ids(tokenizer),
        "vocab_size": len(tokenizer),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": TEXT_SHAPE["hidden_size"],
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return write_checkpoint(output_dir, model, processor, QWEN_STOP_TOKENS, "Qwen2.5-VL", len(corpus_paths))


def build_tiny_qwen2(output_dir: str | Path, corpus_files: Iterable[str | Path] = (), seed: int = 0) -> Path:
    """Write a tiny text-only Qwen2.5 checkpoint (Qwen2ForCausalLM, tied embeddings) with its tokenizer."""
    corpus_paths = [Path(path) for path in corpus_files]
    tokenizer = _qwen_tokenizer(corpus_paths)
    tokenizer.chat_template = bundled_chat_template("qwen2")
    config = Qwen2Config(**TEXT_SHAPE, **_special_token_ids(tokenizer), vocab_size=len(tokenizer), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    return write_checkpoint(output_dir, model, tokenizer, QWEN_STOP_TOKENS, "Qwen2.5 (text-only)", len(corpus_paths))
