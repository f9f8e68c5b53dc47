"""Per-device training memory of a run, estimated from the model config without loading weights.

Parameter counts are exact: the model is built on the `meta` device (shapes, no storage)
and the run's real LoRA config is applied to it with vlmtune's own target discovery.
Bytes per parameter follow what `load_model` and the recipe do:

- no quantization: every weight in the compute dtype (`model.dtype`; `auto` is bfloat16 on a GPU);
- 8-bit (LLM.int8): quantized Linear weights take 1 byte plus one float32 scale per output
  row. 4-bit: half a byte plus a float32 absmax per 64 weights. With double quantization the
  absmax is 8-bit, plus a float32 constant per 256 absmax values.
  Only the Linear layers outside `UNQUANTIZED_MODULES` are quantized (transformers'
  `should_convert_module` decides, as in loading). Every other weight (embeddings, vision
  tower, merger, output head, norms) stays in the compute dtype (see `prepare_for_training`);
- LoRA weights (and DoRA magnitudes) are float32, because peft upcasts adapter weights by default.
  Their gradients are float32 too, and AdamW keeps two states of the parameter's dtype;
  8-bit optimizers keep two 1-byte states.
  modules_to_save copies are trained in their own dtype, next to the frozen original.

The activation terms count the tensors that autograd keeps for the backward pass in
one decoder layer of the GLM-4 / Llama shape (RMSNorm, attention through SDPA, gated MLP) with
frozen base weights. The count comes from reading transformers 5.25's Glm4v code and
peft 0.21's LoRA layer. Per token and layer:

- each RMSNorm keeps a float32 copy of its input: 4·h bytes;
- SDPA keeps q, k, v and its output: (2·q_dim + 2·kv_dim)·b bytes, with b the bytes of the
  compute dtype. Training batches carry no padding mask (see ChatCollator.padding_mask), so
  transformers hands k and v to SDPA with their own heads (grouped-query attention). With a
  head size over 256 it repeats them to all heads, and k and v take q_dim each;
- the MLP keeps the gate_up output and the activated gate: 3·I·b bytes;
- each LoRA layer keeps its input cast to float32 (4·in bytes) and the dropout mask
  (1·in), plus the rank-r intermediate (4·r). The input is shared between layers reading the
  same tensor when dropout is 0 and the compute dtype is float32;
- DoRA also keeps each adapted layer's base output (b·out) and its float32 LoRA output (4·out),
  which peft scales by the trained magnitude: (b + 4)·out.

Gradient checkpointing keeps only each layer's input (b·h) and recomputes one layer at a
time during backward. The loss keeps the logits and their gradient: 2·b·V bytes per token,
plus a fixed float32 working chunk (model/cross_entropy.py). Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models") derive the same kind of count
(34·h + 5·a·s bytes for GPT layers in fp16). NOTE: these are estimates. The comparison
with measured peaks covers only the tiny model on CPU (tests/test_estimate.py); on a GPU,
allocator fragmentation and kernel workspaces come on top and are covered only by a fixed
overhead.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.quantizers.quantizers_utils import should_convert_module

from vlmtune.config import VISION_MODULE_NAMES, LoraSettings, RunConfig
from vlmtune.errors import ModelError
from vlmtune.model.cross_entropy import CHUNK_BYTES
from vlmtune.model.hub import MODEL_FOLDER_HINT, check_model_folder
from vlmtune.model.loading import UNQUANTIZED_MODULES, checkpointing_enabled, parameter_count_text
from vlmtune.model.lora import apply_lora

logger = logging.getLogger(__name__)

GIB = 1024**3
# CUDA context, cuBLAS workspaces and caching-allocator slack on one GPU: an assumption,
# not a measurement, typical of PyTorch training processes.
CUDA_OVERHEAD_BYTES = int(1.0 * GIB)
# bitsandbytes 4-bit: one absmax per 64 weights; double quantization stores the absmax values
# in 8 bits with one float32 constant per 256 of them.
FOUR_BIT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Hub ids of GLM-4.1V-9B-Thinking, whose config.json is bundled so an estimate needs no download.
BUNDLED_CONFIGS = {
    "ZhipuAI/GLM-4.1V-9B-Thinking": "glm4v_9b_thinking.json",
    "zai-org/GLM-4.1V-9B-Thinking": "glm4v_9b_thinking.json",
    "THUDM/GLM-4.1V-9B-Thinking": "glm4v_9b_thinking.json",
}


@dataclass(frozen=True)
class Workload:
    """The batch of one training step on one device: samples, tokens per sample and images."""

    batch_size: int
    sequence_length: int
    images_per_sample: int = 0
    image_pixels: int | None = None
    logit_share: float = 1.0
    """Share of positions that get logits. Training computes them only where the next token
    is supervised, so 1.0 is an upper bound. The real value is the share of reply tokens."""

    @property
    def tokens(self) -> int:
        return self.batch_size * self.sequence_length


@dataclass
class MemoryEstimate:
    """Estimated bytes per item on one device, with the settings that produced them."""

    items: list[tuple[str, int, str]] = field(default_factory=list)
    gpu_bytes: int | None = None
    device: str = "cuda"

    def add(self, name: str, size: int, note: str) -> None:
        self.items.append((name, int(size), note))

    @property
    def total(self) -> int:
        return sum(size for _, size, _ in self.items)

    def bytes_of(self, name: str) -> int:
        return sum(size for item, size, _ in self.items if item == name)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total <= self.gpu_bytes


def bundled_config_path(name: str) -> Path | None:
    file_name = BUNDLED_CONFIGS.get(name)
    if file_name is None:
        return None
    return Path(str(resources.files("vlmtune.model").joinpath(f"configs/{file_name}")))


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """Read a model config from a local folder, else the bundled copy for known hub ids, else the hub."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_model_folder(local.resolve(), "model.name_or_path", MODEL_FOLDER_HINT)
        return AutoConfig.from_pretrained(str(local), trust_remote_code=trust_remote_code)
    bundled = bundled_config_path(name_or_path)
    if bundled is not None:
        return AutoConfig.from_pretrained(str(bundled))
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"model.name_or_path: cannot read the config of {name_or_path!r} ({error}). Pass a local model "
            f"folder, or one of the ids with a bundled config: {', '.join(BUNDLED_CONFIGS)}"
        ) from None


