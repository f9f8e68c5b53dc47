"""The training loss: mean cross-entropy over every supervised token of the global batch."""

from __future__ import annotations

import torch
from vlmtune.encoding.collator import supervised_positions
from vlmtune.encoding.encode import IGNORE_INDEX
from vlmtune.model.cross_entropy import ChunkedCrossEntropy


def token_mean_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Return the summed next-token cross-entropy divided by the batch's supervised-token count.

    The Trainer passes num_items_in_batch: the supervised tokens of all gradient-accumulation
    micro-batches, summed over processes (TrainingArguments.average_tokens_across_devices).
    Dividing by it makes 2 processes x batch 2 train exactly like 1 process x batch 4.
    Glm4vForConditionalGeneration sets accepts_loss_kwargs=False (transformers 5.25), so its
    own loss is a per-micro-batch mean, and that equality does not hold.
    Without num_items_in_batch (evaluation) this is the mean over the batch's tokens.
    Logits kept only at supervised positions (ChatCollator.supervised_logits_only) are
    matched to their targets with the same supervised_positions.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    vocab_size = logits.shape[-1]
    if logits.shape[1] == labels.shape[1]:
        shifted_logits = logits[..., :-1, :].reshape(-1, vocab_size)
        shifted_labels = labels[..., 1:].reshape(-1).to(shifted_logits.device)
    else:  # the collator kept only the logits at supervised positions
        shifted_logits = logits.reshape(-1, vocab_size)
        shifted_labels = labels[:, 1:][:, supervised_positions(labels)].reshape(-1).to(shifted_logits.device)
    total = ChunkedCrossEntropy.apply(shifted_logits, shifted_labels, IGNORE_INDEX)
    if num_items_in_batch is None:
        num_items_in_batch = (shifted_labels != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
