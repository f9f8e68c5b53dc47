"""The chunked cross-entropy against torch's: same loss and gradient, in fewer bytes."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from vlmtune.model import cross_entropy
from vlmtune.model.cross_entropy import ChunkedCrossEntropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_chunk", [4, 1000])
def test_matches_torch_cross_entropy(monkeypatch, dtype, rows_per_chunk):
    vocab_size = 50
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 8 * vocab_size * rows_per_chunk)
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(23, vocab_size, generator=generator)).to(dtype)
    labels = torch.randint(0, vocab_size, (23,), generator=generator)
    labels[[1, 5, 22]] = -100

    ours = logits.clone().requires_grad_()
    loss = ChunkedCrossEntropy.apply(ours, labels, -100)
    (loss / 7).backward()
    reference = logits.clone().requires_grad_()
    expected = functional.cross_entropy(reference.float(), labels, ignore_index=-100, reduction="sum")
    (expected / 7).backward()

    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, reference.grad, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-3)
    assert ours.grad[[1, 5, 22]].abs().max() == 0  # ignored rows get no gradient


def test_keeps_one_gradient_per_logit():
    """Between forward and backward the loss keeps one buffer the size of the logits."""
    logits = torch.randn(64, 1000, requires_grad=True)
    loss = ChunkedCrossEntropy.apply(logits, torch.randint(0, 1000, (64,)), -100)
    saved = loss.grad_fn.saved_tensors
    assert [tensor.shape for tensor in saved] == [logits.shape]


def test_no_gradient_buffer_without_grad():
    with torch.no_grad():
        loss = ChunkedCrossEntropy.apply(torch.randn(8, 10), torch.randint(0, 10, (8,)), -100)
    assert loss.grad_fn is None
    assert torch.isfinite(loss)
