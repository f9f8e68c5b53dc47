"""Export: merge an adapter into its base model, or copy a clean adapter with a model card.

A merged folder has the base model's tensor names, config, generation config and every
tokenizer, processor and chat-template file, in safetensors shards, so it loads with
plain `from_pretrained` (and in vLLM for architectures vLLM supports). The export checks
itself: the saved folder, loaded again, must give the logits of base + adapter.

In bfloat16 or float16, rounding the merged weights moves the logits by about the same amount
whatever the adapter learned. An absolute tolerance alone therefore fails sound merges of a
strongly trained adapter, and cannot tell a lost adapter from rounding. So the check also
compares the difference with the adapter's own change to the logits (base + adapter minus base).
A merge that gets at most a small share of that change wrong passes in any dtype.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vlmtune.config import ModelSettings
from vlmtune.data.conversation import Conversation, Message, TextPart
from vlmtune.errors import ModelError
from vlmtune.model.hub import resolve_model_path
from vlmtune.model.loading import WEIGHT_INDEXES, LoadedModel, load_adapter, load_model
from vlmtune.outputs import CHECKPOINT_NAME, share_weight_files

MERGED_CONFIG_NAME = "vlmtune_config.yaml"
"""The adapter's training config, kept in a merged model folder under this name."""
MERGED_MANIFEST_NAME = "vlmtune_run_manifest.json"
"""The adapter's run manifest, kept in a merged model folder under this name."""

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECK_PROMPTS = ("你是谁？", "Hello, who are you?", "1+1等于几？")
EXPORT_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Largest |merged - (base + adapter)| logit difference that passes whatever the adapter's change, by the dtype the check ran in.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
MAX_SHARE_OF_CHANGE = 0.1
"""Largest ||merged - (base + adapter)|| / ||(base + adapter) - base|| over the check's logits that passes."""


@dataclass
class ExportCheck:
    max_logit_difference: float
    tolerance: float
    share_of_change: float
    """||merged - (base + adapter)|| / ||(base + adapter) - base|| over all logits of the check prompts:
    how much of the adapter's change to the logits the merged model gets wrong (inf for an adapter that
    changes nothing)."""
    missing_files: list[str]
    tensor_names_match: bool

    @property
    def logits_match(self) -> bool:
        return self.max_logit_difference <= self.tolerance or self.share_of_change <= MAX_SHARE_OF_CHANGE

    @property
    def ok(self) -> bool:
        return self.logits_match and not self.missing_files and self.tensor_names_match

    def describe(self) -> str:
        """Describe the logit comparison in words, for the messages after an export."""
        share = "" if self.share_of_change == float("inf") else f", {self.share_of_change:.2%} of the adapter's change to them"
        return (
            f"reloaded logits differ from base + adapter by at most {self.max_logit_difference:.2e}{share} "
            f"(allowed: {self.tolerance:.0e}, or {MAX_SHARE_OF_CHANGE:.0%} of the change)"
        )


def share_of_change(actual: list[torch.Tensor], expected: list[torch.Tensor], base: list[torch.Tensor]) -> float:
    """Return ||actual - expected|| / ||expected - base|| over all logits; inf when expected equals base."""
    error = torch.cat([(left - right).flatten() for left, right in zip(actual, expected)]).norm()
    change = torch.cat([(left - right).flatten() for left, right in zip(expected, base)]).norm()
    return float(error / change) if change > 0 else float("inf")


def _is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name in WEIGHT_INDEXES


def tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def _check_logits(loaded: LoadedModel, prompts: tuple[str, ...]) -> list[torch.Tensor]:
    from vlmtune.encoding.encode import ConversationEncoder

    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            conversation = Conversation([Message("user", [TextPart(prompt)])])
            messages = encoder.template_messages(conversation)
            inputs = loaded.processor.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )
            inputs = {key: value.to(loaded.model.device) for key, value in inputs.items() if isinstance(value, torch.Tensor)}
            outputs.append(loaded.model(**inputs).logits.float().cpu())
    return outputs


def check_new_folder(output: Path) -> None:
    """Raise ModelError unless --output names a new or empty folder, so no earlier export is overwritten."""
    if output.exists() and not output.is_dir():
        raise ModelError(f"--output: {output} is a file; choose a new folder")
    if output.exists() and any(output.iterdir()):
        raise ModelError(f"--output: {output} is not empty; choose a new folder so no earlier export is overwritten")


