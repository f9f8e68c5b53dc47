"""Typed settings for a vlmtune run, loaded from YAML with `section.key=value` overrides.

A config file has one section per stage:

    model:    {name_or_path: ZhipuAI/GLM-4.1V-9B-Thinking, hub: modelscope}
    data:     {train: [data/persona_zh/train.json], max_length: 1024}
    lora:     {r: 8, alpha: 16}
    train:    {output_dir: outputs/run, num_train_epochs: 3}
    tracking: {backend: swanlab}

Every problem in a file and its overrides is collected and reported at once, each
naming the key as the user wrote it.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmtune.errors import ConfigError

logger = logging.getLogger(__name__)


IMAGE_DATALOADER_WORKERS = 2
"""Batch-preparing processes that train.dataloader_num_workers=auto starts for data with image files."""

# Names of the vision tower and its merger in GLM-4.1V and Qwen2-VL, as modules_to_save entries.
VISION_MODULE_NAMES = ("visual", "vision_tower", "vision_model", "merger")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


HUB_PREFIXES = {"modelscope:": "modelscope", "huggingface:": "huggingface"}
"""Prefixes of a model name or dataset path that name a hub: `modelscope:namespace/name`."""

HUB_HINT = "; for a dataset on a hub, write modelscope:namespace/name or huggingface:namespace/name"


def _split_hub_prefix(value: str, key: str, hub: str | None) -> tuple[str, str | None]:
    """Return the value without a hub prefix and the hub it names (None without a prefix).

    Raises ValueError when the prefix contradicts an explicit hub setting.
    """
    for prefix, named in HUB_PREFIXES.items():
        if value.startswith(prefix):
            if hub is not None and hub not in (named, "auto"):
                raise ValueError(f"{key} {value!r} names {named}, but hub is {hub}; remove the prefix or the hub setting")
            return value.removeprefix(prefix).strip(), named
    return value, None


class ModelSettings(_Section):
    """Model source and loading options."""

    name_or_path: str = Field(
        description="Local folder (relative to the working folder or the config file), ModelScope id or Hugging Face id."
    )
    hub: Literal["auto", "local", "modelscope", "huggingface"] = Field(
        "auto",
        description="Where name_or_path lives. auto: a local folder if one exists at that path or the "
        "name can only be a path (absolute, or starting with ./, ../ or ~), otherwise the Hugging Face Hub.",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit. None: the default branch.")
    cache_dir: str | None = Field(None, description="Download folder for hub models. None: the hub client's default.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, float32 on CPU."
    )
    attn_implementation: str = Field("sdpa", description="sdpa, eager or flash_attention_2 (needs flash-attn).")
    device: str = Field("auto", description="auto: cuda when available, else cpu. Or cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model. Off unless you trust it.")

    @model_validator(mode="before")
    @classmethod
    def _read_hub_prefix(cls, value: Any) -> Any:
        """Turn `modelscope:namespace/name` into name_or_path and hub, as dataset paths allow."""
        if isinstance(value, dict) and isinstance(value.get("name_or_path"), str):
            name, hub = _split_hub_prefix(value["name_or_path"], "name_or_path", value.get("hub"))
            if hub is not None:
                return {**value, "name_or_path": name, "hub": hub}
        return value


class DatasetSpec(_Section):
    """One dataset file or folder, local or on a hub, and how to read it."""

    path: str = Field(
        description="A .json (array), .jsonl, .csv or .parquet file, a folder of them, or a save_to_disk "
        "folder; relative to the working folder or the config file. With a hub: the dataset id, "
        "e.g. modelscope:namespace/name."
    )
    hub: Literal["local", "modelscope", "huggingface"] = Field(
        "local",
        description="Where the dataset is: a local path, or a dataset repository on ModelScope or the Hugging Face "
        "Hub, downloaded into the hub client's cache. A path that starts with modelscope: or huggingface: sets it.",
    )
    files: list[str] = Field(
        default_factory=list,
        description="With a hub: the files of the repository to download, as glob patterns (train/*.jsonl). "
        "Empty: all of them, which must then contain exactly one dataset file.",
    )
    revision: str | None = Field(None, description="With a hub: branch, tag or commit. None: the default branch.")
    layout: Literal["auto", "alpaca", "sharegpt", "messages", "query_response"] = Field(
        "auto", description="auto: detected from the first example's keys."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename the file's columns to the layout's names, e.g. {instruction: question, output: answer}.",
    )
    ratio: float = Field(
        1.0, gt=0, description="Share of this dataset's examples to use: 0.5 samples half, 2.0 repeats it twice."
    )
    split: str | None = Field(None, description="Split of a save_to_disk DatasetDict. None: train.")

    @model_validator(mode="before")
    @classmethod
    def _read_hub_prefix(cls, value: Any) -> Any:
        """Turn `modelscope:namespace/name[/file/in/repo]` into hub, path and files."""
        if not (isinstance(value, dict) and isinstance(value.get("path"), str)):
            return value
        path, hub = _split_hub_prefix(value["path"], "path", value.get("hub"))
        if hub is None:
            return value
        value = {**value, "path": path, "hub": hub}
        parts = path.split("/")
        if len(parts) > 2 and all(parts):
            if value.get("files"):
                raise ValueError(f"path {path!r} names a file of the repository and files is set too; use one of them")
            value.update(path="/".join(parts[:2]), files=["/".join(parts[2:])])
        return value

    @model_validator(mode="after")
    def _check_hub_fields(self) -> DatasetSpec:
        if self.hub == "local":
            if self.files or self.revision is not None:
                raise ValueError(
                    "files and revision apply to hub datasets only; set hub: modelscope or huggingface, or remove them"
                )
            return self
        parts = self.path.split("/")
        if len(parts) != 2 or not all(parts) or any(character.isspace() for character in self.path):
            raise ValueError(
                f"{self.hub} dataset id {self.path!r} is not of the form namespace/name; copy it from the dataset's page"
            )
        return self

    @property
    def label(self) -> str:
        """The path as the user wrote it, with the hub prefix for a hub dataset."""
        return self.path if self.hub == "local" else f"{self.hub}:{self.path}"


class DataSettings(_Section):
    """Training files and the rules that turn their conversations into encoded samples."""

    train: list[DatasetSpec] = Field(
        min_length=1,
        description="Training datasets: a list of paths (modelscope:ID or huggingface:ID for a hub dataset), "
        "or of {path, hub, files, revision, layout, columns, ratio, split} entries.",
    )
    validation: list[DatasetSpec] = Field(
        default_factory=list, description="Validation datasets. Empty: hold out val_size of the training data."
    )
    val_size: float = Field(0.0, ge=0, lt=1, description="Fraction of the training examples held out for validation.")
    seed: int = Field(42, description="Seed for dataset sampling and the validation split.")
    on_invalid: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first invalid example. skip: skip it, count it and report at the end."
    )
    dedup: bool = Field(
        False,
        description="Remove duplicated training examples (across all training files) and validation examples that "
        "repeat a training example. Both are always reported.",
    )
    system_prompt: str | None = Field(
        None, description="System prompt for examples that carry none. None: no system turn."
    )
    max_length: int = Field(1024, gt=0, description="Maximum encoded sample length in tokens, image tokens included.")
    on_overlength: Literal["drop", "trim_history", "error"] = Field(
        "drop",
        description="drop: skip a sample longer than max_length and count it. trim_history: remove the oldest "
        "turns until it fits, else drop it. error: stop.",
    )
    train_on: Literal["all_turns", "last_turn"] = Field(
        "all_turns",
        description="Supervise every assistant turn, or only the last one. A reply before the last that has "
        "reasoning is never supervised, because the chat template drops reasoning from earlier turns.",
    )
    thinking: Literal["auto", "think_answer", "think", "none"] = Field(
        "auto",
        description="Assistant reply layout. think_answer: <think>\\n{reasoning}</think>\\n<answer>{answer}</answer> "
        "(GLM-4.1V-Thinking). think: the reasoning goes to the chat template as reasoning_content, which renders it "
        "(GLM-4.5V, Qwen3 style). none: the answer alone, without reasoning or tags. auto: think when the template "
        "renders reasoning_content, else think_answer when the tokenizer has <think> and <answer> tokens, else none.",
    )
    max_samples: int | None = Field(None, gt=0, description="Use at most this many examples (for quick runs).")
    cache: bool = Field(
        True,
        description="Save encoded samples under a key of data, tokenizer, template and settings. "
        "A later run with the same inputs loads them instead of encoding again, and processes "
        "encoding the same inputs at once (torchrun ranks) wait for the first one.",
    )
    cache_dir: str | None = Field(
        None, description="Folder for encoded samples. None: $VLMTUNE_CACHE, else ~/.cache/vlmtune/encoded."
    )
    num_proc: int | None = Field(None, gt=0, description="Processes that encode the data (datasets.map). None: one.")
    max_pixels: int | None = Field(
        None,
        gt=0,
        description="Largest image area in pixels; larger images are scaled down. GLM-4.1V counts both frames of an "
        "image against it, so one image gets about half. None: the processor's limit.",
    )
    min_pixels: int | None = Field(
        None, gt=0, description="Smallest image area in pixels; smaller images are scaled up. None: the processor's limit."
    )

    @model_validator(mode="after")
    def _check_validation_source(self) -> DataSettings:
        if self.max_pixels is not None and self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels ({self.min_pixels}) is larger than data.max_pixels ({self.max_pixels})")
        if self.validation and self.val_size > 0:
            raise ValueError("set either data.validation (files) or data.val_size (a held-out fraction), not both")
        return self

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _accept_plain_paths(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        for item in value if isinstance(value, list) else []:
            # YAML reads `- modelscope:` with nothing after the colon as the mapping {modelscope: null}.
            if isinstance(item, dict) and len(item) == 1:
                [(key, entry)] = item.items()
                if f"{key}:" in HUB_PREFIXES and entry is None:
                    raise ValueError(f"'{key}:' names a hub but no dataset id; write {key}:namespace/name")
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, str) else item for item in value]
        return value


class LoraSettings(_Section):
    """LoRA adapter settings, passed to peft.LoraConfig."""

    r: int = Field(8, gt=0, description="Rank of the LoRA matrices.")
    alpha: int = Field(16, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    vision: bool = Field(False, description="Also add LoRA to the vision tower's Linear layers (qkv, proj, MLP).")
    train_merger: bool = Field(False, description="Fully train the vision merger (the projector into the language model).")
    use_dora: bool = Field(False, description="DoRA: learn a magnitude vector besides the low-rank update.")
    use_rslora: bool = Field(False, description="rsLoRA: scale updates by alpha / sqrt(r) instead of alpha / r.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="Adapter initialisation. pissa and olora start from the weights' principal directions; the "
        "saved adapter is converted so it still loads on the unchanged base model.",
    )
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="Rank per module-name regex matched at the end of names, e.g. {down_proj: 16}.")
    alpha_pattern: dict[str, int] = Field(default_factory=dict, description="Alpha per module-name regex, like rank_pattern.")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter, e.g. [lm_head]. Their cost is logged.",
    )
    target_modules: str | list[str] = Field(
        "auto",
        description="auto: every Linear layer of the language model. A list of module names "
        "(matched on the last name part), or one regular expression matched on full module names.",
    )
    init_from: str | None = Field(
        None,
        description="Adapter folder (an earlier run's output_dir or one of its checkpoint-N) whose LoRA weights "
        "this run starts from, to train on with new settings or data. The other lora settings must match it. "
        "None: new weights.",
    )

    @field_validator("target_modules")
    @classmethod
    def _check_target_string(cls, value: str | list[str]) -> str | list[str]:
        """Reject the strings other tools read differently: one string is a regular expression of full names here."""
        if not isinstance(value, str) or value == "auto":
            return value
        if value in ("all", "all-linear"):
            raise ValueError(
                f"{value!r} is what LLaMA-Factory, ms-swift or PEFT call all Linear layers; write auto (every Linear "
                "layer of the language model) and add lora.vision: true to adapt the vision tower too"
            )
        names = [name.strip() for name in value.split(",")]
        if all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in names):
            raise ValueError(
                f"{value!r} is read as one regular expression matched on full module names (such as "
                f"model.language_model.layers.0.self_attn.q_proj); for module names write a list: [{', '.join(names)}]"
            )
        return value

    @model_validator(mode="after")
    def _check_init_from(self) -> LoraSettings:
        if self.init_from is not None and self.init != "default":
            raise ValueError(
                f"lora.init_from starts from an adapter's weights, so lora.init={self.init!r} has nothing to "
                "initialise; remove one of them"
            )
        return self


class QuantizationSettings(_Section):
    """QLoRA: load the language model's Linear layers in 4 or 8 bits with bitsandbytes."""

    bits: Literal[4, 8] | None = Field(None, description="None: no quantization.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 or fp4.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype of 4-bit matmuls.")


