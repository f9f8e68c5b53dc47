"""Resolving a model name to a local folder: a path, a ModelScope id or a Hugging Face id."""

from __future__ import annotations

import logging
from pathlib import Path

from vlmtune.config import ModelSettings
from vlmtune.errors import ModelError

logger = logging.getLogger(__name__)


def _download_from_modelscope(model_id: str, revision: str | None, cache_dir: str | None) -> str:
    from modelscope import snapshot_download

    return snapshot_download(model_id, revision=revision, cache_dir=cache_dir)


def _download_from_huggingface(model_id: str, revision: str | None, cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, revision=revision, cache_dir=cache_dir)


DOWNLOADERS = {"modelscope": _download_from_modelscope, "huggingface": _download_from_huggingface}


def looks_like_path(name: str) -> bool:
    """Return True for a name that cannot be a hub id: absolute, starting with ~ or a dot, or with more than one slash.

    Hub ids are `namespace/name` (or a bare name on the Hugging Face Hub), and huggingface_hub
    rejects ids that start with a dot.
    """
    return name.startswith(("/", "~", ".")) or "\\" in name or name.count("/") > 1


def check_model_folder(path: Path, key: str, not_found_hint: str) -> None:
    """Raise ModelError, naming `key`, unless `path` is a folder with config.json (a file or an adapter folder is named as such)."""
    if path.is_file():
        raise ModelError(f"{key}: {path} is a file; give the model's folder (the one holding config.json)")
    if not path.is_dir():
        raise ModelError(f"{key}: local folder not found: {path}. {not_found_hint}")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelError(
                f"{key}: {path} is a LoRA adapter folder (it has adapter_config.json, no config.json); give the "
                "base model here. To chat with or serve the adapter, pass it with --adapter; to train on from it, "
                f"set lora.init_from={path} in the training config"
            )
        raise ModelError(f"{key}: {path} has no config.json, so it is not a model folder")


MODEL_FOLDER_HINT = (
    "Build the tiny model with `vlmtune tiny-model PATH`, or set model.hub to modelscope or huggingface for a hub id"
)
"""The advice given when model.name_or_path names a local folder that does not exist."""


def resolve_model_path(settings: ModelSettings) -> Path:
    """Return a local folder holding the model, downloading it from the chosen hub if needed.

    hub=auto uses a local folder when one exists at name_or_path or the name can only be a
    path, else the Hugging Face Hub.
    """
    name = settings.name_or_path
    hub = settings.hub
    if hub == "auto":
        hub = "local" if Path(name).expanduser().exists() or looks_like_path(name) else "huggingface"
    if hub == "local":
        # Absolute, so adapters record a base model path that works from any folder.
        path = Path(name).expanduser().resolve()
        check_model_folder(path, "model.name_or_path", MODEL_FOLDER_HINT)
        return path

    logger.info("downloading %s from %s (revision %s)", name, hub, settings.revision or "default")
    try:
        local = DOWNLOADERS[hub](name, settings.revision, settings.cache_dir)
    except Exception as error:  # hub clients raise many types; report any of them the same way
        no_folder = f" There is no local folder {Path(name).resolve()} either." if settings.hub == "auto" else ""
        raise ModelError(
            f"model.name_or_path: downloading {name!r} from {hub} failed: {str(error).rstrip('. ')}.{no_folder} "
            "Check the id and your network, or download the model and pass its local folder"
        ) from error
    return Path(local)
