"""Build a tiny GLM-4.1V-shaped checkpoint offline, for tests and the demo.

The checkpoint uses the real classes and module names (Glm4vForConditionalGeneration,
Glm4vProcessor with its image and video processors) with random weights, a small
byte-level BPE tokenizer holding GLM's special tokens, and a chat template that
renders like the official one. It loads through the same `from_pretrained` path as
ZhipuAI/GLM-4.1V-9B-Thinking.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from vlmtune.errors import ModelError

logger = logging.getLogger(__name__)

# The special tokens of the GLM-4.1V tokenizer, in the order it assigns ids.
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
)
# generation_config.eos_token_id of GLM-4.1V-9B-Thinking, as token strings.
GLM_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")

FALLBACK_CORPUS = (
    "你好，我是小橘喵~ 有什么可以帮你的吗？",
    "Hello! How can I help you today?",
    "1 + 1 = 2. 今天天气很好，适合出去散步。",
)
VOCAB_SIZE = 3000
# Images are capped at 28*28*32 pixels, i.e. at most 32 image tokens after the 2x2 merge.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 32
# Ten times the real model's 0.02. With 0.02, the random output head gives logits with a
# spread of roughly 0.02 * sqrt(hidden_size) = 0.3, too flat for a LoRA adapter to learn a
# peaked reply distribution in the demo's few CPU minutes (an estimate, checked by training).
TEXT_INITIALIZER_RANGE = 0.2
# Every file name a tiny builder writes (transformers 5 save_pretrained of model and processor).
# A folder with any other file is not a tiny checkpoint, so the builders do not write into it.
TINY_CHECKPOINT_FILES = frozenset(
    {
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
)


BUNDLED_TEMPLATES = ("glm4v", "glm4v_moe", "qwen2_5_vl", "qwen2")
"""vlmtune's chat templates for the tiny checkpoints, under templates/NAME.jinja."""


def bundled_chat_template(name: str) -> str:
    """Return the text of one of vlmtune's chat templates (`templates/NAME.jinja`)."""
    return resources.files("vlmtune.model").joinpath(f"templates/{name}.jinja").read_text(encoding="utf-8")


def glm4v_chat_template() -> str:
    """Return vlmtune's own GLM-4.1V chat template text."""
    return bundled_chat_template("glm4v")


def _corpus_lines(corpus_files: Iterable[Path]) -> Iterator[str]:
    yield from FALLBACK_CORPUS
    for path in corpus_files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            # Feed every string of the JSON tree, so keys and punctuation stay out of the merges.
            stack = [json.loads(text)]
            while stack:
                node = stack.pop()
                if isinstance(node, str):
                    yield node
                elif isinstance(node, dict):
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
        else:
            yield from text.splitlines()


def build_tokenizer(
    corpus_files: Iterable[Path] = (),
    special_tokens: Iterable[str] = GLM_SPECIAL_TOKENS,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|endoftext|>",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer whose first ids are the special tokens (GLM's by default)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(corpus_files), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        pad_token=pad_token,
        padding_side="left",
    )


# GLM-4.5V's mixture of experts, scaled down: layer 0 keeps a dense MLP, the others route each
# token to 2 of 4 experts and add one shared expert.
MOE_TEXT_CONFIG = {
    "moe_intermediate_size": 64,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}


def build_tiny_config(tokenizer: PreTrainedTokenizerFast, config_class: type[PretrainedConfig] = Glm4vConfig, **text_extra):
    """Build a Glm4vConfig (or Glm4vMoeConfig) a few MB in size with the 9B model's structure.

    Shape rules of Glm4v: the vision tower's out_hidden_size equals the text hidden
    size, and mrope_section sums to head_dim * partial_rotary_factor / 2
    (here 32 * 0.5 / 2 = 8).
    """
    token_id = tokenizer.convert_tokens_to_ids
    hidden_size = 256
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": TEXT_INITIALIZER_RANGE,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [4, 2, 2],
        },
        **text_extra,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "image_size": 56,
    }
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image|>"),
        video_token_id=token_id("<|video|>"),
        image_start_token_id=token_id("<|begin_of_image|>"),
        image_end_token_id=token_id("<|end_of_image|>"),
        video_start_token_id=token_id("<|begin_of_video|>"),
        video_end_token_id=token_id("<|end_of_video|>"),
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, chat_template: str | None = None) -> Glm4vProcessor:
    """GLM-4.1V's processor (GLM-4.5V uses the same class) with vlmtune's GLM-4.1V template unless another is given."""
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(size=size),
        chat_template=chat_template or glm4v_chat_template(),
    )