class TrainSettings(_Section):
    """Trainer settings; names follow transformers.TrainingArguments."""

    output_dir: str = Field("outputs/run", description="Folder for checkpoints, the adapter and the run manifest.")
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps. -1: run num_train_epochs.")
    per_device_train_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = Field(0.03, ge=0, description="A count of steps, or a fraction of all steps when below 1.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(100, gt=0)
    eval_steps: int = Field(50, gt=0, description="Evaluate on the validation data every this many steps (when there is any).")
    save_total_limit: int | None = 2
    group_by_length: bool = Field(
        True, description="Batch samples of similar length together so less compute goes to padding."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in the backward pass (non-reentrant) to save memory, at about a third "
        "more compute. auto: on for models of 1B parameters or more.",
    )
    padding_free: bool | Literal["auto"] = Field(
        "auto",
        description="Put each batch's samples in one row with per-sample positions, so no compute goes to "
        "padding. Checked on the model before training: true stops with an error if packed and separate "
        "forward passes differ. auto: on with flash attention (variable-length kernels) when the check "
        "passes, else padded batches; with sdpa or eager attention a packed row costs a full attention mask.",
    )
    seed: int = 42
    dataloader_num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="Processes that prepare batches beside training, kept for the whole run. auto: "
        f"{IMAGE_DATALOADER_WORKERS} when training on a GPU and samples have image files, which are processed "
        "when batched, else 0 (the training process).",
    )
    optim: str = Field(
        "adamw_torch",
        description="Optimizer name as in TrainingArguments.optim, e.g. adamw_torch, adamw_8bit, paged_adamw_8bit, "
        "paged_adamw_32bit (the 8-bit and paged ones need bitsandbytes).",
    )
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed JSON config file (e.g. examples/deepspeed/zero2.json), passed to TrainingArguments; "
        "needs `pip install deepspeed` and a launcher such as `deepspeed` or `accelerate launch`. None: off.",
    )

    @field_validator("optim")
    @classmethod
    def _check_optim(cls, value: str) -> str:
        from transformers.training_args import OptimizerNames

        names = [member.value for member in OptimizerNames]
        if value not in names:
            raise ValueError(f"invalid optimizer {value!r}; valid names: {', '.join(names)}")
        return value


