"""Position ids for padding-free batches: several samples in one row, positions restarting per sample.

transformers builds a block-diagonal causal mask from position ids that restart when a
batch comes without an attention mask, so no sample attends to another. Models with
multimodal rotary positions (M-RoPE: GLM-4.1V, Qwen2-VL, Qwen2.5-VL) take four rows of
position ids in that case. The first row contains the plain text positions that the mask
is built from. The other three are the temporal, height and width positions from the
model's own `get_rope_index`, computed for each sample alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class PackedPositions:
    """Position ids of one sample for a padding-free row: shape (rows, length)."""

    def __init__(self, model: Any):
        self.rope_module = next((module for module in model.modules() if hasattr(module, "get_rope_index")), None)

    @property
    def multimodal(self) -> bool:
        return self.rope_module is not None

    def __call__(
        self,
        input_ids: Sequence[int],
        mm_token_type_ids: Sequence[int] | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        length = len(input_ids)
        text_positions = torch.arange(length, dtype=torch.long).unsqueeze(0)
        if self.rope_module is None:
            return text_positions
        token_types = mm_token_type_ids if mm_token_type_ids is not None else [0] * length
        with torch.no_grad():
            rope_positions, _ = self.rope_module.get_rope_index(
                torch.from_numpy(np.array(input_ids, dtype=np.int64)).unsqueeze(0),
                mm_token_type_ids=torch.from_numpy(np.array(token_types, dtype=np.int64)).unsqueeze(0),
                image_grid_thw=image_grid_thw,
                attention_mask=torch.ones((1, length), dtype=torch.long),
            )
        return torch.cat([text_positions, rope_positions[:, 0].to(torch.long)])


__all__ = ["PackedPositions"]
