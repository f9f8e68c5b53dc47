"""Padding-free batches and length grouping on the tiny GLM-4.1V (3-D rotary positions)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from conftest import PERSONA_DATA, encode_with_pixels, write_json
from test_images import IMAGE_DATA
from vlmtune.config import DatasetSpec, build_config
from vlmtune.data.loading import load_dataset_file
from vlmtune.encoding import ChatCollator
from vlmtune.encoding.collator import LengthGroupedSampler, padding_share
from vlmtune.model.packing import PackedPositions
from vlmtune.training.batch_checks import padding_free_difference, padding_mask_difference
from vlmtune.training.recipe import LoraRecipe


@pytest.fixture(scope="module")
def samples(encoder):
    text = load_dataset_file(DatasetSpec(path=str(PERSONA_DATA)))[:6]
    images = load_dataset_file(DatasetSpec(path=str(IMAGE_DATA)))[:2]
    return encode_with_pixels(encoder, text + images)


def collators(loaded):
    pad = loaded.tokenizer.pad_token_id
    return ChatCollator(pad_token_id=pad), ChatCollator(pad_token_id=pad, positions=PackedPositions(loaded.model))


def test_padding_free_batch_has_one_row_without_padding(loaded, samples):
    _, packed = collators(loaded)
    batch = packed(samples)
    total = sum(len(sample) for sample in samples)
    assert batch["input_ids"].shape == (1, total)
    assert "attention_mask" not in batch
    assert batch["position_ids"].shape == (4, 1, total)  # text positions, then temporal/height/width
    starts = [0]
    for sample in samples[:-1]:
        starts.append(starts[-1] + len(sample))
    assert (batch["position_ids"][0, 0, starts] == 0).all()
    assert (batch["labels"][0, starts] == -100).all()
    image_sample_start = starts[6]
    image_positions = batch["position_ids"][1:, 0, image_sample_start : image_sample_start + len(samples[6])]
    assert not torch.equal(image_positions[1], image_positions[0])  # height positions differ inside the image


def loss_and_gradient(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the model's loss on a batch and the gradient it gives the token embeddings."""
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    gradient = model.model.language_model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    model.eval()
    return loss.detach(), gradient


def assert_same_training_signal(model, expected_batch, batch) -> None:
    expected_loss, expected_gradient = loss_and_gradient(model, expected_batch)
    loss, gradient = loss_and_gradient(model, batch)
    assert torch.allclose(expected_loss, loss, rtol=1e-5, atol=1e-5)
    assert (expected_gradient - gradient).abs().max() <= 1e-4 * expected_gradient.abs().max()  # float32 rounding only


@pytest.mark.parametrize("subset", ["text", "mixed"])
def test_padding_free_loss_and_gradients_match(loaded, samples, subset):
    chosen = samples[:6] if subset == "text" else samples[3:]
    padded, packed = collators(loaded)
    assert_same_training_signal(loaded.model, padded(chosen), packed(chosen))


@pytest.mark.parametrize("subset", ["text", "mixed"])
def test_unmasked_padded_batch_matches(loaded, samples, subset):
    chosen = samples[:6] if subset == "text" else samples[3:]
    masked, _ = collators(loaded)
    unmasked = ChatCollator(pad_token_id=masked.pad_token_id, padding_mask=False)
    batch = unmasked(chosen)
    assert "attention_mask" not in batch
    assert (masked(chosen)["attention_mask"] == 0).any()  # the batch is padded
    assert_same_training_signal(loaded.model, masked(chosen), batch)