SWANLAB_PROJECT_NAME = re.compile(r"[0-9a-zA-Z_\-+.]{1,100}")


class TrackingSettings(_Section):
    """Experiment tracking. No account or network is needed with the defaults."""

    backend: Literal["swanlab", "tensorboard", "none"] = Field("swanlab", description="swanlab, tensorboard or none.")
    project: str = Field(
        "vlmtune", description="SwanLab project name: 1 to 100 ASCII letters, digits and _ - + . (a SwanLab rule; other backends ignore it)."
    )
    experiment_name: str | None = Field(None, description="Run name. None: the output folder's name.")
    swanlab_mode: Literal["offline", "local", "cloud"] = Field(
        "offline",
        description="offline: write the run folder only (upload it later with `swanlab sync`). local: also keep the "
        "run in a local database, for SwanLab's dashboard on this machine (`swanlab watch OUTPUT_DIR/swanlog`, no "
        "account). cloud: upload while training (needs `swanlab login`).",
    )
    log_dir: str | None = Field(None, description="Run folder root. None: OUTPUT_DIR/swanlog or OUTPUT_DIR/tensorboard.")

    @model_validator(mode="after")
    def _check_project(self) -> TrackingSettings:
        # SwanLab's own rule (swanlab.sdk.internal.pkg.constraints.ProjectName), checked before the model loads.
        if self.backend == "swanlab" and not SWANLAB_PROJECT_NAME.fullmatch(self.project):
            raise ValueError(
                f"tracking.project {self.project!r} is not a valid SwanLab project name: use 1 to 100 ASCII letters, "
                "digits and _ - + . (for example persona-cat); experiment_name and output folders may use any characters"
            )
        return self