def export_merged(
    adapter_dir: str,
    output_dir: str,
    base: ModelSettings,
    max_shard_size: str = "5GB",
    dtype: str = "auto",
) -> ExportCheck:
    """Merge the adapter into the base model, save it, reload it and compare logits.

    The arguments are checked before the model loads. A save that fails leaves no half-written folder.
    """
    output = Path(output_dir)
    check_new_folder(output)
    # The units huggingface_hub's split_torch_state_dict_into_shards accepts, which save_pretrained uses.
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", max_shard_size, re.IGNORECASE):
        raise ModelError(f"--max-shard-size: invalid size {max_shard_size!r}; give a number and a unit, e.g. 5GB or 500MB")
    if dtype not in EXPORT_DTYPES:
        raise ModelError(f"--dtype: invalid value {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    base_path = resolve_model_path(base)
    config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    saved_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    work_dtype = saved_dtype if dtype == "auto" else dtype

    settings = base.model_copy(update={"name_or_path": str(base_path), "hub": "local", "dtype": work_dtype})
    adapted = load_adapter(load_model(settings), adapter_dir)
    expected = _check_logits(adapted, CHECK_PROMPTS)
    with adapted.model.disable_adapter():
        base_logits = _check_logits(adapted, CHECK_PROMPTS)
    merged = adapted.model.merge_and_unload()
    _record_stop_ids(merged, adapted.stop_token_ids)
    try:
        _save_merged(merged, base_path, Path(adapter_dir), output, max_shard_size)
    except BaseException:  # Ctrl-C included: a partial folder would block the next export to it
        logger.error("export to %s failed; removing what was written there", output)
        shutil.rmtree(output, ignore_errors=True)
        raise
    logger.info("merged the adapter %s with the base model %s into %s", adapter_dir, base_path, output)

    reloaded = load_model(settings.model_copy(update={"name_or_path": str(output)}))
    actual = _check_logits(reloaded, CHECK_PROMPTS)
    difference = max(float((left - right).abs().max()) for left, right in zip(actual, expected))
    base_files = {path.name for path in base_path.iterdir() if path.is_file() and not _is_weight_file(path)}
    missing = sorted(base_files - {path.name for path in output.iterdir()})
    check = ExportCheck(
        max_logit_difference=difference,
        tolerance=TOLERANCE.get(reloaded.model.dtype, 1e-3),
        share_of_change=share_of_change(actual, expected, base_logits),
        missing_files=missing,
        tensor_names_match=tensor_names(output) == tensor_names(base_path),
    )
    if not check.ok:
        raise ModelError(_failed_check_message(check, output, work_dtype))
    logger.info("export check passed on %d prompts: %s", len(CHECK_PROMPTS), check.describe())
    return check


def _failed_check_message(check: ExportCheck, output: Path, work_dtype: str) -> str:
    """Return the error for a failed export check: what failed, that the folder was kept, and what to do.

    A save that fails midway removes its folder, because a partial folder cannot load. A folder that
    fails the check is complete and loads, so it is kept for the user to judge.
    """
    message = (
        f"the export in {output} failed its check: {check.describe()}, missing files {check.missing_files or 'none'}, "
        f"tensor names {'match' if check.tensor_names_match else 'differ from the base model'}. "
        f"The merged model was written to {output} in full and kept there; it loads, "
        "but its replies may differ from base + adapter."
    )
    if not check.logits_match and work_dtype in ("bfloat16", "float16"):
        message += (
            f" The merge ran in {work_dtype}, and rounding the merged weights to that precision is the likely "
            "cause: it loses updates smaller than the rounding step, as a lightly trained adapter's often are. "
            "Export again with --dtype float32 (or --dtype auto if the base model is saved in float32)."
        )
    return message + f" To export again into {output}, delete that folder first or pass a new --output."


def _record_stop_ids(merged, stop_ids: list[int]) -> None:
    """List every stop id in the merged model's generation_config, so that other tools stop where vlmtune does.

    They differ when the chat template closes replies with a token that the base model's
    generation_config leaves out (see `stop_token_ids`).
    """
    eos = merged.generation_config.eos_token_id
    listed = [eos] if isinstance(eos, int) else list(eos or [])
    if set(stop_ids) - set(listed):
        logger.info("the merged model's generation_config.eos_token_id lists the stop ids %s (the base model's: %s)",
                    stop_ids, listed)
        merged.generation_config.eos_token_id = list(stop_ids)


def training_config_path(adapter_dir: str | Path) -> Path | None:
    """Return the config.yaml of the run that trained an adapter: its own, or for a checkpoint-N folder its run folder's."""
    folder = Path(adapter_dir).resolve()
    candidates = [folder / "config.yaml"]
    if CHECKPOINT_NAME.fullmatch(folder.name):
        candidates.append(folder.parent / "config.yaml")
    return next((path for path in candidates if path.is_file()), None)


def _save_merged(merged, base_path: Path, adapter_dir: Path, output: Path, max_shard_size: str) -> None:
    merged.save_pretrained(str(output), max_shard_size=max_shard_size, safe_serialization=True)
    share_weight_files(output)
    for path in base_path.iterdir():
        if path.is_file() and not _is_weight_file(path) and not (output / path.name).exists():
            shutil.copy2(path, output / path.name)
    # `vlmtune chat/serve/predict --model` read the system prompt, reply layout and pixel limits from these.
    if not _copy_run_record(adapter_dir, output, MERGED_CONFIG_NAME, MERGED_MANIFEST_NAME):
        logger.warning(
            "no config.yaml in %s or its run folder, so the merged model does not record the training run's system "
            "prompt, reply layout or image limits; pass them to chat/serve/predict (--system)", adapter_dir,
        )


def export_adapter_only(adapter_dir: str, output_dir: str) -> Path:
    """Copy the adapter files and write a model card from the run manifest and eval report."""
    source = Path(adapter_dir)
    output = Path(output_dir)
    check_new_folder(output)
    missing = [name for name in ADAPTER_FILES if not (source / name).is_file()]
    if missing:
        raise ModelError(f"--adapter: {source} lacks {', '.join(missing)}; pass the output folder of `vlmtune train`")
    output.mkdir(parents=True, exist_ok=True)
    for name in (*ADAPTER_FILES, "eval_report.md", "loss.png"):
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)
    share_weight_files(output)  # copy2 copies a mode of 0600 too
    _copy_run_record(source, output, "config.yaml", "run_manifest.json")
    (output / "README.md").write_text(model_card(source), encoding="utf-8")
    return output


