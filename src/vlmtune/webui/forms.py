"""Turning the Train tab's form values into an ordinary vlmtune config, and previewing its samples."""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any


from vlmtune.config import (
    HUB_PREFIXES,
    DataSettings,
    LoraSettings,
    RunConfig,
    TrainSettings,
    build_config,
    read_settings_tree,
    save_config,
)
from vlmtune.data.loading import load_conversations
from vlmtune.encoding import ConversationEncoder, encode_with_policy
from vlmtune.encoding.inspect import SegmentKind, SelfCheck, check_sample, sample_segments
from vlmtune.errors import ConfigError, ModelError
from vlmtune.model.hub import check_model_folder, looks_like_path
from vlmtune.model.loading import load_processor_and_stop_ids

logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "train_config.yaml"
"""Name of the config the page writes into the output folder before it starts a run."""


@dataclass
class TrainForm:
    """The beginner settings of the Train tab; everything else comes from the preset."""

    dataset: str
    model: str
    output_dir: str
    preset: str
    num_train_epochs: float = 3.0
    learning_rate: float = 1e-4
    lora_rank: int = 8
    max_length: int = 1024
    thinking: str = "auto"
    max_steps: int = -1


def list_presets(folder: str | Path) -> list[str]:
    """List the YAML files in a presets folder, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(str(path) for path in [*root.glob("*.yaml"), *root.glob("*.yml")])


def read_preset(preset: str) -> dict[str, Any]:
    """Read a preset's settings tree, raising ConfigError that names the file and what to do."""
    path = Path(preset)
    if not preset:
        raise ConfigError(
            "no preset chosen. Choose one of the YAML files in the presets folder, which `vlmtune webui --presets FOLDER` sets"
        )
    if not path.is_file():
        raise ConfigError(f"preset not found: {preset!r}. Choose one of the YAML files in the presets folder")
    return read_settings_tree(path, f"preset {path}", ". Fix the file or choose another preset")


def _absolute_if_exists(value: str, *folders: Path) -> str:
    """Return the path made absolute when it exists in one of the folders, else unchanged."""
    candidate = Path(value)
    if candidate.is_absolute():
        return value
    for folder in folders:
        if (folder / candidate).exists():
            return str((folder / candidate).resolve())
    return value


def _has_hub_prefix(name: str) -> bool:
    """Return whether a dataset or model field names a hub (modelscope:ID or huggingface:ID)."""
    return name.startswith(tuple(HUB_PREFIXES))


def _check_form(form: TrainForm) -> list[str]:
    problems = []
    if not form.dataset.strip():
        problems.append("dataset: no file chosen. Enter the path of a dataset file or upload one")
    elif not _has_hub_prefix(form.dataset) and not Path(form.dataset).exists():
        problems.append(
            f"dataset: file not found: {form.dataset}. Check the path, upload the file, or enter a hub dataset as "
            "modelscope:namespace/name"
        )
    if not form.model.strip():
        problems.append("base model: empty. Enter a local model folder, a ModelScope id or a Hugging Face id")
    elif (problem := _local_model_problem(form.model.strip())) is not None:
        problems.append(problem)
    if not form.output_dir.strip():
        problems.append("output folder: empty. Enter a folder for the adapter and checkpoints, e.g. outputs/my-run")
    return problems


def _local_model_problem(name: str) -> str | None:
    """Return what is wrong with a base model that names a local folder, or None, so a wrong path fails before the run.

    A name is taken as local when it exists, can only be a path, or is `FOLDER/NAME` with FOLDER
    an existing folder here (for example outputs/tiny-glm4v with a typo). Hub ids are checked
    by the run, which downloads them.
    """
    path = Path(name).expanduser()
    is_local = path.exists() or looks_like_path(name) or (len(path.parts) == 2 and Path(path.parts[0]).is_dir())
    if not is_local:
        return None
    try:
        check_model_folder(path.resolve(), "base model", "Check the path, or enter a ModelScope or Hugging Face id")
    except ModelError as error:
        return str(error)
    return None


def preset_form_values(preset: str) -> list[Any]:
    """Return the preset's epochs, learning rate, LoRA rank, max length, reply layout and max steps, for the form.

    A setting the preset leaves out gets vlmtune's default, which is what training would use.
    """
    tree = read_preset(preset)
    data, lora, train = (tree.get(section) or {} for section in ("data", "lora", "train"))

    def pick(section: dict[str, Any], settings: type, name: str) -> Any:
        return section.get(name, settings.model_fields[name].default)

    return [
        pick(train, TrainSettings, "num_train_epochs"),
        pick(train, TrainSettings, "learning_rate"),
        pick(lora, LoraSettings, "r"),
        pick(data, DataSettings, "max_length"),
        pick(data, DataSettings, "thinking"),
        pick(train, TrainSettings, "max_steps"),
    ]


