"""LoRA variants and QLoRA on the tiny model: config checks, training, reload with identical logits."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import write_json
from vlmtune.config import ModelSettings, build_config
from vlmtune.errors import ConfigError
from vlmtune.model.loading import load_adapter, load_model
from vlmtune.training.recipe import LoraRecipe

IDS = torch.tensor([[2, 4, 7, 100, 200, 300, 8]])


def tree(tiny_model_dir, folder, lora=None, quantization=None, steps=4) -> dict:
    rows = [{"instruction": f"问题{i}", "input": "", "output": "好的喵~"} for i in range(8)]
    result = {
        "model": {"name_or_path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": [str(write_json(folder / "train.json", rows))], "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, **(lora or {})},
        "train": {"output_dir": str(folder / "out"), "max_steps": steps, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "warmup_steps": 0, "save_steps": 100},
        "tracking": {"backend": "none"},
        "evaluation": {"generate": False},
    }
    if quantization:
        result["quantization"] = quantization
    return result


@pytest.mark.parametrize(
    "lora",
    [
        {"use_dora": True},
        {"use_rslora": True},
        {"init": "pissa"},
        {"init": "olora"},
        {"init": "gaussian", "rank_pattern": {"down_proj": 8}, "alpha_pattern": {"down_proj": 16}},
        {"modules_to_save": ["lm_head"]},
    ],
    ids=["dora", "rslora", "pissa", "olora", "patterns", "modules_to_save"],
)
def test_variant_trains_and_reloads_identically(tiny_model_dir, tmp_path, lora):
    recipe = LoraRecipe(build_config(tree(tiny_model_dir, tmp_path, lora)))
    recipe.setup()
    recipe.train()
    output = recipe.save()
    trained = recipe.loaded.model.eval()
    reloaded = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(output)).model
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, trained(input_ids=IDS).logits, rtol=0, atol=2e-4)
    saved = json.loads((output / "adapter_config.json").read_text())
    if lora.get("init") in ("pissa", "olora"):
        assert saved["r"] == 8  # converted to a plain LoRA adapter of twice the rank
    if lora.get("use_dora"):
        assert saved["use_dora"] is True


def test_rank_pattern_applied(tiny_model_dir, tmp_path):
    recipe = LoraRecipe(build_config(tree(tiny_model_dir, tmp_path, {"rank_pattern": {"gate_up_proj": 8, "down_proj": 8}})))
    recipe.setup()
    shapes = {name: module.weight.shape for name, module in recipe.loaded.model.named_modules() if name.endswith("lora_A.default")}
    assert all(shape[0] == 8 for name, shape in shapes.items() if ".mlp." in name)
    assert all(shape[0] == 4 for name, shape in shapes.items() if ".self_attn." in name)


@pytest.mark.parametrize("lora, searches", [({}, False), ({"vision": True}, True), ({"train_merger": True}, True)])
def test_ddp_unused_parameter_search(tiny_model_dir, tmp_path, lora, searches):
    recipe = LoraRecipe(build_config(tree(tiny_model_dir, tmp_path, lora)))
    recipe.setup()
    assert recipe.trainer.args.ddp_find_unused_parameters is searches


@pytest.mark.parametrize(
    "lora, quantization, message",
    [
        ({"train_merger": True}, {"bits": 4}, r"quantization.bits=4 with lora.train_merger: true is not supported"),
        ({"init": "pissa"}, {"bits": 8}, r"quantization.bits=8 with lora.init: pissa is not supported"),
    ],
)
def test_contradictions_rejected(tiny_model_dir, tmp_path, lora, quantization, message):
    with pytest.raises(ConfigError, match=message):
        build_config(tree(tiny_model_dir, tmp_path, lora, quantization))


def test_unknown_modules_to_save(tiny_model_dir, tmp_path):
    recipe = LoraRecipe(build_config(tree(tiny_model_dir, tmp_path, {"modules_to_save": ["classifier"]})))
    with pytest.raises(ConfigError, match="no module named classifier"):
        recipe.setup()


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_cpu_and_loads_unquantized(tiny_model_dir, tmp_path, bits):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install -e .[test]")
    config = tree(tiny_model_dir, tmp_path, quantization={"bits": bits}, steps=6)
    if bits == 8:
        # Validation and sample generations run the quantized model in eval mode too.
        config["data"]["val_size"] = 0.25
        config["train"]["eval_steps"] = 3
        config["evaluation"] = {"generate": True, "num_data_prompts": 2, "max_new_tokens": 8}
    recipe = LoraRecipe(build_config(config))
    recipe.setup()
    quantized = [
        name for name, module in recipe.loaded.model.named_modules() if type(module).__name__ in ("Linear4bit", "Linear8bitLt")
    ]
    assert any(".language_model." in name for name in quantized)
    assert not any(".visual." in name for name in quantized)  # the vision tower and merger stay unquantized
    assert not any(name.endswith("lm_head") for name in quantized)
    before = recipe.trainer.state.global_step
    recipe.train()
    assert recipe.trainer.state.global_step == before + 6
    output = recipe.save()
    # The adapter loads on the unquantized base and still helps there: it lowers the loss on the
    # training batch. Logits differ from the quantized model's by the quantization error, which is
    # large for this model's random weights (up to about 10 in 4 bits), so they are not compared.
    from vlmtune.encoding import ChatCollator

    batch = ChatCollator(pad_token_id=recipe.loaded.tokenizer.pad_token_id)(recipe.report.samples[:4])
    reloaded = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(output)).model
    with torch.no_grad():
        with reloaded.disable_adapter():
            base_loss = reloaded(**batch).loss.item()
        adapted_loss = reloaded(**batch).loss.item()
    assert adapted_loss < base_loss


def test_cpu_four_bit_skips_batch_checks(tiny_model_dir, tmp_path, caplog):
    """The batch-layout checks run the model in eval mode, after which bitsandbytes' CPU 4-bit layers fail in training."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install -e .[test]")
    config = tree(tiny_model_dir, tmp_path, quantization={"bits": 4}, lora={"dropout": 0.0})
    rows = [{"instruction": "问题" * (i + 1), "input": "", "output": "好的喵~" * (i % 3 + 1)} for i in range(8)]
    config["data"]["train"] = [str(write_json(tmp_path / "varied.json", rows))]  # lengths differ, so batches are padded
    recipe = LoraRecipe(build_config(config))
    with caplog.at_level("INFO", logger="vlmtune"):
        recipe.setup()
    assert len({len(sample) for sample in recipe.report.samples}) > 1
    assert recipe.collator.padding_mask is True
    assert "checking them would run the 4-bit model in eval mode on CPU" in caplog.text
    recipe.train()
    assert recipe.trainer.state.global_step == 4


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_keeps_unquantized_weights_bf16(tiny_model_dir, tmp_path, bits):
    """Embeddings and the vision tower stay in the loaded dtype, and only the adapter is float32."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install -e .[test]")
    config = tree(tiny_model_dir, tmp_path, quantization={"bits": bits}, steps=2)
    config["model"]["dtype"] = "bfloat16"
    recipe = LoraRecipe(build_config(config))
    recipe.setup()
    dtypes = {name: parameter.dtype for name, parameter in recipe.loaded.model.named_parameters()}
    assert {dtype for name, dtype in dtypes.items() if "embed_tokens" in name} == {torch.bfloat16}
    assert {dtype for name, dtype in dtypes.items() if ".visual." in name} == {torch.bfloat16}
    assert {dtype for name, dtype in dtypes.items() if ".lora_" in name} == {torch.float32}
    recipe.train()
    assert recipe.trainer.state.global_step == 2
    assert math.isfinite(recipe.metrics["train_loss"])


def test_cpu_four_bit_with_evaluation_rejected(tiny_model_dir, tmp_path):
    config = tree(tiny_model_dir, tmp_path, quantization={"bits": 4})
    config["data"]["val_size"] = 0.25
    recipe = LoraRecipe(build_config(config))
    with pytest.raises(ConfigError, match=r"quantization.bits=4 on CPU cannot also evaluate.*evaluation.generate=false"):
        recipe.setup()
    assert recipe.loaded is None  # rejected before the model was loaded


def test_missing_bitsandbytes_is_reported_before_loading(tiny_model_dir):
    # A None entry in sys.modules makes `import bitsandbytes` fail for real, as on a machine without it.
    script = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from vlmtune.config import ModelSettings, QuantizationSettings\n"
        "from vlmtune.errors import ModelError\n"
        "from vlmtune.model.loading import load_model\n"
        "try:\n"
        f"    load_model(ModelSettings(name_or_path={str(tiny_model_dir)!r}, device='cpu'), quantization=QuantizationSettings(bits=4))\n"
        "except ModelError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "quantization needs bitsandbytes, which failed to import" in result.stdout, result.stderr
    assert "Loading weights" not in result.stderr
