"""The training recipe, tracking backends and their callbacks."""

from vlmtune.training.recipe import LoraRecipe, run_training

__all__ = ["LoraRecipe", "run_training"]
