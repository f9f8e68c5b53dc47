"""LoRA target discovery and the peft adapter: the language model, and the vision tower on request.

On GLM-4.1V the language model's MLP is a fused `gate_up_proj`, while `gate_proj`,
`up_proj` and `down_proj` also exist in the vision tower and its merger. So targets
are resolved against real module names, and only language-model modules are adapted
unless lora.vision is on:

    auto               -> q_proj k_proj v_proj o_proj gate_up_proj down_proj (language model)
    [gate_proj, ...]   -> error: gate_proj matches only vision modules
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import peft
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from vlmtune.config import LoraSettings
from vlmtune.errors import ConfigError
from vlmtune.model.fused_lora import register_fused_linear
from vlmtune.model.loading import ADAPTER_WEIGHTS, check_adapter_folder

logger = logging.getLogger(__name__)


# The vision-to-language projector's module name in GLM-4.1V and Qwen2-VL / Qwen2.5-VL.
MERGER_NAME = "merger"


@dataclass(frozen=True)
class ModuleParts:
    """Qualified-name prefixes of a model's language model and output head."""

    language_model: str
    output_head: str | None

    def part_of(self, name: str) -> str:
        """Classify a module or parameter name: language model, output head, merger or vision tower."""
        if name == self.language_model or name.startswith(self.language_model + "."):
            return "language model"
        if self.output_head is not None and (name == self.output_head or name.startswith(self.output_head + ".")):
            return "output head"
        if f".{MERGER_NAME}." in f".{name}.":
            return "merger"
        return "vision tower"


