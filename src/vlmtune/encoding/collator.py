"""Batching encoded samples: pad token fields, concatenate vision tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmtune.encoding.encode import IGNORE_INDEX, EncodedSample


class SampleDataset(torch.utils.data.Dataset):
    """Encoded samples as mapping items with `input_ids`, the shape the transformers Trainer
    reads lengths from for length-grouped sampling; the collator unwraps them."""

    def __init__(self, samples: list[EncodedSample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        return {"input_ids": sample.input_ids, "sample": sample}


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of computed tokens that are padding when each batch is padded to its longest sample."""
    computed = sum(max(lengths[index] for index in batch) * len(batch) for batch in batches if batch)
    real = sum(lengths[index] for batch in batches for index in batch)
    return 1 - real / computed if computed else 0.0


@dataclass
class ChatCollator:
    """Right-pads a list of encoded samples into a batch for the model's forward pass.

    Text-only and image samples can share a batch: `pixel_values` and `image_grid_thw`
    of the image samples are concatenated in batch order, which is the order the model
    consumes image tokens in.
    """

    pad_token_id: int

    def __call__(self, samples: list[EncodedSample | dict]) -> dict[str, Any]:
        samples = [item["sample"] if isinstance(item, dict) else item for item in samples]
        longest = max(len(sample) for sample in samples)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample)
            input_ids[row, :length] = torch.tensor(sample.input_ids)
            labels[row, :length] = torch.tensor(sample.labels)
            attention_mask[row, :length] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

        if any(sample.mm_token_type_ids is not None for sample in samples):
            token_types = torch.zeros((batch_size, longest), dtype=torch.long)
            for row, sample in enumerate(samples):
                if sample.mm_token_type_ids is not None:
                    token_types[row, : len(sample)] = torch.tensor(sample.mm_token_type_ids)
            batch["mm_token_type_ids"] = token_types

        with_images = [sample for sample in samples if sample.pixel_values is not None]
        if with_images:
            batch["pixel_values"] = torch.cat([sample.pixel_values for sample in with_images])
            batch["image_grid_thw"] = torch.cat([sample.image_grid_thw for sample in with_images])
        return batch
