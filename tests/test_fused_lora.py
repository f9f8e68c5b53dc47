"""The fused LoRA Linear computes what peft's LoRA Linear computes, and stays out of layers it does not cover."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers import AutoModelForImageTextToText

from vlmtune.config import LoraSettings
from vlmtune.data.conversation import Conversation, Message, TextPart
from vlmtune.model.fused_lora import FusedLoraLinear, fused_linear_or_none
from vlmtune.model.lora import apply_lora


def conversation(question: str, answer: str) -> Conversation:
    return Conversation(messages=[Message("user", [TextPart(question)]), Message("assistant", [TextPart(answer)])])


@pytest.fixture(scope="module")
def batch(encoder):
    samples = [encoder.encode(conversation("你好，请介绍一下自己。", "我是小橘喵~")), encoder.encode(conversation("天空为什么是蓝色的？", "因为瑞利散射喵。"))]
    length = max(len(sample) for sample in samples)
    pad = [[0] * (length - len(sample)) for sample in samples]
    return {
        "input_ids": torch.tensor([sample.input_ids + extra for sample, extra in zip(samples, pad)]),
        "attention_mask": torch.tensor([[1] * len(sample) + extra for sample, extra in zip(samples, pad)]),
        "labels": torch.tensor([sample.labels + [-100] * len(extra) for sample, extra in zip(samples, pad)]),
    }


def fused_and_plain(tiny_model_dir, settings: LoraSettings, dtype=torch.float32):
    """Return the same adapter twice: built by apply_lora (fused) and by peft alone, with non-zero lora_B."""
    fused = apply_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=dtype), settings, log=False)
    config = copy.deepcopy(fused.peft_config["default"])
    config._custom_modules = None
    plain = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=dtype), config)
    torch.manual_seed(0)
    for name, parameter in fused.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.05)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def loss_and_gradients(model, batch, seed=0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "settings",
    [
        LoraSettings(r=8, alpha=16, dropout=0.0),
        LoraSettings(r=8, alpha=16, dropout=0.1),
        LoraSettings(r=4, alpha=8, dropout=0.0, use_rslora=True),
        LoraSettings(r=4, alpha=8, dropout=0.0, use_dora=True),
    ],
    ids=["plain", "dropout", "rslora", "dora"],
)
def test_fused_layer_matches_peft(tiny_model_dir, batch, settings):
    fused, plain = fused_and_plain(tiny_model_dir, settings)
    lora_layers = [module for module in fused.modules() if isinstance(module, LoraLinear)]
    assert lora_layers and all(type(module) is FusedLoraLinear for module in lora_layers)
    assert not any(type(module) is FusedLoraLinear for module in plain.modules())

    fused_loss, fused_gradients = loss_and_gradients(fused, batch)
    plain_loss, plain_gradients = loss_and_gradients(plain, batch)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fused_gradients.keys() == plain_gradients.keys()
    for name, gradient in fused_gradients.items():
        torch.testing.assert_close(gradient, plain_gradients[name], rtol=1e-4, atol=1e-7, msg=name)


def test_fused_layer_under_bf16_autocast(tiny_model_dir, batch):
    """bfloat16 weights with float32 LoRA weights: fused under autocast, peft's forward without it.

    Both round differently in bfloat16, so each is compared with the same adapter in float32:
    the fused layer must be as close to it as peft's layer is.
    """
    fused, plain = fused_and_plain(tiny_model_dir, LoraSettings(r=8, alpha=16, dropout=0.0), dtype=torch.bfloat16)
    layer = next(module for module in fused.modules() if isinstance(module, FusedLoraLinear))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer._fusable_adapter((), {}) is None  # outside autocast, peft's forward runs
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer._fusable_adapter((), {}) == "default"
            fused_logits = fused(**inputs).logits.float()
            plain_logits = plain(**inputs).logits.float()
        reference = copy.deepcopy(plain).float()(**inputs).logits
        with plain.disable_adapter():
            without_adapter = plain.float()(**inputs).logits

    def error(logits):
        return (logits - reference).abs().mean().item()

    assert error(fused_logits) <= 1.25 * error(plain_logits)
    assert error(without_adapter) > 3 * error(fused_logits)  # the adapter's effect is far above rounding


def test_fused_layer_fallback_cases(tiny_model_dir, batch):
    fused, plain = fused_and_plain(tiny_model_dir, LoraSettings(r=8, alpha=16, dropout=0.0))
    layer = next(module for module in fused.modules() if isinstance(module, FusedLoraLinear))
    with fused.disable_adapter():
        assert layer._fusable_adapter((), {}) is None
        with plain.disable_adapter():
            torch.testing.assert_close(fused(**batch).logits, plain(**batch).logits)
    fused.merge_adapter()
    assert layer._fusable_adapter((), {}) is None
    fused.unmerge_adapter()
    assert layer._fusable_adapter((), {}) == "default"
    # DeepSpeed ZeRO-3 marks the parameters it partitions with ds_numel (deepspeed is not installed here).
    layer.lora_B["default"].weight.ds_numel = 7
    assert layer._fusable_adapter((), {}) is None
    del layer.lora_B["default"].weight.ds_numel


def test_only_plain_linear_layers_are_fused():
    bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes provides the quantised Linear subclass")
    config = LoraConfig(r=4)
    quantised = bitsandbytes.nn.Linear8bitLt(16, 16, has_fp16_weights=False)
    assert isinstance(quantised, nn.Linear)
    assert fused_linear_or_none(quantised, "default", config=config) is None
    assert fused_linear_or_none(nn.Embedding(4, 4), "default", config=config) is None
