"""Loading a model and its processor from a resolved folder."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from vlmtune.config import ModelSettings, QuantizationSettings
from vlmtune.errors import ModelError
from vlmtune.model.hub import resolve_model_path
from vlmtune.notices import log_once

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a device setting, raising ModelError for one this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"device {name!r} is invalid: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {name!r}: no CUDA GPU is available on this machine; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class LoadedModel:
    model: PreTrainedModel
    processor: Any
    """An AutoProcessor for vision-language models, the tokenizer for text-only ones."""
    path: str

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.model.generation_config, self.processor)


def stop_token_ids(generation_config: GenerationConfig | None, processor: Any) -> list[int]:
    """Return every id that ends a reply: generation_config.eos_token_id (else the tokenizer's eos), and the
    special token the chat template closes replies with when generation_config leaves it out.

    Gemma's template, for one, ends a reply with `<end_of_turn>`; a model folder whose
    generation_config names only `<eos>` would otherwise train and generate past it.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the model has no stop token: neither generation_config.eos_token_id nor an eos_token is set")
    ids = [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]
    closing = template_reply_end(processor)
    if closing is not None and closing not in ids:
        log_once(
            logger,
            logging.INFO,
            "the chat template ends replies with %s, which generation_config.eos_token_id does not list; it is a stop "
            "token too, in training and in generation",
            tokenizer.convert_ids_to_tokens(closing),
        )
        ids.append(closing)
    return ids


REPLY_PROBE = "vlmtune-reply-probe"


def template_reply_end(processor: Any) -> int | None:
    """Return the special token the chat template writes right after an assistant reply's text, if any.

    None for templates that write nothing there (GLM-4.1V: the next role token ends the
    reply) or whose rendering of a one-turn probe fails.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": REPLY_PROBE}]
    try:
        closed = processor.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that rejects the probe: the encoder reports its error on real data
        return None
    if REPLY_PROBE not in closed:
        return None
    following = closed[closed.rindex(REPLY_PROBE) + len(REPLY_PROBE) :]
    ids = tokenizer(following, add_special_tokens=False)["input_ids"] if following else []
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return ids[0] if ids and ids[0] in special else None


def load_processor(path: str, trust_remote_code: bool = False) -> Any:
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if not getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{path}: the processor has no chat template; vlmtune needs one to render conversations")
    return processor


def load_processor_and_stop_ids(settings: ModelSettings) -> tuple[Any, list[int]]:
    """Load the processor and the stop ids without the weights, for encoding and inspecting data."""
    path = str(resolve_model_path(settings))
    processor = load_processor(path, settings.trust_remote_code)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        generation_config = None
    return processor, stop_token_ids(generation_config, processor)


# Modules kept in full precision under quantization: the vision side and the output head.
# transformers matches these from the start of a module's full name (or as a suffix).
UNQUANTIZED_MODULES = [r"(.*\.)?visual", r"(.*\.)?vision_tower", r"(.*\.)?vision_model", r"(.*\.)?merger", "lm_head"]


def check_bitsandbytes(device: torch.device) -> None:
    """Fail before loading when bitsandbytes is missing or cannot run on this device."""
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as error:
        raise ModelError(
            f"quantization needs bitsandbytes, which failed to import ({error}); install it with "
            "`pip install bitsandbytes`, or remove the quantization section"
        ) from None
    try:
        bitsandbytes.functional.quantize_4bit(torch.ones(64, 64, device=device, dtype=torch.float32))
    except Exception as error:  # bitsandbytes raises several types when no backend fits the device
        raise ModelError(
            f"bitsandbytes {bitsandbytes.__version__} cannot quantize on {device} ({type(error).__name__}: {error}); "
            "run on a CUDA GPU, or remove the quantization section and train in bf16/fp32"
        ) from None


def quantization_config(settings: QuantizationSettings):
    from transformers import BitsAndBytesConfig

    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=DTYPES[settings.compute_dtype],
        llm_int8_skip_modules=UNQUANTIZED_MODULES,
    )


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weight_files(folder: Path) -> None:
    """Raise ModelError for a model folder whose weight files are missing, as an interrupted download leaves it."""
    redownload = "the download may be incomplete: download the model again, or give another model.name_or_path"
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ModelError(f"model.name_or_path: {index} is not a valid weight index ({error}); {redownload}") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ModelError(
                f"model.name_or_path: {folder} lacks {len(missing)} of the {len(shards)} weight files that {index_name} "
                f"lists (first: {missing[0]}); {redownload}"
            )
        return
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"model.name_or_path: {folder} has config.json but no weights (*.safetensors or *.bin); {redownload}")


def load_model(
    settings: ModelSettings, *, for_training: bool = False, quantization: QuantizationSettings | None = None
) -> LoadedModel:
    """Resolve, then load model and processor with the settings' dtype, device, attention and quantization."""
    path = str(resolve_model_path(settings))
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    quantized = quantization is not None and quantization.bits is not None
    if quantized:
        check_bitsandbytes(device)
    processor = load_processor(path, settings.trust_remote_code)

    check_weight_files(Path(path))
    config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    is_vision_language = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    auto_class = AutoModelForImageTextToText if is_vision_language else AutoModelForCausalLM
    extra = {"quantization_config": quantization_config(quantization), "device_map": {"": device}} if quantized else {}
    model = auto_class.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=settings.attn_implementation,
        trust_remote_code=settings.trust_remote_code,
        **extra,
    )
    if not quantized:
        model.to(device)
    if not for_training:
        model.eval()
    precision = f"{quantization.bits}-bit language model, {dtype} elsewhere" if quantized else str(dtype)
    logger.info("loaded %s (%s) as %s on %s", path, type(model).__name__, precision, device)
    return LoadedModel(model=model, processor=processor, path=path)


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_folder(adapter_dir: str | Path, setting: str = "--adapter") -> dict[str, Any]:
    """Return the adapter's config, or raise ModelError naming `setting` unless the folder contains a whole saved adapter.

    Reads adapter_config.json and the weights' safetensors header, not the weights, so it is called
    before anything slow is loaded. A half-written or truncated folder fails here with the file named.
    """
    folder = Path(adapter_dir)
    pass_folder = "pass the output folder of `vlmtune train` or one of its checkpoint-N folders"
    if not folder.is_dir():
        raise ModelError(f"{setting}: folder not found: {folder}")
    config_path, weights_path = folder / "adapter_config.json", folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise ModelError(f"{setting}: no adapter_config.json in {folder}; {pass_folder}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        config, problem = None, str(error)
    else:
        problem = "" if isinstance(config, dict) else f"a JSON {type(config).__name__}, not an object"
    if problem:
        raise ModelError(f"{setting}: {config_path} is not a valid adapter config ({problem}); the folder may be half-written, {pass_folder}")
    if not weights_path.is_file():
        raise ModelError(f"{setting}: {folder} has adapter_config.json but no {ADAPTER_WEIGHTS}, the adapter's weights; {pass_folder}")
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            weights.keys()
    except Exception as error:  # safetensors raises its own error type and OSError for unreadable files
        raise ModelError(
            f"{setting}: cannot read {weights_path} ({error}); the file is incomplete or damaged, {pass_folder}"
        ) from None
    return config


def load_adapter(loaded: LoadedModel, adapter_dir: str) -> LoadedModel:
    """Attach a saved LoRA adapter to a loaded base model, for inference."""
    from peft import PeftModel

    check_adapter_folder(adapter_dir)
    with adapter_fit_errors(adapter_dir, loaded.path):
        model = PeftModel.from_pretrained(loaded.model, adapter_dir)
    model.eval()
    logger.info("attached adapter %s", adapter_dir)
    return LoadedModel(model=model, processor=loaded.processor, path=loaded.path)


@contextlib.contextmanager
def adapter_fit_errors(adapter_dir: str, base_path: str) -> Iterator[None]:
    """Turn peft's errors for an adapter of another base model (missing modules, other shapes) into ModelError."""
    from peft import NoMatchingPeftModuleError

    try:
        yield
    except (NoMatchingPeftModuleError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "size mismatch" not in str(error):
            raise
        recorded = adapter_base_model(adapter_dir)
        first_line = str(error).strip().splitlines()[0]
        raise ModelError(
            f"adapter {adapter_dir} does not fit the base model {base_path} ({first_line}); it was trained on "
            f"{recorded or 'a base it does not record'}, so load it on that model (--model, or model.name_or_path in a "
            "config) or use an adapter of this one"
        ) from None


def adapter_base_model(adapter_dir: str) -> str | None:
    """Return the base model recorded in an adapter's adapter_config.json, if any.

    A missing or unreadable config records none. Commands that load the adapter call
    check_adapter_folder first, which names such a folder's problem.
    """
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config.get("base_model_name_or_path") if isinstance(config, dict) else None


AUTO_CHECKPOINTING_PARAMETERS = 1_000_000_000
"""train.gradient_checkpointing=auto turns checkpointing on from this many parameters."""


def parameter_count_text(count: int | float) -> str:
    """Format a parameter count with a unit suffix: 9.41B, 4.23M, 120K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:g}"


def checkpointing_enabled(setting: bool | str, parameter_count: int) -> bool:
    """Resolve train.gradient_checkpointing: true, false, or auto (on for models of 1B parameters or more)."""
    if setting != "auto":
        return bool(setting)
    return parameter_count >= AUTO_CHECKPOINTING_PARAMETERS


def prepare_for_training(model: PreTrainedModel, gradient_checkpointing: bool) -> None:
    """Turn on gradient checkpointing (non-reentrant) when asked. Every weight keeps its loaded dtype.

    Quantized models do not go through peft's `prepare_model_for_kbit_training`, which casts
    every weight that is not quantized (embeddings, output head, vision tower, norms) to
    float32. For GLM-4.1V-9B under QLoRA those are 2.13B parameters: 3.98 GiB more than in
    bfloat16, the dtype they keep here, as in unquantized LoRA training. The adapter weights
    are float32 either way.
    """
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