def find_module_parts(model: nn.Module) -> ModuleParts:
    """Locate the language model (the decoder stack) and the output head by identity."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder_name = head_name = None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder and decoder_name is None:
            decoder_name = name
        if head is not None and module is head and head_name is None:
            head_name = name
    if decoder_name is None:
        raise ConfigError(
            f"cannot find the language model inside {type(model).__name__}: get_decoder() is missing; "
            "set lora.target_modules to a regular expression of full module names"
        )
    return ModuleParts(language_model=decoder_name, output_head=head_name)


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _describe_matches(names: list[str], parts: ModuleParts) -> str:
    counts = Counter(parts.part_of(name) for name in names)
    return ", ".join(f"{count} in the {part}" for part, count in sorted(counts.items())) or "nothing"


def resolve_target_modules(model: nn.Module, target: str | list[str], vision: bool = False) -> list[str]:
    """Return the full names of the Linear layers that LoRA adapts.

    target is "auto", a list of short names (matched on the last name part) or one
    regular expression (matched on full names). Only language-model layers qualify,
    plus the vision tower's when vision is True; the merger never does (train it with
    lora.train_merger). A short name that matches nothing, or only layers outside those
    parts, raises ConfigError saying where it matched.
    """
    parts = find_module_parts(model)
    allowed = {"language model", "vision tower"} if vision else {"language model"}
    linear_names = linear_module_names(model)
    if vision and not any(parts.part_of(name) == "vision tower" for name in linear_names):
        raise ConfigError(f"lora.vision: true, but {type(model).__name__} has no vision tower; set lora.vision: false")
    language_linears = [name for name in linear_names if parts.part_of(name) == "language model"]
    allowed_linears = [name for name in linear_names if parts.part_of(name) in allowed]

    if target == "auto":
        return allowed_linears

    if isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as error:
            raise ConfigError(f"lora.target_modules: invalid regular expression {target!r}: {error}") from None
        matched = [name for name in linear_names if pattern.fullmatch(name)]
        outside = [name for name in matched if parts.part_of(name) not in allowed]
        if not matched:
            raise ConfigError(
                f"lora.target_modules: the regular expression {target!r} matches no Linear layer; "
                f"language-model layers look like {language_linears[0]!r}"
            )
        if outside:
            raise ConfigError(
                f"lora.target_modules: the regular expression {target!r} matches {_describe_matches(matched, parts)} "
                f"(for example {outside[0]!r}); LoRA adapts only the language model (and the vision tower with "
                "lora.vision: true), so narrow the expression"
            )
        return matched

    problems = []
    selected: list[str] = []
    short_names = sorted({name.rsplit(".", 1)[-1] for name in language_linears})
    for short in target:
        everywhere = [name for name in linear_names if name.rsplit(".", 1)[-1] == short]
        usable = [name for name in everywhere if parts.part_of(name) in allowed]
        if not usable:
            where = _describe_matches(everywhere, parts)
            problems.append(f"{short!r} matches {where} and no {' or '.join(sorted(allowed))} Linear layer")
        selected.extend(usable)
    if problems:
        raise ConfigError(
            "lora.target_modules: "
            + "; ".join(problems)
            + f". Language-model Linear layers of {type(model).__name__} are named: {', '.join(short_names)}. "
            "Use target_modules: auto to adapt all of them"
        )
    return sorted(set(selected), key=allowed_linears.index)


def _names_to_pattern(names: list[str], candidates: list[str]) -> str:
    """Build a full-match regex for peft that selects exactly `names` among `candidates`.

    Layer indices are generalised when that selects the same set, so adapter_config.json
    stays readable; otherwise the names are listed one by one.
    """
    groups: dict[str, set[str]] = {}
    for name in names:
        generic = re.sub(r"\.\d+\.", ".*.", name, count=1)
        prefix, _, short = generic.rpartition(".")
        groups.setdefault(prefix, set()).add(short)
    alternatives = []
    for prefix, shorts in groups.items():
        escaped_prefix = re.escape(prefix).replace(r"\.\*\.", r"\.\d+\.")
        alternatives.append(f"{escaped_prefix}\\.({'|'.join(sorted(shorts))})")
    compact = "^(" + "|".join(alternatives) + ")$"
    if {name for name in candidates if re.fullmatch(compact, name)} == set(names):
        return compact
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


# lora.init -> peft's init_lora_weights.
INIT_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def _check_modules_exist(model: nn.Module, names: list[str]) -> None:
    known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in names if name not in known]
    if missing:
        raise ConfigError(
            f"lora.modules_to_save: no module named {', '.join(missing)} in {type(model).__name__}; "
            "use the last part of a module name, e.g. lm_head or embed_tokens"
        )


def count_parameters(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Trainable and total parameter counts per model part."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    parts = find_module_parts(base)
    counts: dict[str, list[int]] = {}
    for name, parameter in base.named_parameters():
        if ".original_module." in name:
            continue  # peft's frozen copy of a module trained through modules_to_save
        trainable_total = counts.setdefault(parts.part_of(name), [0, 0])
        trainable_total[1] += parameter.numel()
        if parameter.requires_grad:
            trainable_total[0] += parameter.numel()
    return {part: (values[0], values[1]) for part, values in counts.items()}


def apply_lora(model: PreTrainedModel, settings: LoraSettings, log: bool = True) -> PeftModel:
    """Wrap the model with a LoRA adapter on the resolved targets; everything else is frozen.

    log=False skips the target and parameter-count messages (the memory estimate builds
    several adapters on meta models).
    """
    targets = resolve_target_modules(model, settings.target_modules, vision=settings.vision)
    if settings.train_merger and not any(MERGER_NAME in name.split(".") for name, _ in model.named_modules()):
        raise ConfigError(
            f"lora.train_merger: true, but {type(model).__name__} has no {MERGER_NAME!r} module (the vision projector); "
            "set lora.train_merger: false"
        )
    modules_to_save = [*settings.modules_to_save, *([MERGER_NAME] if settings.train_merger else [])]
    _check_modules_exist(model, settings.modules_to_save)
    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_names_to_pattern(targets, linear_module_names(model)),
        modules_to_save=modules_to_save or None,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        init_lora_weights=INIT_WEIGHTS[settings.init],
        rank_pattern=settings.rank_pattern,
        alpha_pattern=settings.alpha_pattern,
        task_type="CAUSAL_LM",
    )
    _check_fused_experts(model, lora_config, settings)
    peft_model = get_peft_model(model, register_fused_linear(lora_config))
    if log:
        _log_targets(peft_model, targets, settings)
        _log_trainable(peft_model, settings)
    return peft_model


def _short_names(names) -> str:
    return ", ".join(sorted({name.rsplit(".", 1)[-1] for name in names}))


def _fused_expert_targets(model: PreTrainedModel, lora_config: LoraConfig) -> set[str]:
    """Return the fused MoE expert tensors that peft adapts for this config, found by its own conversion.

    With transformers 5, MoE models such as GLM-4.5V keep their routed experts as stacked
    tensors (`mlp.experts.gate_up_proj`), not Linear layers. peft (0.21.2 here) moves every
    `gate_proj`/`up_proj`/`down_proj` target to those tensors when it wraps such a model.
    """
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a peft without this module converts no targets
        return set()
    probe = copy.deepcopy(lora_config)
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    return set(probe.target_parameters or ())


def _check_fused_experts(model: PreTrainedModel, lora_config: LoraConfig, settings: LoraSettings) -> None:
    """Raise ConfigError, before anything is wrapped, for options that peft cannot apply to fused expert tensors."""
    fused = _fused_expert_targets(model, lora_config)
    if not fused:
        return
    unsupported = [text for text, used in (("lora.dropout: 0", settings.dropout), ("lora.use_dora: false", settings.use_dora)) if used]
    if unsupported:
        raise ConfigError(
            f"{type(model).__name__} keeps its MoE experts as fused tensors ({', '.join(sorted(fused))}), and peft "
            f"{peft.__version__} adapts those only without dropout and without DoRA (lora.dropout={settings.dropout}, "
            f"lora.use_dora={settings.use_dora}); set {' and '.join(unsupported)}"
        )


def _log_targets(peft_model: PeftModel, targets: list[str], settings: LoraSettings) -> None:
    """Log what peft adapted, which for MoE models differs from the resolved Linear layers."""
    tuner = peft_model.base_model
    adapted = set(tuner.targeted_module_names)
    tensors = sorted(getattr(tuner, "targeted_parameter_names", []))
    where = "language model and vision tower" if settings.vision else "language model"
    logger.info("LoRA on %d Linear layers of the %s: %s", len(adapted), where, _short_names(adapted))
    if tensors:
        logger.info("LoRA on %d fused MoE expert tensors: %s", len(tensors), _short_names(tensors))
    # NOTE: peft 0.21.2 also moves dense and shared-expert MLP targets (full names ending in
    # gate_proj/up_proj/down_proj) to the routed experts' tensors, so those Linear layers train no adapter.
    left_out = sorted(set(targets) - adapted)
    if left_out:
        logger.warning(
            "peft %s did not adapt %d of the %d Linear layers resolved from lora.target_modules (%s; first: %s): "
            "its MoE conversion for transformers 5 replaces them with the fused expert tensors",
            peft.__version__, len(left_out), len(targets), _short_names(left_out), left_out[0],
        )


def _log_trainable(peft_model: PeftModel, settings: LoraSettings) -> None:
    for name in settings.modules_to_save:
        count = sum(
            parameter.numel()
            for parameter_name, parameter in peft_model.named_parameters()
            if parameter.requires_grad and f".{name}.modules_to_save." in f".{parameter_name}"
        )
        # fp32 weights + gradients + two AdamW moments: 16 bytes per parameter (an estimate).
        logger.info("lora.modules_to_save %s: %s trainable parameters, about %.0f MB of training memory",
                    name, f"{count:,}", count * 16 / 2**20)
    for part, (trainable, total) in sorted(count_parameters(peft_model).items()):
        logger.info("trainable parameters in the %s: %s of %s", part, f"{trainable:,}", f"{total:,}")


def load_initial_weights(peft_model: PeftModel, adapter_dir: str) -> None:
    """Copy a saved adapter's LoRA weights into the model's new adapter, for lora.init_from.

    Raises ConfigError, naming the setting, when the saved adapter has another rank, alpha or
    variant, or other target modules or shapes than the lora section makes.
    """
    folder = Path(adapter_dir)
    saved = check_adapter_folder(folder, "lora.init_from")
    weights_path = folder / ADAPTER_WEIGHTS
    current = peft_model.peft_config["default"]
    settings = (
        ("r", "lora.r"), ("lora_alpha", "lora.alpha"), ("use_dora", "lora.use_dora"), ("use_rslora", "lora.use_rslora")
    )
    different = [
        f"{key}: {saved.get(name)!r} in the adapter, {getattr(current, name)!r} here"
        for name, key in settings
        if name in saved and saved[name] != getattr(current, name)
    ]
    if different:
        raise ConfigError(
            f"lora.init_from: {folder} was trained with other LoRA settings ({'; '.join(different)}); set them as "
            "the adapter has them"
        )
    try:
        result = set_peft_model_state_dict(peft_model, load_file(str(weights_path)), adapter_name="default")
    except RuntimeError as error:  # shapes differ: another rank pattern or another base model
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"lora.init_from: {folder} does not fit this model and lora section ({first_line})") from None
    adapter_keys = [key for key in result.missing_keys if ".lora_" in key or ".modules_to_save." in key]
    if result.unexpected_keys or adapter_keys:
        only_saved = _short_names(key.rsplit(".lora_", 1)[0] for key in result.unexpected_keys)
        only_here = _short_names(key.rsplit(".lora_", 1)[0] for key in adapter_keys)
        differences = []
        if only_saved:
            differences.append(f"only the adapter has {only_saved}")
        if only_here:
            differences.append(f"only this run has {only_here}")
        raise ConfigError(
            f"lora.init_from: {folder} adapts other modules than this lora section: {'; '.join(differences)}. Set "
            "lora.target_modules (and lora.vision, lora.modules_to_save) as that run had them"
        )
    logger.info("LoRA weights start from the adapter in %s", folder)