def _copy_run_record(adapter_dir: Path, output: Path, config_name: str, manifest_name: str) -> bool:
    """Copy the adapter's training config and run manifest into `output`; return False when it has no config."""
    training_config = training_config_path(adapter_dir)
    if training_config is None:
        return False
    shutil.copy2(training_config, output / config_name)
    manifest = training_config.parent / "run_manifest.json"
    if manifest.is_file():
        shutil.copy2(manifest, output / manifest_name)
    return True


def recorded_system_prompt(config: dict[str, Any], manifest: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return the system prompt a training run taught, and a note when its examples did not share one.

    The manifest counts the system prompts of the training examples (data.system_prompt fills
    those without one). When every example had the same one, that is the prompt. Otherwise
    data.system_prompt is returned, with a note on how the examples differed. Manifests
    written before the count existed give data.system_prompt alone.
    """
    configured = (config.get("data") or {}).get("system_prompt") or None
    counts = manifest.get("system_prompts")
    if counts is None or counts["distinct"] == 0:
        return configured, None
    if counts["distinct"] == 1 and counts["without"] == 0:
        return counts["most_common"], None
    total = counts["without"] + counts["with"]
    common = json.dumps(counts["most_common"], ensure_ascii=False)
    if counts["distinct"] == 1:
        note = f"{counts['with']} of {total} training examples had the system prompt {common}, the rest none"
    else:
        note = (
            f"the training examples had {counts['distinct']} different system prompts (the most common, in "
            f"{counts['most_common_count']} of {total}: {common})"
        )
        if counts["without"]:
            note += f", and {counts['without']} had none"
    return configured, note


def model_card(adapter_dir: Path) -> str:
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    manifest_path = adapter_dir / "run_manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {adapter_config.get('base_model_name_or_path')}",
        "tags: [lora, vlmtune]",
        "---",
        "",
        "# LoRA adapter trained with vlmtune",
        "",
        f"- base model: `{adapter_config.get('base_model_name_or_path')}`",
        f"- LoRA: r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
        f"dropout={adapter_config.get('lora_dropout')}, targets `{adapter_config.get('target_modules')}`",
    ]
    if manifest:
        config = manifest.get("config", {})
        # A hub dataset's files are named by the entry (modelscope:ID), not by their cache path; older manifests lack it.
        names = dict.fromkeys(item.get("dataset") or item["path"] for item in manifest.get("datasets", []))
        lines.append(f"- data: {', '.join(names)} ({manifest.get('samples')} samples)")
        lines.append(f"- training: {json.dumps(config.get('train', {}), ensure_ascii=False)}")
        system_prompt, note = recorded_system_prompt(config, manifest)
        # Chat, serve and predict send it by default; other clients must send it themselves.
        prompt_text = json.dumps(system_prompt, ensure_ascii=False) if system_prompt else "none"
        lines.append(f"- system prompt: {prompt_text}" + (f" ({note})" if note else ""))
        metrics = manifest.get("metrics", {})
        if metrics:
            loss = metrics.get("train_loss")
            shown = f"{loss:.4f}" if isinstance(loss, (int, float)) else loss
            # transformers' train_loss is the mean over the last `vlmtune train` call, so a resumed run shows its last part.
            lines.append(f"- mean training loss of the last training session: {shown}, steps: {metrics.get('global_step')}")
        lines.append(f"- versions: {json.dumps(manifest.get('versions', {}))}")
    if (adapter_dir / "eval_report.md").is_file():
        lines += ["", "Sample-generation metrics before and after training: see eval_report.md."]
    lines += ["", "Load it with `PeftModel.from_pretrained(base_model, this_folder)` or `vlmtune chat --adapter this_folder`.", ""]
    return "\n".join(lines)