def build_meta_model(model_config: PretrainedConfig) -> nn.Module:
    """Build the model on the meta device: exact shapes and names, no memory for weights."""
    is_vision_language = model_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    auto_class = AutoModelForImageTextToText if is_vision_language else AutoModelForCausalLM
    with torch.device("meta"):
        return auto_class.from_config(model_config)


def apply_lora_on_meta(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap a meta-device model with the LoRA settings, raising their ConfigErrors without loading weights.

    PiSSA and OLoRA initialise from the real weights, so the default initialisation is used instead.
    """
    with torch.device("meta"):
        return apply_lora(model, lora.model_copy(update={"init": "default"}), log=False)


def _compute_dtype_bytes(config: RunConfig, device: str) -> int:
    dtype = config.model.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return DTYPE_BYTES[dtype]


def _quantized_linear_names(model: nn.Module) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, UNQUANTIZED_MODULES)
    }


def _weight_bytes(model: nn.Module, config: RunConfig, dtype_bytes: int) -> tuple[int, int, str]:
    """Return (bytes of the frozen base weights, quantized parameter count, a note)."""
    bits = config.quantization.bits
    if bits is None:
        total = sum(parameter.numel() for parameter in model.parameters())
        return total * dtype_bytes, 0, f"{parameter_count_text(total)} parameters x {dtype_bytes} bytes"
    quantized_names = _quantized_linear_names(model)
    quantized = quantized_bytes = 0
    other = 0
    for name, module in model.named_modules():
        if name in quantized_names:
            weight = module.weight
            quantized += weight.numel()
            if bits == 8:
                quantized_bytes += weight.numel() + 4 * weight.shape[0]
            else:
                blocks = weight.numel() / FOUR_BIT_BLOCK
                constants = blocks + 4 * blocks / DOUBLE_QUANT_BLOCK if config.quantization.double_quant else 4 * blocks
                quantized_bytes += weight.numel() / 2 + constants
            other += dtype_bytes * sum(
                parameter.numel() for parameter in module.parameters(recurse=False) if parameter is not weight
            )
        else:
            other += dtype_bytes * sum(parameter.numel() for parameter in module.parameters(recurse=False))
    kind = f"{config.quantization.type}" + (" + double quant" if config.quantization.double_quant else "")
    kind = "int8" if bits == 8 else kind
    note = f"{parameter_count_text(quantized)} quantized ({kind}), the other weights {dtype_bytes} bytes each"
    return int(quantized_bytes + other), quantized, note


def _trainable_split(peft_model: nn.Module) -> tuple[int, int, int]:
    """Return trainable parameter counts: LoRA matrices, DoRA magnitudes, modules_to_save copies."""
    lora = dora = full = 0
    for name, parameter in peft_model.named_parameters():
        if not parameter.requires_grad:
            continue
        if ".modules_to_save." in name:
            full += parameter.numel()
        elif "lora_magnitude_vector" in name:
            dora += parameter.numel()
        else:
            lora += parameter.numel()
    return lora, dora, full


def _optimizer_state_bytes_per_value(optim: str) -> tuple[float, str]:
    if "8bit" in optim:
        return 2.0, f"{optim}: two 8-bit states"
    if optim.startswith("sgd"):
        return 0.0, f"{optim}: no state"
    if "adafactor" in optim:
        return 0.0, f"{optim}: factored second moment, counted as 0"
    return 2.0 * 4, f"{optim}: two float32 states"


@dataclass(frozen=True)
class LayerShape:
    """Activation sizes that one transformer layer stores, read from its modules."""

    hidden: int
    attention_width: int
    key_value_width: int
    mlp_width: int
    norms: int
    lora_inputs: tuple[int, ...]
    lora_outputs: tuple[int, ...]
    shared_lora_inputs: tuple[int, ...]


def _lora_layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in block.named_modules() if hasattr(module, "lora_A") and module.lora_A]


def _layer_shape(block: nn.Module, hidden: int, attention_width: int, key_value_width: int, mlp_width: int) -> LayerShape:
    lora = _lora_layers(block)
    inputs = tuple(module.in_features for _, module in lora)
    outputs = tuple(module.out_features for _, module in lora)
    # Layers that read the same tensor (q, k, v read the normed input) share it when nothing copies it.
    shared: dict[str, int] = {}
    for name, module in lora:
        short = name.rsplit(".", 1)[-1]
        key = "attention input" if short in ("q_proj", "k_proj", "v_proj", "qkv") else name
        shared[key] = module.in_features
    norms = sum(1 for module in block.modules() if type(module).__name__.endswith("RMSNorm"))
    return LayerShape(hidden, attention_width, key_value_width, mlp_width, norms, inputs, outputs, tuple(shared.values()))


def layer_activation_bytes(shape: LayerShape, dtype_bytes: int, lora: LoraSettings, rank: int) -> int:
    """Bytes per token that one layer keeps for backward (see the module docstring for the count)."""
    norms = shape.norms * 4 * shape.hidden
    attention = (2 * shape.attention_width + 2 * shape.key_value_width) * dtype_bytes
    mlp = 3 * shape.mlp_width * dtype_bytes
    if lora.dropout > 0:
        lora_inputs = sum(5 * width for width in shape.lora_inputs)
    elif dtype_bytes != 4:
        lora_inputs = sum(4 * width for width in shape.lora_inputs)
    else:
        lora_inputs = sum(4 * width for width in shape.shared_lora_inputs)
    lora_inputs += 4 * rank * len(shape.lora_inputs)
    dora = (dtype_bytes + 4) * sum(shape.lora_outputs) if lora.use_dora else 0
    return norms + attention + mlp + lora_inputs + dora


def _text_shape(model: nn.Module, text_config: PretrainedConfig) -> tuple[LayerShape, int]:
    decoder = model.get_decoder()
    blocks = decoder.layers
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    attention_width = text_config.num_attention_heads * head_dim
    # transformers repeats k and v to all heads for head sizes over 256 (use_gqa_in_sdpa).
    key_value_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    key_value_width = (key_value_heads if head_dim <= 256 else text_config.num_attention_heads) * head_dim
    shape = _layer_shape(blocks[0], text_config.hidden_size, attention_width, key_value_width, text_config.intermediate_size)
    return shape, len(blocks)


def _vision_parts(model: nn.Module) -> tuple[nn.Module | None, PretrainedConfig | None]:
    for name in ("visual", "vision_tower", "vision_model"):
        for module_name, module in model.named_modules():
            if module_name.rsplit(".", 1)[-1] == name:
                return module, getattr(module, "config", None)
    return None, None


# Model types whose image processor transformers registers under another type.
IMAGE_PROCESSOR_TYPES = {"glm4v_moe": "glm4v"}


def image_tokens(model_config: PretrainedConfig, pixels: int) -> tuple[int, int]:
    """Return (patches, language-model tokens) for a square image of `pixels` pixels with max_pixels set to that.

    Where the model's transformers image processor counts patches (`get_number_of_image_patches`),
    it gives the count: it rounds to whole merged patches and applies the model's pixel budget.
    GLM-4.1V counts both frames of an image against max_pixels, so one image gets about half of
    them. Otherwise each patch_size x patch_size square is one patch. spatial_merge_size^2
    patches become one token, e.g. 1024 patches with merge 2 -> 256 tokens.
    """
    vision_config = model_config.vision_config
    patch = vision_config.patch_size
    merge = getattr(vision_config, "spatial_merge_size", 1)
    processor = _image_processor(model_config, pixels)
    if processor is not None:
        side = math.isqrt(pixels)
        patches = processor.get_number_of_image_patches(side, side, {})
    else:
        patches = max(1, pixels // (patch * patch))
    return patches, max(1, patches // (merge * merge))


def _image_processor(model_config: PretrainedConfig, max_pixels: int) -> Any | None:
    """Build the model type's transformers image processor with this pixel limit, or None where it has none that counts patches."""
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    model_type = IMAGE_PROCESSOR_TYPES.get(model_config.model_type, model_config.model_type)
    entry = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if isinstance(entry, dict):  # transformers 5 names a class per backend (pil, torchvision)
        names = list(entry.values())
    elif isinstance(entry, str):
        names = [entry]
    else:
        names = list(entry or ())
    classes = [get_image_processor_class_from_name(name) for name in names if name]
    counting = [cls for cls in classes if cls is not None and hasattr(cls, "get_number_of_image_patches")]
    if not counting:
        return None
    vision_config = model_config.vision_config
    return counting[0](
        patch_size=vision_config.patch_size,
        merge_size=getattr(vision_config, "spatial_merge_size", 1),
        temporal_patch_size=getattr(vision_config, "temporal_patch_size", 1),
        size={"shortest_edge": min(max_pixels, 28 * 28), "longest_edge": max_pixels},
    )


def estimate_memory(
    config: RunConfig,
    model_config: PretrainedConfig,
    workload: Workload,
    *,
    device: str = "cuda",
    gpu_gib: float | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one training process for this run and workload."""
    dtype_bytes = _compute_dtype_bytes(config, device)
    model = build_meta_model(model_config)
    weight_bytes, _, weight_note = _weight_bytes(model, config, dtype_bytes)
    text_config = model_config.get_text_config()
    peft_model = apply_lora_on_meta(model, config.lora)
    lora_count, dora_count, full_count = _trainable_split(peft_model)
    state_bytes, state_note = _optimizer_state_bytes_per_value(config.train.optim)
    estimate = MemoryEstimate(gpu_bytes=int(gpu_gib * GIB) if gpu_gib else None, device=device)
    estimate.add("weights", weight_bytes, weight_note)
    estimate.add("LoRA weights + gradients", (lora_count + dora_count) * 8, f"{lora_count:,} LoRA parameters, float32")
    if dora_count:
        estimate.add("DoRA magnitudes (in the line above)", 0, f"{dora_count:,} magnitude parameters")
    estimate.add("optimizer states", (lora_count + dora_count) * state_bytes, state_note)
    if full_count:
        full_dtype = 4 if config.quantization.bits is not None else dtype_bytes
        # A trainable copy next to the frozen original, its gradient and its optimizer states.
        per_value = 2 * full_dtype + state_bytes * full_dtype / 4
        names = ", ".join(config.lora.modules_to_save) or "merger"
        estimate.add("modules_to_save", full_count * per_value, f"{names}: {full_count:,} parameters trained in full")

    shape, layer_count = _text_shape(peft_model.get_base_model(), text_config)
    tokens = workload.tokens
    per_layer = layer_activation_bytes(shape, dtype_bytes, config.lora, config.lora.r)
    vocab = text_config.vocab_size
    # The logits and their gradient buffer in the compute dtype, and one chunk's float32 work
    # (model/cross_entropy.py). An upper bound: logits exist only where the next token is supervised.
    logit_count = int(tokens * workload.logit_share * vocab)
    # Float32 log-probabilities, plus a float32 copy of the logits when they are in a smaller dtype.
    chunk_work = min(CHUNK_BYTES, (4 if dtype_bytes == 4 else 8) * logit_count)
    loss_bytes = 2 * dtype_bytes * logit_count + chunk_work
    loss_note = f"{vocab:,} vocabulary entries x {2 * dtype_bytes} bytes per token (at most)"
    edges = 4 * shape.hidden + dtype_bytes * shape.hidden  # final norm, embeddings output
    shape_note = f"{workload.batch_size} x {workload.sequence_length} tokens"
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    if checkpointing_enabled(config.train.gradient_checkpointing, parameter_count):
        kept_bytes = layer_count * dtype_bytes * shape.hidden + edges
        estimate.add("activations", tokens * kept_bytes, f"{shape_note}; checkpointing keeps {layer_count} layer inputs")
        # The loss's backward ends before the first layer is recomputed, so only the larger counts.
        recomputed = tokens * per_layer
        if recomputed > loss_bytes:
            estimate.add("backward peak: 1 recomputed layer", recomputed, f"{per_layer / 1024:.0f} KiB/token; larger than the loss's {loss_bytes / GIB:.2f} GiB")
        else:
            estimate.add("backward peak: loss (logits)", loss_bytes, f"{loss_note}; larger than 1 recomputed layer")
    else:
        kept_bytes = layer_count * per_layer + edges
        estimate.add("activations", tokens * kept_bytes, f"{shape_note}; {layer_count} layers x {per_layer / 1024:.0f} KiB/token")
        estimate.add("backward peak: loss (logits)", loss_bytes, loss_note)
    _add_vision(estimate, peft_model.get_base_model(), config, workload, dtype_bytes)
    if device != "cpu":
        estimate.add("CUDA context and allocator", CUDA_OVERHEAD_BYTES, "fixed overhead (an assumption)")
    return estimate


def _add_vision(estimate: MemoryEstimate, model: nn.Module, config: RunConfig, workload: Workload, dtype_bytes: int) -> None:
    """Add the vision tower's activations for the workload's images."""
    if workload.images_per_sample <= 0:
        return
    vision, vision_config = _vision_parts(model)
    if vision is None or vision_config is None:
        raise ModelError("--images: this model has no vision tower; pass --images 0 for text-only data")
    pixels = workload.image_pixels or (vision_config.image_size**2)
    patches, merged = image_tokens(model.config, pixels)
    images = workload.batch_size * workload.images_per_sample
    hidden = vision_config.hidden_size
    blocks = getattr(vision, "blocks", None)
    block = blocks[0] if blocks is not None else vision
    mlp_width = max((module.out_features for name, module in block.named_modules()
                     if isinstance(module, nn.Linear) and re.search(r"(gate|up)_proj$", name)), default=4 * hidden)
    shape = _layer_shape(block, hidden, hidden, hidden, mlp_width)  # vision attention has no grouped heads
    trains_vision = config.lora.vision or config.lora.train_merger or bool(
        set(config.lora.modules_to_save) & set(VISION_MODULE_NAMES)
    )
    note = f"{images} image(s) x {pixels:,} pixels = {patches:,} patches, {merged:,} tokens each"
    if trains_vision:
        per_patch = len(blocks or [block]) * layer_activation_bytes(shape, dtype_bytes, config.lora, config.lora.r)
        estimate.add("vision activations", images * patches * per_patch, note + "; kept for backward")
    else:
        # Frozen tower: nothing is kept, and one block's forward is the largest transient.
        per_patch = dtype_bytes * (4 * hidden + 3 * mlp_width)
        estimate.add("vision forward (transient)", images * patches * per_patch, note + "; frozen, not kept")
