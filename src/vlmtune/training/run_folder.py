"""A training run's output folder: one run per folder, continued (--resume) or replaced (--overwrite) only on request.

The folder's `config.yaml`, written when the run starts, is what a resumed run is checked
against: LoRA, quantization and optimizer settings must stay, other changes are listed in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from vlmtune.config import DatasetSpec, RunConfig, portable_config_dict, save_config
from vlmtune.data.hub import hub_dataset_files
from vlmtune.errors import ConfigError
from vlmtune.outputs import CHECKPOINT_NAME, MODEL_CARD, PROGRESS_FILE, earlier_run_files, probe_writable

logger = logging.getLogger(__name__)

RESUME_FIXED_SECTIONS = ("lora", "quantization")
"""Config sections a resumed run must share with its checkpoints, because they decide which weights train and their shapes."""

RESUME_OPTIMIZER_KEYS = ("train.learning_rate", "train.weight_decay", "train.optim")
"""Settings that a resumed run takes from the checkpoint's optimizer and scheduler state, whatever the config sets.

transformers restores `optimizer.pt` (its parameter groups carry the learning rate and weight
decay) and `scheduler.pt` (whose base learning rates are the original ones), so a new value
in the config would be logged but not used.
"""

RESUME_FIX = (
    "Resume with the config and overrides the run was started with "
    "(vlmtune train CONFIG OVERRIDES --resume), or choose another train.output_dir"
)


@dataclass
class RunFolder:
    """The checks and files of train.output_dir around a run."""

    path: Path
    config: RunConfig
    resume: bool
    overwrite: bool
    is_main_process: bool

    def last_checkpoint(self) -> str | None:
        """Return the checkpoint-N folder of the highest step, as transformers' get_last_checkpoint does.

        Written here so that the CLI can check the folder before torch and transformers load.
        """
        if not self.path.is_dir():
            return None
        checkpoints = [path for path in self.path.iterdir() if CHECKPOINT_NAME.fullmatch(path.name) and path.is_dir()]
        return str(max(checkpoints, key=checkpoint_step)) if checkpoints else None

    def check(self) -> None:
        """Raise ConfigError unless the folder is free, resumed (--resume) or replaced (--overwrite), so two runs never mix."""
        self._check_usable()
        if self.resume:
            self._check_resume()
            return
        earlier = earlier_run_files(self.path)
        model_card = self.path / MODEL_CARD
        if not earlier and model_card.exists() and not self.overwrite:
            raise ConfigError(
                f"train.output_dir {self.path} contains {MODEL_CARD}, which saving the adapter replaces with "
                "its model card; move the file, choose another train.output_dir, or pass --overwrite to replace it"
            )
        if not earlier:
            stale = self.path / PROGRESS_FILE  # from a run that failed before its first step
            if stale.exists() and self.is_main_process:
                stale.unlink()
            return
        if not self.overwrite:
            names = ", ".join(path.name for path in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            if self.last_checkpoint() is None:
                train_on = (
                    f"; to train on from its adapter, start a new run in another train.output_dir with lora.init_from={self.path}"
                    if (self.path / "adapter_model.safetensors").is_file()
                    else ""
                )
                raise ConfigError(
                    f"train.output_dir {self.path} contains an earlier run ({names}) that saved no checkpoint, so "
                    f"there is nothing to resume. Pass --overwrite to replace it, or choose another train.output_dir{train_on}"
                )
            raise ConfigError(
                f"train.output_dir {self.path} contains an earlier run ({names}). Pass --resume to continue "
                "it from its last checkpoint, --overwrite to replace it, or choose another train.output_dir"
            )
        if self.is_main_process:
            for path in earlier:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            logger.info("removed the earlier run from %s (--overwrite)", self.path)

    def _check_usable(self) -> None:
        """Raise ConfigError for a path that is a file or a model folder, or where nothing can be written."""
        key = f"train.output_dir {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{key} is a file, not a folder; choose a folder path")
        weights = [path for path in self.path.glob("*.safetensors") if path.name != "adapter_model.safetensors"]
        if (self.path / "config.json").is_file() and weights:
            raise ConfigError(
                f"{key} is a model folder (it has config.json and {weights[0].name}), and the run would write its adapter "
                "and checkpoints into it; choose another train.output_dir"
            )
        if not self.is_main_process:
            return
        try:
            probe_writable(self.path)
        except OSError as error:
            raise ConfigError(f"{key}: cannot write there ({error.strerror or error}); choose a folder you can write to") from None

    def _check_resume(self) -> None:
        checkpoint = self.last_checkpoint()
        if checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint-N folder in {self.path}; train without --resume to start afresh")
        # The case of check_steps_left that is known before the model loads, so it fails at once.
        step = checkpoint_step(Path(checkpoint))
        max_steps = self.config.train.max_steps
        if 0 < max_steps <= step:
            raise ConfigError(
                f"--resume: {checkpoint} is already at step {step}, and train.max_steps is {max_steps}; "
                "raise train.max_steps to train further"
            )
        self._check_resumed_settings(Path(checkpoint))

    def _check_resumed_settings(self, checkpoint: Path) -> None:
        """Raise ConfigError for a resume that would mix LoRA settings or re-run a finished run, and warn about other changes."""
        changed = self.settings_changed_since_start()

        def show(keys: list[str]) -> str:
            return "; ".join(f"{key}: {changed[key][0]!r} then, {changed[key][1]!r} now" for key in keys)

        fixed = [key for key in changed if key.split(".")[0] in RESUME_FIXED_SECTIONS]
        if fixed:
            raise ConfigError(
                f"--resume: {self.path} was trained with other LoRA or quantization settings ({show(fixed)}). {RESUME_FIX}"
            )
        optimizer = [key for key in changed if key in RESUME_OPTIMIZER_KEYS]
        if optimizer:
            raise ConfigError(
                f"--resume: {show(optimizer)}, but a resumed run keeps the values in its checkpoint's optimizer and "
                f"scheduler state, so the change would not apply. {RESUME_FIX}; to train on with other values, start "
                f"a new run (another train.output_dir) from this run's weights with lora.init_from={self.path}"
            )
        if changed:
            split = [key for key in ("data.seed", "data.val_size") if key in changed]
            length = [key for key in ("train.max_steps", "train.num_train_epochs") if key in changed]
            logger.warning(
                "--resume: settings differ from the run saved in %s, and the new values apply from here on: %s%s%s",
                self.path,
                show(list(changed)),
                f" ({' and '.join(split)} also move examples between the training and validation splits)" if split else "",
                f" (a new {' and '.join(length)} changes the total steps, so the learning-rate schedule, and a warmup given "
                "as a fraction, are recomputed for the new total: the rate continues from where the new schedule "
                "has it at the resumed step)" if length else "",
            )
        self._warn_changed_data()

        # A finished run has nothing to continue unless the new settings train for longer.
        state_path = checkpoint / "trainer_state.json"
        if "train.num_train_epochs" in changed or "train.max_steps" in changed or not state_path.is_file():
            return
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("max_steps") and state.get("global_step", 0) >= state["max_steps"]:
            raise ConfigError(
                f"--resume: the run in {self.path} finished (step {state['global_step']} of "
                f"{state['max_steps']}), so there is nothing to continue. Raise train.num_train_epochs or "
                "train.max_steps to train it further, or choose another train.output_dir for a new run"
            )

    def _saved_manifest(self) -> dict[str, Any]:
        """Return the run manifest written at the run's last save, or an empty one before any save."""
        manifest_path = self.path / "run_manifest.json"
        return json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}

    def _warn_changed_data(self) -> None:
        """Warn about data files whose contents differ from those the run's manifest recorded (at its last save)."""
        recorded = {entry["path"]: entry["sha256"] for entry in self._saved_manifest().get("datasets", [])}
        if not recorded:
            return
        changed = [entry["path"] for entry in dataset_hashes(self.config) if recorded.get(entry["path"], entry["sha256"]) != entry["sha256"]]
        if changed:
            logger.warning(
                "--resume: data file(s) changed since the run last saved (%s); the resumed epochs read the new contents",
                ", ".join(changed),
            )

    def warn_changed_encoding(self, key: str | None) -> None:
        """Warn when the training data's encoding key differs from the one of the run's last save.

        The key (see encoding.cache.encoding_key) also covers the image files and the tokenizer,
        which the data file hashes miss.
        """
        recorded = self._saved_manifest().get("encoding_key")
        if recorded is not None and recorded != key:
            logger.warning(
                "--resume: the training data encodes differently from when the run last saved: its data files, the "
                "image files they name, the tokenizer, the chat template, the encoding settings or vlmtune's encoding "
                "code changed. The resumed steps train on the new encoding"
            )

    def check_steps_left(self, checkpoint: Path, total_steps: int) -> None:
        """Raise ConfigError when the checkpoint is at or past total_steps, the last step of these settings' schedule.

        Known only once the samples are encoded, because an epoch's step count depends on them.
        """
        step = checkpoint_step(checkpoint)
        if step >= total_steps:
            raise ConfigError(
                f"--resume: {checkpoint} is at step {step}, and these settings train for {total_steps} steps, so there "
                "is nothing to continue. Raise train.num_train_epochs or train.max_steps to train further, or resume "
                "with the config and overrides the run was started with (vlmtune train CONFIG OVERRIDES --resume)"
            )

    def settings_changed_since_start(self) -> dict[str, tuple[Any, Any]]:
        """Return (saved, current) for each setting that differs from the config.yaml written when the run started.

        Without that file (a run of an older vlmtune that stopped before saving), nothing counts as changed.
        """
        saved_path = self.path / "config.yaml"
        if not saved_path.is_file():
            return {}
        saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
        current = _flatten(portable_config_dict(self.config))  # written by save_config
        return {
            key: (saved.get(key), current.get(key))
            for key in sorted(saved.keys() | current.keys())
            if saved.get(key) != current.get(key) and key != "train.output_dir"
        }

    def save_config_at_start(self) -> None:
        """Write config.yaml before training, so a resumed run can be checked against it."""
        if self.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            # Replaced in one step: other ranks may be reading the earlier file in _check_resumed_settings.
            partial = self.path / "config.yaml.partial"
            save_config(self.config, partial)
            partial.replace(self.path / "config.yaml")


def checkpoint_step(checkpoint: Path) -> int:
    """Return the optimizer step of a checkpoint-N folder."""
    return int(checkpoint.name.rsplit("-", 1)[1])


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Map nested settings to dotted keys, such as {"train.learning_rate": 1e-4}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dataset_hashes(config: RunConfig) -> list[dict[str, str | None]]:
    """Return each file behind the config's datasets (a folder counts each of its files) with its sha256.

    `dataset` is the entry as configured (modelscope:ID for a hub dataset, whose `path` is in the
    hub client's cache), and `revision` the hub revision asked for (None: the default branch).
    """
    return [
        {"dataset": spec.label, "revision": spec.revision, "path": str(path), "sha256": _file_sha256(path)}
        for spec in [*config.data.train, *config.data.validation]
        for path in _dataset_paths(spec)
    ]


def _dataset_paths(spec: DatasetSpec) -> list[Path]:
    """List every file of a local dataset path (a saved dataset's too), or the files read from a hub dataset."""
    if spec.hub != "local":
        return hub_dataset_files(spec)
    root = Path(spec.path)
    return sorted(child for child in root.rglob("*") if child.is_file()) if root.is_dir() else [root]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
