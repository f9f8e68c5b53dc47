"""Batching encoded samples: pad token fields, concatenate vision tensors."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vlmtune.encoding.encode import IGNORE_INDEX, EncodedSample


def _long_tensor(values: Sequence[int]) -> torch.Tensor:
    """Copy a list or a (read-only) NumPy array of ids into a new int64 tensor."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


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

    @property
    def lengths(self) -> list[int]:
        return [len(sample) for sample in self.samples]


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Sample indices so that each run of `batch_size` contains samples of about the same length.

    Each epoch the samples are sorted by length with ties broken at random, cut into
    batches, and the batches shuffled. The batch of the longest samples goes first, so
    running out of memory happens at the first step, and the incomplete batch goes last. Unlike transformers' sampler,
    which sorts within random mega-batches (four of them for small datasets), this sorts
    across the whole dataset, so padding stays at a few percent on small datasets too.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        ordered = sorted(shuffled, key=self.lengths.__getitem__)
        # The shortest samples fill the one incomplete batch, which goes last as in any data loader.
        incomplete = len(ordered) % self.batch_size
        tail, ordered = ordered[:incomplete], ordered[incomplete:]
        batches = [ordered[start : start + self.batch_size] for start in range(0, len(ordered), self.batch_size)]
        if batches:
            longest = batches.pop()
            batches = [longest, *(batches[index] for index in torch.randperm(len(batches), generator=generator).tolist())]
        return batches + [tail] if tail else batches

    def __iter__(self):
        order = [index for batch in self.batches() for index in batch]
        self.epoch += 1  # the next epoch differs even when the caller never calls set_epoch
        return iter(order)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Return the positions whose logits predict a supervised token in any row of the batch.

    Position t predicts the label at t + 1. Only these positions need the output layer and
    the loss, so prompt tokens cost no logits (151,552 values per token on GLM-4.1V).
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


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
    consumes image tokens in. `pixel_loader` (`ConversationEncoder.pixel_values`) processes
    the images of samples that keep only where their images come from (files, data: URLs).

    With `positions` (a `model.packing.PackedPositions`), the batch is padding-free
    instead: all samples in one row, no attention mask, and position ids that restart at
    each sample, from which transformers builds a block-diagonal causal mask.
    """

    pad_token_id: int
    positions: Callable[..., torch.Tensor] | None = None
    pixel_loader: Callable[[EncodedSample], torch.Tensor] | None = None
    supervised_logits_only: bool = False
    """Add `logits_to_keep` so the model computes logits only at `supervised_positions`. The
    loss must then pick its targets the same way (training.loss does); the model's own loss
    does not."""
    padding_mask: bool = True
    """Pass `attention_mask` with padded batches. Padding is on the right, so under causal
    attention no real token attends to a padding position, and a batch without the mask
    gives real tokens the same outputs. Padding positions are never supervised, so the loss
    and gradients are the same too. Without a mask, attention runs as plain causal attention
    (sdpa's causal kernels) and no mask tensor is built. Only for models whose outputs are
    checked to match (training.batch_checks.padding_mask_difference)."""

    def __call__(self, samples: list[EncodedSample | dict]) -> dict[str, Any]:
        samples = [item["sample"] if isinstance(item, dict) else item for item in samples]
        batch = self._padding_free(samples) if self.positions is not None else self._padded(samples)
        # Otherwise each forward pass copies every layer's keys and values into an unused KV cache, and
        # transformers builds a padding-free batch's per-sample mask from position ids only without one.
        batch["use_cache"] = False
        if self.supervised_logits_only:
            batch["logits_to_keep"] = supervised_positions(batch["labels"])
        with_images = [sample for sample in samples if sample.image_grid_thw is not None]
        if with_images:
            batch["pixel_values"] = torch.cat([self._pixel_values(sample) for sample in with_images])
            batch["image_grid_thw"] = torch.cat([sample.image_grid_thw for sample in with_images])
        return batch

    def _pixel_values(self, sample: EncodedSample) -> torch.Tensor:
        if sample.pixel_values is not None:
            return sample.pixel_values
        if self.pixel_loader is None:
            raise ValueError(f"{sample.source}: the sample keeps only its image sources, and the collator has no pixel_loader")
        return self.pixel_loader(sample)

    def _padding_free(self, samples: list[EncodedSample]) -> dict[str, Any]:
        labels = []
        for sample in samples:
            sample_labels = _long_tensor(sample.labels)
            # The first token would otherwise be a target of the previous sample's last token.
            sample_labels[0] = IGNORE_INDEX
            labels.append(sample_labels)
        positions = torch.cat(
            [self.positions(sample.input_ids, sample.mm_token_type_ids, sample.image_grid_thw) for sample in samples],
            dim=-1,
        )
        batch: dict[str, Any] = {
            "input_ids": torch.cat([_long_tensor(sample.input_ids) for sample in samples]).unsqueeze(0),
            "labels": torch.cat(labels).unsqueeze(0),
            "position_ids": positions.unsqueeze(1) if positions.shape[0] > 1 else positions,
        }
        if any(sample.mm_token_type_ids is not None for sample in samples):
            token_types = [
                _long_tensor(sample.mm_token_type_ids) if sample.mm_token_type_ids is not None else torch.zeros(len(sample), dtype=torch.long)
                for sample in samples
            ]
            batch["mm_token_type_ids"] = torch.cat(token_types).unsqueeze(0)
        return batch

    def _padded(self, samples: list[EncodedSample]) -> dict[str, Any]:
        longest = max(len(sample) for sample in samples)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample)
            input_ids[row, :length] = _long_tensor(sample.input_ids)
            labels[row, :length] = _long_tensor(sample.labels)
            attention_mask[row, :length] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        if self.padding_mask:
            batch["attention_mask"] = attention_mask

        if any(sample.mm_token_type_ids is not None for sample in samples):
            token_types = torch.zeros((batch_size, longest), dtype=torch.long)
            for row, sample in enumerate(samples):
                if sample.mm_token_type_ids is not None:
                    token_types[row, : len(sample)] = _long_tensor(sample.mm_token_type_ids)
            batch["mm_token_type_ids"] = token_types
        return batch
