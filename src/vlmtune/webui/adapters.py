"""Finding the adapters under an output folder, for the Chat tab's adapter list."""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.loading import adapter_base_model

ADAPTER_MARKER = "adapter_config.json"
# Folders that contain an adapter_config.json but no trained adapter: the PiSSA/OLoRA
# starting point that the recipe keeps for converting the final adapter.
SKIPPED_FOLDERS = {"initial_adapter"}


def find_adapters(root: str | Path | None) -> list[str]:
    """List every folder under root that contains adapter_config.json, final adapters first.

    Returns paths as strings, sorted by run folder, each run's own adapter before its
    checkpoint-N folders (in step order).
    """
    if root is None or not Path(root).is_dir():
        return []
    found = [path.parent for path in Path(root).rglob(ADAPTER_MARKER) if path.parent.name not in SKIPPED_FOLDERS]

    def sort_key(folder: Path) -> tuple:
        name = folder.name
        if name.startswith("checkpoint-") and name.removeprefix("checkpoint-").isdigit():
            return (str(folder.parent), 1, int(name.removeprefix("checkpoint-")))
        return (str(folder), 0, 0)

    return [str(folder) for folder in sorted(found, key=sort_key)]


def adapter_choices(adapters: list[str], base_name: str) -> list[tuple[str, str]]:
    """Return (label, path) pairs for the Chat tab's list: adapters of base_name first, then the others
    labelled with the base model they were trained on.

    Bases compare by resolved path when both are local folders, else by their last name part,
    so a hub id and a downloaded copy of it count as the same model.
    """
    same, other = [], []
    for adapter in adapters:
        recorded = adapter_base_model(adapter)
        if recorded is None or same_model(recorded, base_name):
            same.append((adapter, adapter))
        else:
            other.append((f"{adapter} (trained on {recorded})", adapter))
    return same + other


def same_model(first: str, second: str) -> bool:
    """Tell whether two model names or paths refer to the same model (see adapter_choices)."""
    first_path, second_path = Path(first).expanduser(), Path(second).expanduser()
    if first_path.is_dir() and second_path.is_dir():
        return first_path.resolve() == second_path.resolve()
    return first_path.name.lower() == second_path.name.lower()