class GenerationSettings(_Section):
    """Decoding settings for chat and sample generations."""

    max_new_tokens: int = Field(1024, gt=0, description="Maximum tokens per reply; a reply cut here is marked.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0: off.")
    show_thinking: bool = Field(False, description="Show the reasoning of thinking models, not only the answer.")


class EvalPrompt(_Section):
    """A fixed prompt for sample generations."""

    text: str = Field(description="The user message.")
    images: list[str] = Field(default_factory=list, description="Image paths or URLs shown with the text.")


class EvaluationSettings(_Section):
    """Sample generations and their metrics, before training and at every evaluation."""

    generate: bool = Field(True, description="Generate replies to the fixed prompts and log their metrics.")
    prompts: list[EvalPrompt] = Field(default_factory=list, description="Extra prompts: strings or {text, images}.")
    num_data_prompts: int = Field(
        4, ge=0, description="Prompts taken from the validation split (else the training data), without their replies."
    )
    max_new_tokens: int = Field(128, gt=0, description="Token limit per sample reply; a reply cut here counts as not stopped.")
    style_patterns: list[str] = Field(
        default_factory=list, description="Regular expressions whose share of matching replies is logged, e.g. 喵."
    )

    @field_validator("prompts", mode="before")
    @classmethod
    def _accept_plain_prompts(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"text": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("style_patterns")
    @classmethod
    def _check_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"invalid regular expression {pattern!r}: {error}") from None
        return value