def test_mask_check_needs_causal_attention(loaded, samples):
    masked, _ = collators(loaded)
    unmasked = ChatCollator(pad_token_id=masked.pad_token_id, padding_mask=False)
    assert padding_mask_difference(loaded.model, masked, unmasked, samples) < 1e-5
    # BERT attends in both directions, so without the mask real tokens see the padding.
    bidirectional = BertForMaskedLM(
        BertConfig(
            vocab_size=len(loaded.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, initializer_range=0.5,  # weights large enough for attention to matter
        )
    )
    text_only = [ChatCollator(pad_token_id=masked.pad_token_id, padding_mask=flag) for flag in (True, False)]
    assert padding_mask_difference(bidirectional, *text_only, [replace(sample, mm_token_type_ids=None) for sample in samples[:6]]) > 0.05
    assert padding_mask_difference(loaded.model, masked, unmasked, samples[:1]) == 0.0  # nothing to pad


def test_difference_check_catches_leaking_positions(loaded, samples):
    padded, packed = collators(loaded)
    assert padding_free_difference(loaded.model, padded, packed, samples) < 1e-4

    def plain_positions(input_ids, *_):
        return torch.arange(len(input_ids)).unsqueeze(0)  # GLM-4.1V needs four rows to build the mask

    leaking = ChatCollator(pad_token_id=padded.pad_token_id, positions=plain_positions)
    assert padding_free_difference(loaded.model, padded, leaking, samples) > 0.05


def test_grouped_sampler_padding_and_epochs(encoder):
    lengths = [len(encoder.encode(c)) for c in load_dataset_file(DatasetSpec(path=str(PERSONA_DATA)))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(len(lengths)))
    assert first != second
    batches = [first[start : start + 8] for start in range(0, len(first), 8)]
    assert max(lengths[index] for index in batches[0]) == max(lengths)
    assert padding_share(lengths, batches) <= 0.03
    random_batches = [list(range(start, min(start + 8, len(lengths)))) for start in range(0, len(lengths), 8)]
    assert padding_share(lengths, random_batches) > 0.15
    sampler.set_epoch(0)
    assert list(sampler) == first


def run_config(tiny_model_dir, folder, **train):
    rows = [{"instruction": f"问题{i}" * (1 + i % 5), "input": "", "output": "好的喵~" * (1 + i % 3)} for i in range(16)]
    tree = {
        "model": {"name_or_path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": [str(write_json(folder / "train.json", rows))], "max_length": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"output_dir": str(folder / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "warmup_steps": 0,
                  "logging_steps": 1, "save_steps": 100, "seed": 5, **train},
        "tracking": {"backend": "none"},
        "evaluation": {"generate": False},
    }
    return build_config(tree)


@pytest.mark.slow
def test_padding_free_training_logs_the_same_losses(tiny_model_dir, tmp_path, caplog):
    losses = {}
    for padding_free in (False, True):
        folder = tmp_path / str(padding_free)
        folder.mkdir()
        recipe = LoraRecipe(run_config(tiny_model_dir, folder, padding_free=padding_free))
        with caplog.at_level("INFO", logger="vlmtune"):
            recipe.setup()
            recipe.train()
        assert (recipe.collator.positions is not None) == padding_free
        losses[padding_free] = [entry["loss"] for entry in recipe.trainer.state.log_history if "loss" in entry]
    assert "padding-free batches: packed and separate forward passes agree" in caplog.text
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_auto_keeps_padded_batches_with_sdpa(tiny_model_dir, tmp_path, caplog):
    recipe = LoraRecipe(run_config(tiny_model_dir, tmp_path))
    with caplog.at_level("INFO", logger="vlmtune"):
        recipe.setup()
    assert recipe.collator.positions is None
    assert "padding-free batches off: sdpa attention" in caplog.text
    assert "gradient checkpointing off (train.gradient_checkpointing=auto" in caplog.text
    assert json.loads(json.dumps(recipe.padding_share)) < 0.2


@pytest.mark.parametrize("padding_free", [False, True])
def test_supervised_logits_only_same_loss(loaded, samples, padding_free):
    from vlmtune.training.loss import token_mean_loss

    pad = loaded.tokenizer.pad_token_id
    positions = PackedPositions(loaded.model) if padding_free else None
    full = ChatCollator(pad_token_id=pad, positions=positions)(samples)
    kept = ChatCollator(pad_token_id=pad, positions=positions, supervised_logits_only=True)(samples)
    with torch.no_grad():
        full_outputs = loaded.model(**{k: v for k, v in full.items() if k != "labels"})
        kept_outputs = loaded.model(**{k: v for k, v in kept.items() if k != "labels"})
    supervised = int((kept["labels"][:, 1:] != -100).sum())
    assert kept_outputs.logits.shape[1] < full_outputs.logits.shape[1]
    assert kept_outputs.logits.shape[1] >= supervised // kept["labels"].shape[0]
    full_loss = token_mean_loss(full_outputs, full["labels"])
    kept_loss = token_mean_loss(kept_outputs, kept["labels"])
    assert torch.allclose(full_loss, kept_loss, rtol=1e-5)
    assert torch.allclose(full_loss, loaded.model(**full).loss, rtol=1e-5)