def build_run_config(form: TrainForm) -> RunConfig:
    """Merge the form's values into the preset and validate the result, reporting every problem at once.

    The dataset replaces the preset's training and validation files. The LoRA alpha follows
    the rank so that the preset's alpha / r scaling is kept. Relative paths that exist are
    made absolute, because the written config lives in the output folder.
    """
    tree = read_preset(form.preset)
    problems = _check_form(form)
    if problems:
        raise ConfigError("the form has problems:\n" + "\n".join(f"  - {problem}" for problem in problems))

    preset_folder = Path(form.preset).resolve().parent
    model = tree.setdefault("model", {})
    if _has_hub_prefix(form.model):
        model["name_or_path"] = form.model  # the prefix chooses the hub, whatever the preset's
        model.pop("hub", None)
    else:
        model_path = _absolute_if_exists(form.model.strip(), Path.cwd())
        model["name_or_path"] = model_path
        if Path(model_path).is_dir():
            model["hub"] = "local"
        elif model.get("hub") == "local":
            model["hub"] = "auto"

    data = tree.setdefault("data", {})
    data["train"] = [form.dataset if _has_hub_prefix(form.dataset) else str(Path(form.dataset).resolve())]
    data.pop("validation", None)
    data["max_length"] = form.max_length
    data["thinking"] = form.thinking

    lora = tree.setdefault("lora", {})
    preset_rank, preset_alpha = lora.get("r", 8), lora.get("alpha", 16)
    lora["r"] = form.lora_rank
    lora["alpha"] = max(1, round(form.lora_rank * preset_alpha / preset_rank))

    train = tree.setdefault("train", {})
    train["output_dir"] = str(Path(form.output_dir).resolve())
    train["num_train_epochs"] = form.num_train_epochs
    train["learning_rate"] = form.learning_rate
    train["max_steps"] = form.max_steps

    for prompt in (tree.get("evaluation") or {}).get("prompts") or []:
        if isinstance(prompt, dict) and isinstance(prompt.get("images"), list):
            prompt["images"] = [_absolute_if_exists(image, Path.cwd(), preset_folder) for image in prompt["images"]]
    return build_config(tree, source=f"preset {form.preset} with the form's values")


def write_run_config(config: RunConfig) -> Path:
    """Write the config into its output folder as train_config.yaml and return the path."""
    folder = Path(config.train.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE_NAME
    save_config(config, path)
    return path


def train_command(config_path: str | Path, overwrite: bool = False, resume: bool = False) -> list[str]:
    """Return the argv that runs `vlmtune train` on the config with this interpreter."""
    command = [sys.executable, "-m", "vlmtune.cli.main", "train", str(config_path)]
    if overwrite:
        command.append("--overwrite")
    if resume:
        command.append("--resume")
    return command


def shell_command(command: list[str]) -> str:
    """Return the command as the user would type it, with the `vlmtune` console script."""
    prefix = [sys.executable, "-m", "vlmtune.cli.main"]
    shown = ["vlmtune", *command[len(prefix) :]] if command[: len(prefix)] == prefix else command
    return shlex.join(shown)


@dataclass
class SamplePreview:
    """One example as the Preview shows it: encoded as training will see it, or why training does not."""

    source: str
    segments: list[tuple[str, SegmentKind]]
    check: SelfCheck | None
    """None when data.on_invalid or data.on_overlength keeps the example out of training."""
    length: int
    max_length: int
    note: str | None = None
    """The effect of data.on_invalid or data.on_overlength on the example, if any."""


@lru_cache(maxsize=4)
def _processor_for(model_settings_json: str) -> tuple[Any, tuple[int, ...]]:
    """Load a processor once per model settings; the Preview is clicked repeatedly."""
    from vlmtune.config import ModelSettings

    processor, stop_ids = load_processor_and_stop_ids(ModelSettings.model_validate_json(model_settings_json))
    return processor, tuple(stop_ids)


def preview_samples(config: RunConfig, count: int = 3) -> list[SamplePreview]:
    """Encode the first examples of the config's data as training will, and run the self-check on each."""
    processor, stop_ids = _processor_for(config.model.model_dump_json())
    encoder = ConversationEncoder.from_settings(processor, list(stop_ids), config.data)
    conversations = load_conversations(config.data)[:count]
    previews = []
    for conversation, outcome in zip(conversations, encode_with_policy(encoder, conversations, config.data)):
        sample = outcome.sample
        previews.append(
            SamplePreview(
                source=conversation.source,
                segments=sample_segments(encoder, sample) if sample is not None else [],
                check=check_sample(encoder, outcome.conversation, sample) if sample is not None else None,
                length=len(sample) if sample is not None else outcome.length or 0,
                max_length=config.data.max_length,
                note=outcome.note(config.data.max_length),
            )
        )
    return previews