class RunConfig(_Section):
    """A whole training run."""

    model: ModelSettings
    data: DataSettings
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationSettings = QuantizationSettings()
    train: TrainSettings = TrainSettings()
    tracking: TrackingSettings = TrackingSettings()
    generation: GenerationSettings = GenerationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()

    @model_validator(mode="after")
    def _check_quantization(self) -> RunConfig:
        bits = self.quantization.bits
        if bits is None:
            return self
        if self.lora.train_merger:
            raise ValueError(
                f"quantization.bits={bits} with lora.train_merger: true is not supported; full fine-tuning of the "
                "merger needs an unquantized model, so remove one of them"
            )
        vision_modules = [name for name in self.lora.modules_to_save if name in VISION_MODULE_NAMES]
        if vision_modules:
            raise ValueError(
                f"quantization.bits={bits} with lora.modules_to_save: {vision_modules} is not supported; full "
                "fine-tuning of the vision tower or merger needs an unquantized model, so remove one of them "
                "(lora.vision: true adds LoRA to the vision tower instead)"
            )
        if self.lora.init in ("pissa", "olora"):
            raise ValueError(
                f"quantization.bits={bits} with lora.init: {self.lora.init} is not supported, because that "
                "initialisation rewrites base weights that are quantized; use lora.init: default or gaussian"
            )
        return self

    @model_validator(mode="after")
    def _check_contradictions(self) -> RunConfig:
        if self.train.max_steps == 0 or self.train.max_steps < -1:
            raise ValueError(f"train.max_steps must be -1 or a positive step count, got {self.train.max_steps}")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `train.learning_rate=2e-4` into (['train', 'learning_rate'], 0.0002).

    The value is read as YAML, so `true`, `3`, `[a, b]` and `null` keep their types.
    """
    if "=" not in text:
        hint = " (write '=' where the full-width '：' is)" if "：" in text else ""
        raise ConfigError(f"invalid override {text!r}: expected SECTION.KEY=VALUE{hint}, for example train.learning_rate=2e-4")
    key, raw_value = text.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"invalid override {text!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return parts, value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _valid_keys(location: tuple) -> list[str]:
    """List the keys allowed where an unknown key was found, for the error message."""
    model: type[BaseModel] = RunConfig
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        inner = getattr(annotation, "__args__", (annotation,))
        nested = [item for item in inner if isinstance(item, type) and issubclass(item, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


# Names that LLaMA-Factory, ms-swift or PEFT use for vlmtune's keys, suggested when one appears.
KEY_ALIASES = {
    "rank": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target": "target_modules",
    "cutoff_len": "max_length",
    "model_name_or_path": "name_or_path",
    "epochs": "num_train_epochs",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "warmup_ratio": "warmup_steps",
    "dataset": "train",
}

# Keys of those tools with no vlmtune key of the same meaning, and what to write instead.
KEY_NOTES = {
    "bf16": "set model.dtype: bfloat16 instead",
    "fp16": "set model.dtype: float16 instead",
    "report_to": "set tracking.backend: swanlab, tensorboard or none instead",
    "template": "not needed: vlmtune renders with the model's own chat template",
    "stage": "not needed: vlmtune runs supervised fine-tuning",
    "finetuning_type": "not needed: vlmtune trains LoRA adapters",
    "quantization_bit": "set quantization.bits instead",
    "warmup_ratio": "warmup_steps below 1 is a fraction of all steps",
}


def _section_keys() -> dict[str, list[str]]:
    """Map each key of a section to its full names, such as learning_rate to [train.learning_rate]."""
    found: dict[str, list[str]] = {}
    for section, field in RunConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for key in annotation.model_fields:
                found.setdefault(key, []).append(f"{section}.{key}")
    return found


def _key_hint(location: tuple, valid_keys: list[str]) -> str:
    """Suggest the key meant by an unknown one: the same or an aliased key here or in another section, else a close name."""
    unknown = str(location[-1])
    name = KEY_ALIASES.get(unknown, unknown)
    section = str(location[-2]) if len(location) > 1 else None
    # At the top level the valid keys are section names, which a flat key of another tool never means ("dataset" is data.train).
    if name in valid_keys and section is not None:
        meant = [name]
    else:
        meant = [key for key in _section_keys().get(name, []) if not key.startswith(f"{section}.")]
    parts = [f"did you mean {' or '.join(meant)}?"] if meant else []
    if unknown in KEY_NOTES:
        parts.append(KEY_NOTES[unknown])
    if not parts:
        close = difflib.get_close_matches(unknown, valid_keys, n=1)
        parts = [f"did you mean {close[0]}?"] if close else []
    return f" ({' '.join(parts)})" if parts else ""


def yaml_key_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path of a YAML document, such as ("train", "learning_rate"), to its 1-based line number."""
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, key.value)
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, value in enumerate(node.value):
                lines[(*path, index)] = value.start_mark.line + 1
                walk(value, (*path, index))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _line_of(loc: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int | None]) -> str:
    """Return " (line N)" for the longest start of `loc` found in the file, or "" for a key it lacks.

    A key path mapped to None (set by an override) has no line.
    """
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            line = lines[loc[:end]]
            return f" (line {line})" if line is not None else ""
    return ""


