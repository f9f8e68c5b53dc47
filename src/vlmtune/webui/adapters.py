"""Finding the adapters under an output folder, for the Chat tab's adapter list."""

from __future__ import annotations

from pathlib import Path

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
