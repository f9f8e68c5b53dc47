"""Length-grouped batches in the same order on every process."""

from __future__ import annotations

from typing import Iterator

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """LengthGroupedSampler whose shuffle depends only on the seed and the epoch.

    transformers' LengthGroupedSampler shuffles with the global torch RNG when it gets no
    generator, and the Trainer passes none. accelerate (1.16, with its default seedable
    sampler) then neither seeds nor synchronises it. So from the second epoch on, processes
    whose dropout consumed different amounts of random numbers shuffle differently, and some
    samples are trained twice per epoch and others not at all. This sampler reseeds a
    private generator with seed + epoch on each pass.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._passes = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self._passes)
        self._passes += 1
        return super().__iter__()


class LengthGroupedTrainer(Trainer):
    """Trainer that groups batches by length with SeededLengthGroupedSampler."""

    def __init__(self, *args, sample_lengths: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.sample_lengths = sample_lengths

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return SeededLengthGroupedSampler(batch_size, self.sample_lengths, seed)
