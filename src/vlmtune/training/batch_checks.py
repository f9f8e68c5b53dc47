"""Checks, run on two training samples before training, that a cheaper batch layout computes what padded batches compute.

- padding-free rows (`ChatCollator.positions`): the samples of a batch share one row, and
  the model must keep them apart by their restarting position ids;
- padded batches without an attention mask (`ChatCollator.padding_mask=False`): the model
  must attend causally, so that right padding cannot reach a real token.

Each returns the relative difference of logits; the recipe uses a layout only when the
difference is within BATCH_TOLERANCE.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlmtune.encoding.collator import ChatCollator
from vlmtune.encoding.encode import EncodedSample

BATCH_TOLERANCE = 1e-2
"""Largest relative difference of logits between two batch layouts that counts as numerical noise."""


def padding_free_difference(
    model: torch.nn.Module, padded: ChatCollator, packed: ChatCollator, samples: list[EncodedSample]
) -> float:
    """Return the relative difference of logits between two samples run separately and in one padding-free row.

    Attention that ignores the per-sample positions lets the second sample see the first,
    which changes its logits by far more than numerical noise.
    """
    pair = sorted(samples, key=len)[:2]
    if len(pair) < 2:
        return 0.0
    with _evaluating(model):
        separate = torch.cat([_logits(model, padded([sample]))[0] for sample in pair])
        together = _logits(model, packed(pair))[0]
    return _relative_difference(separate, together)


def padding_mask_difference(
    model: torch.nn.Module, masked: ChatCollator, unmasked: ChatCollator, samples: list[EncodedSample]
) -> float:
    """Return the relative difference of logits at real positions between a padded batch with and without its mask.

    The batch is the shortest sample and one at least twice as long (else the longest), so
    the first row is padded by at least its own length and a mask that matters changes it
    clearly. When every sample has the same length, no batch is padded and the difference is 0.
    """
    ordered = sorted(samples, key=len)
    if not ordered or len(ordered[-1]) == len(ordered[0]):
        return 0.0
    longer = next((sample for sample in ordered if len(sample) >= 2 * len(ordered[0])), ordered[-1])
    pair = [ordered[0], longer]
    with _evaluating(model):
        with_mask = _logits(model, masked(pair))
        without_mask = _logits(model, unmasked(pair))
    rows = [(row, len(sample)) for row, sample in enumerate(pair)]
    return _relative_difference(
        torch.cat([with_mask[row, :length] for row, length in rows]),
        torch.cat([without_mask[row, :length] for row, length in rows]),
    )


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    batch.pop("logits_to_keep", None)  # compare all positions
    batch.pop("labels", None)
    return model(**{**batch, "use_cache": False}).logits.float()


def _relative_difference(expected: torch.Tensor, found: torch.Tensor) -> float:
    return float((expected - found).abs().mean() / expected.abs().mean().clamp_min(1e-6))
