"""Resolving, loading and adapting models; the tiny offline checkpoint builder."""

from vlmtune.model.loading import LoadedModel, load_model, load_processor, stop_token_ids
from vlmtune.model.lora import apply_lora, resolve_target_modules

__all__ = ["LoadedModel", "apply_lora", "load_model", "load_processor", "resolve_target_modules", "stop_token_ids"]