def build_tiny_model(output_dir: str | Path, corpus_files: Iterable[str | Path] = (), seed: int = 0) -> Path:
    """Write the tiny checkpoint (model, processor, generation config) to output_dir."""
    corpus_paths = [Path(path) for path in corpus_files]
    tokenizer = build_tokenizer(corpus_paths)
    processor = build_processor(tokenizer)
    config = build_tiny_config(tokenizer)

    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config)
    return write_checkpoint(output_dir, model, processor, GLM_STOP_TOKENS, "GLM-4.1V", len(corpus_paths))


def build_tiny_glm4v_moe(output_dir: str | Path, corpus_files: Iterable[str | Path] = (), seed: int = 0) -> Path:
    """Write a tiny GLM-4.5V-shaped checkpoint: Glm4vMoeForConditionalGeneration with mixture-of-experts layers.

    transformers maps GLM-4.5V to GLM-4.1V's processor class (Glm4vProcessor), so the tokenizer
    and processor are the tiny GLM-4.1V ones. The chat template is the GLM-4.5 family's layout
    (templates/glm4v_moe.jinja: reasoning from `reasoning_content`, no answer tags). NOTE: it
    follows GLM-4.5's published template and has not been compared with GLM-4.5V's own file.
    """
    corpus_paths = [Path(path) for path in corpus_files]
    tokenizer = build_tokenizer(corpus_paths)
    processor = build_processor(tokenizer, bundled_chat_template("glm4v_moe"))
    config = build_tiny_config(tokenizer, Glm4vMoeConfig, **MOE_TEXT_CONFIG)

    torch.manual_seed(seed)
    model = Glm4vMoeForConditionalGeneration(config)
    return write_checkpoint(output_dir, model, processor, GLM_STOP_TOKENS, "GLM-4.5V", len(corpus_paths))


def check_tiny_output_dir(output_dir: str | Path) -> list[Path]:
    """Raise ModelError unless output_dir is new, empty or contains only a tiny checkpoint, and return its files.

    This keeps a mistyped path from overwriting the tokenizer of a trained adapter or a real model.
    """
    output_path = Path(output_dir)
    if output_path.exists() and not output_path.is_dir():
        raise ModelError(f"{output_path} is a file, not a folder; choose a new or empty folder for the tiny model")
    if not output_path.is_dir():
        return []
    entries = sorted(output_path.iterdir())
    foreign = [
        path.name + ("/" if path.is_dir() else "")
        for path in entries
        if path.is_dir() or path.name not in TINY_CHECKPOINT_FILES
    ]
    if foreign:
        listed = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise ModelError(
            f"{output_path} contains files a tiny checkpoint does not have ({listed}), so it is not a tiny model "
            "written earlier; choose a new or empty folder"
        )
    # Any save_pretrained folder has the same file names, so the chat template distinguishes a tiny model.
    template = output_path / "chat_template.jinja"
    bundled = {bundled_chat_template(name) for name in BUNDLED_TEMPLATES}
    if entries and (not template.is_file() or template.read_text(encoding="utf-8") not in bundled):
        raise ModelError(
            f"{output_path} contains a model whose chat template is not one of vlmtune's tiny templates, so it is "
            "not a tiny model written earlier; choose a new or empty folder"
        )
    return entries


def write_checkpoint(
    output_dir: str | Path,
    model: PreTrainedModel,
    processor: ProcessorMixin | PreTrainedTokenizerFast,
    stop_tokens: Iterable[str],
    name: str,
    corpus_count: int,
) -> Path:
    """Save a tiny model with a generation config whose eos_token_id lists the stop tokens, and its processor.

    An earlier tiny checkpoint in output_dir is replaced: its files are deleted first, so none of
    another architecture's files (a text-only model has no processor_config.json) stay behind.
    """
    output_path = Path(output_dir)
    earlier = check_tiny_output_dir(output_path)
    if earlier:
        logger.info("replacing the tiny checkpoint in %s", output_path)
    for path in earlier:
        path.unlink()
    output_path.mkdir(parents=True, exist_ok=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in stop_tokens]
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)

    model.save_pretrained(output_path)
    processor.save_pretrained(output_path)
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    logger.info(
        "wrote tiny %s checkpoint to %s (%d parameters, vocabulary %d, tokenizer trained on %d file(s))",
        name,
        output_path,
        parameter_count,
        len(tokenizer),
        corpus_count,
    )
    return output_path