# Accepted values of each union member, by the tag pydantic puts in the error location.
UNION_MEMBERS = {"bool": "true or false", "str": "a string", "list[str]": "a list of strings", "int": "an integer"}


def _union_member(part: str | int) -> str | None:
    """Describe what a union member accepts, given its tag in an error location, or None for a plain key."""
    if not isinstance(part, str):
        return None
    if part.startswith("literal["):
        return part.removeprefix("literal[").removesuffix("]").replace("'", "")
    return UNION_MEMBERS.get(part)


def _merge_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn the one-error-per-member list pydantic gives for a union field into one error naming every member.

    For `padding_free: maybe` pydantic reports `train.padding_free.bool` and
    `train.padding_free.literal['auto']`; this gives `train.padding_free: must be true or false, or auto`.
    """
    merged: list[dict[str, Any]] = []
    by_field: dict[tuple, dict[str, Any]] = {}
    for item in errors:
        loc = tuple(item["loc"])
        tag = next((index for index, part in enumerate(loc) if _union_member(part)), None)
        if tag is None or item["type"] == "extra_forbidden":
            merged.append(item)
            continue
        field_loc = loc[:tag]
        if field_loc not in by_field:
            by_field[field_loc] = {"type": "union", "loc": field_loc, "input": item.get("input"), "members": []}
            merged.append(by_field[field_loc])
        entry = by_field[field_loc]
        entry["members"].append(_union_member(loc[tag]))
        if len(loc) == tag + 1:  # The member's own error contains the whole value, a nested one only a part.
            entry["input"] = item.get("input")
    for entry in by_field.values():
        members = list(dict.fromkeys(entry.pop("members")))
        entry["msg"] = "must be " + (", or ".join(members) if len(members) > 1 else members[0])
    return merged


SECTION_SHAPES = {"DatasetSpec": "must be a dataset path or a mapping with a path key"}
YAML_BOOLEANS = "YAML reads unquoted yes, no, on, off, true and false as booleans; put the text in quotes"


def _format_validation_error(error: ValidationError, source: str, lines: dict[tuple[str | int, ...], int | None]) -> str:
    errors = _merge_union_errors(error.errors())
    problems = [f"invalid config in {source} ({len(errors)} problem(s)):"]
    flat = [item for item in errors if item["type"] == "extra_forbidden" and len(item["loc"]) == 1]
    if len(flat) > 1 and any(_section_keys().get(KEY_ALIASES.get(str(item["loc"][0]), str(item["loc"][0]))) for item in flat):
        problems.append(
            "  (settings go in sections: model, data, lora, train, ...; a flat file as LLaMA-Factory writes it "
            "is not read, see configs/ for examples)"
        )
    for item in errors:
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        where = _line_of(tuple(item["loc"]), lines)
        if item["type"] == "extra_forbidden":
            valid_keys = _valid_keys(item["loc"])
            hint = _key_hint(tuple(item["loc"]), valid_keys)
            problems.append(f"  - {key}{where}: unknown key{hint}; valid keys here: {', '.join(valid_keys)} (see docs/config.md)")
            continue
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "model_type":  # a section or list entry that is not a mapping
            message = SECTION_SHAPES.get(item["ctx"]["class_name"], "must be a mapping of settings")
        if item["type"] == "string_type" and isinstance(value, bool):
            shown += f"; {YAML_BOOLEANS}"
        if isinstance(value, str) and "：" in value:
            shown += "; the full-width '：' in it reads as text, so write ':' after a key"
        if item["type"] == "value_error" and not item["loc"]:
            problems.append(f"  - {message}")  # a rule across sections; the message names the keys
        else:
            problems.append(f"  - {key}{where}: {message}{shown}")
    return "\n".join(problems)


def build_config(
    tree: dict[str, Any], source: str = "config", lines: dict[tuple[str | int, ...], int | None] | None = None
) -> RunConfig:
    """Validate a settings tree, raising ConfigError that lists every problem at once.

    `lines` (from `yaml_key_lines`) adds the line number of each key that has a problem.
    """
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source, lines or {})) from None


def read_settings_tree(path: Path, label: str, fix: str = "") -> dict[str, Any]:
    """Read a YAML file of settings sections; errors start with `label` and end with `fix`, if given."""
    text = path.read_text(encoding="utf-8")
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{label}: invalid YAML: {error}{_full_width_hint(text)}{fix}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections (model, data, ...)")
    return tree


FULL_WIDTH_PUNCTUATION = {"：": ":", "，": ",", "［": "[", "］": "]", "｛": "{", "｝": "}"}


def _full_width_hint(text: str) -> str:
    """Name the lines whose keys or lists use full-width punctuation, which Chinese input methods type and YAML does not read."""
    for number, line in enumerate(text.splitlines(), start=1):
        code = line.split("#", 1)[0]
        if re.match(r"\s*(-\s*)?[A-Za-z_][A-Za-z0-9_.-]*\s*(：|:\s*[［｛])", code):
            found = sorted({mark for mark in FULL_WIDTH_PUNCTUATION if mark in code})
            marks = ", ".join(f"'{mark}' (write '{FULL_WIDTH_PUNCTUATION[mark]}')" for mark in found)
            return f"\nline {number} has the full-width {marks}: {line.strip()}"
    return ""


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config and apply `section.key=value` overrides.

    Relative paths of datasets, the model, the DeepSpeed file and evaluation prompt images are
    resolved against the config file's folder when the working folder lacks them, so a config
    works from any working folder.
    """
    config_path = Path(path)
    if config_path.is_dir():
        found = sorted(config_path.glob("*.yaml")) + sorted(config_path.glob("*.yml"))
        example = f", e.g. {found[0]}" if found else ""
        raise ConfigError(f"config {config_path} is a folder; pass a YAML file in it{example}")
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}. Pass the path to a YAML file, e.g. configs/demo.yaml")
    tree = read_settings_tree(config_path, str(config_path))
    lines: dict[tuple[str | int, ...], int | None] = dict(yaml_key_lines(config_path.read_text(encoding="utf-8")))
    for override in overrides or []:
        parts, value = parse_override(override)
        _apply_override(tree, parts, value)
        # The value now comes from the command line, so no line of the file is named for it.
        lines = {key: line for key, line in lines.items() if key[: len(parts)] != tuple(parts)}
        lines[tuple(parts)] = None
    source = f"{config_path} with overrides {' '.join(overrides)}" if overrides else str(config_path)
    config = build_config(tree, source=source, lines=lines)
    for field, specs in (("data.train", config.data.train), ("data.validation", config.data.validation)):
        for index, spec in enumerate(specs):
            if spec.hub == "local":
                # A missing path with a colon (an unknown hub prefix) or shaped like namespace/name with no file
                # suffix is most likely a hub id.
                looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec.path) is not None and not Path(spec.path).suffix
                fix = HUB_HINT if ":" in spec.path or looks_like_id else ""
                spec.path = _find_beside_config(spec.path, config_path, f"{field}[{index}].path: dataset", Path.exists, fix)
    if config.train.deepspeed is not None:
        config.train.deepspeed = _find_beside_config(
            config.train.deepspeed,
            config_path,
            "train.deepspeed: file",
            fix="; pass a DeepSpeed JSON file such as examples/deepspeed/zero2.json",
        )
    if config.model.hub in ("auto", "local"):
        # Not found locally, the name is a ModelScope or Hugging Face id.
        config.model.name_or_path = _find_beside_config(config.model.name_or_path, config_path, None, Path.is_dir)
    if config.lora.init_from is not None:
        config.lora.init_from = _find_beside_config(config.lora.init_from, config_path, "lora.init_from: adapter folder", Path.is_dir)
    for number, prompt in enumerate(config.evaluation.prompts):
        for index, image in enumerate(prompt.images):
            if not image.startswith(("http://", "https://", "data:")):
                # Checked here, because a missing one would otherwise stop training after the model has loaded.
                label = f"evaluation.prompts[{number}].images[{index}]: image"
                prompt.images[index] = _find_beside_config(image.removeprefix("file://"), config_path, label)
    return config


