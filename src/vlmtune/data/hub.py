"""Dataset repositories on ModelScope or the Hugging Face Hub, downloaded into the hub client's cache."""

from __future__ import annotations

import fnmatch
import logging
from functools import lru_cache
from pathlib import Path

from vlmtune.config import DatasetSpec
from vlmtune.data.records import SUPPORTED_SUFFIXES, dataset_files
from vlmtune.errors import DataError

logger = logging.getLogger(__name__)


def _download_from_modelscope(dataset_id: str, revision: str | None, patterns: list[str] | None) -> str:
    from modelscope import dataset_snapshot_download

    return dataset_snapshot_download(dataset_id, revision=revision, allow_patterns=patterns)


def _download_from_huggingface(dataset_id: str, revision: str | None, patterns: list[str] | None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(dataset_id, repo_type="dataset", revision=revision, allow_patterns=patterns)


DOWNLOADERS = {"modelscope": _download_from_modelscope, "huggingface": _download_from_huggingface}

METADATA_FILES = frozenset({"configuration.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"})
"""JSON files that hub repositories carry besides the data (ModelScope's configuration.json,
datasets' metadata), left out when no `files` patterns choose."""


@lru_cache(maxsize=32)
def download_dataset(hub: str, dataset_id: str, revision: str | None, patterns: tuple[str, ...]) -> Path:
    """Download a dataset repository (only the files matching `patterns`, all when empty) once per process."""
    try:
        folder = DOWNLOADERS[hub](dataset_id, revision, list(patterns) or None)
    except Exception as error:  # hub clients raise many types; report any of them the same way
        raise DataError(
            f"dataset {hub}:{dataset_id}: download failed: {str(error).rstrip('. ')}. Check the id on the dataset's "
            "page and your network, or download the files and give their local path"
        ) from error
    logger.info("dataset %s:%s is in %s", hub, dataset_id, folder)
    return Path(folder)


def hub_dataset_files(spec: DatasetSpec) -> list[Path]:
    """Return the dataset files of a hub dataset: those matching spec.files, or the repository's only one."""
    folder = download_dataset(spec.hub, spec.path, spec.revision, tuple(spec.files))
    found = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES)
    if spec.files:
        chosen = [path for path in found if any(fnmatch.fnmatch(path.relative_to(folder).as_posix(), pattern) for pattern in spec.files)]
        if not chosen:
            raise DataError(
                f"dataset {spec.label}: no {', '.join(SUPPORTED_SUFFIXES)} file matches files {spec.files}; the "
                f"downloaded files are {_names(folder)}. Fix the patterns"
            )
        return chosen
    found = [path for path in found if path.name not in METADATA_FILES]
    if len(found) == 1:
        return found
    if not found:
        raise DataError(
            f"dataset {spec.label}: the repository has no {', '.join(SUPPORTED_SUFFIXES)} file (it has {_names(folder)}); "
            "convert the data to one of those formats and give its local path"
        )
    relative = [path.relative_to(folder).as_posix() for path in found]
    example = next((name for name in relative if "train" in name), relative[0])
    raise DataError(
        f"dataset {spec.label}: the repository has {len(found)} dataset files ({', '.join(relative)}); choose one "
        f"by naming it after the id, e.g. {spec.label}/{example}, or several with files: [...] in the dataset entry"
    )


def spec_files(spec: DatasetSpec) -> list[Path]:
    """List the files behind a dataset entry: local (a file, a folder of files or a saved dataset) or on a hub."""
    return dataset_files(spec.path) if spec.hub == "local" else hub_dataset_files(spec)


def _names(folder: Path, limit: int = 10) -> str:
    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    listing = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return listing or "none"
