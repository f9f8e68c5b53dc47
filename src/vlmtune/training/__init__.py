"""The training recipe, tracking backends and their callbacks.

The recipe is imported on first use, so that `vlmtune.training.run_folder` loads without torch and transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoraRecipe", "run_training"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlmtune.training import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'vlmtune.training' has no attribute {name!r}")