def _find_beside_config(
    value: str, config_path: Path, label: str | None, exists=Path.is_file, fix: str = ""
) -> str:
    """Return a path as given when it exists from the working folder, else the same path next to the config file.

    The second is normalised (configs/../data/a.json becomes data/a.json). When neither exists,
    raise a ConfigError that starts with `label`, or return the value unchanged if label is None.
    """
    path = Path(value).expanduser()
    candidate = Path(os.path.normpath(config_path.parent / path))
    if exists(path):
        if not path.is_absolute() and exists(candidate) and candidate.resolve() != path.resolve():
            logger.warning(
                "%s: %s exists in the working folder and next to the config file (%s); using the one in the working "
                "folder. Give an absolute path to choose",
                label.partition(":")[0] if label else "model.name_or_path",
                value,
                candidate,
            )
        return str(path)
    if not path.is_absolute() and exists(candidate):
        return str(candidate)
    if label is None:
        return value
    raise ConfigError(
        f"{label} not found: {value} (looked in the working folder {Path.cwd()} and next to the config file, "
        f"in {config_path.parent.resolve()}){fix}"
    )


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Return the settings as plain data, for YAML dumps and tracker configs."""
    return config.model_dump(mode="json")


def portable_config_dict(config: RunConfig) -> dict[str, Any]:
    """Return config_to_dict with the input files that exist here as absolute paths.

    Datasets, a local model folder, the DeepSpeed file and evaluation prompt images are
    resolved from the working folder when the config loads, so a saved copy with those paths
    relative works only from that folder. train.output_dir stays as given.
    """
    tree = config_to_dict(config)

    def absolute(value: str | None, exists=Path.exists) -> str | None:
        return str(Path(value).expanduser().resolve()) if value and exists(Path(value).expanduser()) else value

    for section in ("train", "validation"):
        for spec in tree["data"][section]:
            if spec["hub"] == "local":
                spec["path"] = absolute(spec["path"])
    tree["train"]["deepspeed"] = absolute(tree["train"]["deepspeed"])
    if tree["model"]["hub"] in ("auto", "local"):
        tree["model"]["name_or_path"] = absolute(tree["model"]["name_or_path"], Path.is_dir)
    tree["lora"]["init_from"] = absolute(tree["lora"]["init_from"], Path.is_dir)
    for prompt in tree["evaluation"]["prompts"]:
        prompt["images"] = [absolute(image, Path.is_file) for image in prompt["images"]]
    return tree


def save_config(config: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the settings as YAML that loads from any working folder, keeping non-ASCII text readable."""
    text = yaml.safe_dump(portable_config_dict(config), allow_unicode=True, sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")
