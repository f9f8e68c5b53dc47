"""The memory estimate: exact parameter counts, every setting's effect, and measured peaks on the tiny model."""

from __future__ import annotations

import json

import pytest
from transformers import Glm4vConfig

from conftest import REPO_ROOT, write_json
from vlmtune.config import build_config
from vlmtune.errors import ConfigError
from vlmtune.model.estimate import (
    BUNDLED_CONFIGS,
    GIB,
    Workload,
    build_meta_model,
    estimate_memory,
    image_tokens,
    load_model_config,
)
from vlmtune.model.estimate_report import run_estimate

GLM_9B = "zai-org/GLM-4.1V-9B-Thinking"
# Tolerance of the estimate against the measured peak on the tiny model. Leaving out the
# loss term, the LoRA inputs or the norms' float32 copies moves it by more than this.
MEASURED_TOLERANCE = 0.15


def run_config(model: str, **sections):
    tree = {"model": {"name_or_path": model}, "data": {"train": ["unused.json"], "max_length": 1024}}
    for name, values in sections.items():
        tree[name] = values
    return build_config(tree)


@pytest.fixture(scope="module")
def glm_config():
    return load_model_config(GLM_9B)


def test_bundled_config_for_every_hub_id():
    for name in BUNDLED_CONFIGS:
        config = load_model_config(name)
        assert config.model_type == "glm4v"
        assert config.text_config.num_hidden_layers == 40


def test_bundled_config_matches_transformers_defaults(glm_config):
    # transformers' Glm4vConfig defaults follow GLM-4.1V-9B-Thinking.
    defaults = Glm4vConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads"):
        assert getattr(glm_config.text_config, key) == getattr(defaults.text_config, key), key
    for key in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size",
                "spatial_merge_size", "temporal_patch_size"):
        assert getattr(glm_config.vision_config, key) == getattr(defaults.vision_config, key), key
    assert glm_config.image_token_id == defaults.image_token_id


def test_meta_model_counts_9b_parameters(glm_config):
    model = build_meta_model(glm_config)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert 10.0e9 < count < 10.5e9
    assert all(parameter.device.type == "meta" for parameter in model.parameters())


def test_image_tokens_match_the_processor(glm_config, loaded):
    """The estimate's count equals GLM-4.1V's processor on an image of that size (same patch, merge and frames)."""
    import copy
    import math

    from PIL import Image

    from vlmtune.encoding.images import apply_image_limits

    for pixels in (28 * 28 * 256, 1003520):
        processor = copy.deepcopy(loaded.processor)
        apply_image_limits(processor, 28 * 28, pixels)
        side = math.isqrt(pixels)
        grid = processor.image_processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")["image_grid_thw"][0]
        assert image_tokens(glm_config, pixels) == (int(grid.prod()), int(grid.prod()) // 4)
    # Both frames of an image count against max_pixels, so one image gets about half: not 5,120 patches.
    assert image_tokens(glm_config, 1003520) == (2500, 625)


def test_unknown_hub_id_names_bundled_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from vlmtune.errors import ModelError

    with pytest.raises(ModelError, match="bundled config"):
        load_model_config("nobody/no-such-model")


def test_weights_shrink_with_quantization(glm_config):
    workload = Workload(1, 512)
    sizes = {}
    for bits, kind, double in ((None, "nf4", True), (8, "nf4", True), (4, "nf4", False), (4, "nf4", True), (4, "fp4", True)):
        config = run_config(GLM_9B, quantization={"bits": bits, "type": kind, "double_quant": double})
        sizes[(bits, kind, double)] = estimate_memory(config, glm_config, workload).bytes_of("weights")
    assert sizes[(None, "nf4", True)] > sizes[(8, "nf4", True)] > sizes[(4, "nf4", False)] > sizes[(4, "nf4", True)]
    assert sizes[(4, "nf4", True)] == sizes[(4, "fp4", True)]
    # bf16: 2 bytes for each of the exact parameter count.
    count = sum(parameter.numel() for parameter in build_meta_model(glm_config).parameters())
    assert sizes[(None, "nf4", True)] == 2 * count


def test_lora_variants_change_trainable_bytes(glm_config):
    workload = Workload(1, 512)

    def lora_bytes(**lora):
        config = run_config(GLM_9B, lora=lora)
        return estimate_memory(config, glm_config, workload).bytes_of("LoRA weights + gradients")

    plain = lora_bytes(r=8)
    assert lora_bytes(r=16) == 2 * plain
    assert lora_bytes(r=8, use_rslora=True) == plain
    assert lora_bytes(r=8, use_dora=True) > plain
    # r=8 on q,k,v,o,gate_up,down of 40 layers: r * (in + out) per layer, float32 weight + gradient.
    text = glm_config.text_config
    hidden, intermediate, kv = text.hidden_size, text.intermediate_size, 256
    per_layer = 8 * ((hidden + hidden) * 2 + 2 * (hidden + kv) + (hidden + 2 * intermediate) + (intermediate + hidden))
    assert plain == 40 * per_layer * 8


def test_modules_to_save_adds_a_trained_copy(glm_config):
    workload = Workload(1, 512)
    config = run_config(GLM_9B, lora={"modules_to_save": ["lm_head"]})
    estimate = estimate_memory(config, glm_config, workload)
    head = glm_config.text_config.vocab_size * glm_config.text_config.hidden_size
    # bf16 copy + bf16 gradient + two bf16 AdamW states.
    assert estimate.bytes_of("modules_to_save") == head * (2 + 2 + 4)


def test_activations_scale_with_batch_and_length(glm_config):
    config = run_config(GLM_9B)
    base = estimate_memory(config, glm_config, Workload(1, 512)).bytes_of("activations")
    assert estimate_memory(config, glm_config, Workload(2, 512)).bytes_of("activations") == 2 * base
    assert estimate_memory(config, glm_config, Workload(1, 1024)).bytes_of("activations") == 2 * base


def test_checkpointing_cuts_activations(glm_config):
    workload = Workload(4, 1024)
    without = estimate_memory(run_config(GLM_9B, train={"gradient_checkpointing": False}), glm_config, workload)
    with_checkpointing = estimate_memory(run_config(GLM_9B, train={"gradient_checkpointing": True}), glm_config, workload)
    assert with_checkpointing.bytes_of("activations") * 20 < without.bytes_of("activations")
    assert with_checkpointing.total < without.total


def test_eight_bit_optimizer_quarters_states(glm_config):
    workload = Workload(1, 512)
    adam = estimate_memory(run_config(GLM_9B), glm_config, workload).bytes_of("optimizer states")
    eight = estimate_memory(run_config(GLM_9B, train={"optim": "paged_adamw_8bit"}), glm_config, workload)
    assert eight.bytes_of("optimizer states") * 4 == adam


def test_images_add_vision_memory(glm_config):
    config = run_config(GLM_9B)
    text_only = estimate_memory(config, glm_config, Workload(1, 1024))
    frozen = estimate_memory(config, glm_config, Workload(1, 1024, images_per_sample=2, image_pixels=28 * 28 * 256))
    vision_lora = estimate_memory(
        run_config(GLM_9B, lora={"vision": True}), glm_config, Workload(1, 1024, images_per_sample=2, image_pixels=28 * 28 * 256)
    )
    assert frozen.total > text_only.total
    assert frozen.bytes_of("vision forward (transient)") > 0
    assert vision_lora.bytes_of("vision activations") > frozen.bytes_of("vision forward (transient)")


def test_qlora_fits_24_gib_where_bf16_does_not():
    common = {"train": {"per_device_train_batch_size": 4, "gradient_checkpointing": True}}
    bf16 = run_estimate(run_config(GLM_9B, **common), gpu_gib=24)
    qlora = run_estimate(run_config(GLM_9B, quantization={"bits": 4}, **common), gpu_gib=24)
    assert qlora.estimate.fits is True
    assert bf16.estimate.total > qlora.estimate.total + 5 * GIB
    assert bf16.estimate.fits is False
    # A smaller batch with more accumulation fits too and keeps the results, so it comes before QLoRA.
    [lever] = bf16.levers
    assert lever.label.startswith("train.per_device_train_batch_size=2 train.gradient_accumulation_steps=8")
    assert lever.keeps_results is True
    assert lever.estimate.fits is True
    # Where only QLoRA fits, it is the one change.
    [lever] = run_estimate(run_config(GLM_9B, **common), gpu_gib=15).levers
    assert lever.label.startswith("quantization.bits=4 (QLoRA")
    assert lever.keeps_results is False
    assert lever.estimate.total == qlora.estimate.total


def render(report) -> str:
    from rich.console import Console

    from vlmtune.model.estimate_report import estimate_table

    console = Console(width=400, record=True)
    console.print(estimate_table(report))
    return console.export_text()


def test_levers_chain_until_run_fits():
    common = {"train": {"per_device_train_batch_size": 4, "gradient_checkpointing": True}}
    report = run_estimate(run_config(GLM_9B, **common), gpu_gib=12)
    totals = [lever.estimate.total for lever in report.levers]
    assert len(report.levers) >= 2
    assert totals == sorted(totals, reverse=True)
    assert report.levers[-1].estimate.fits is True
    assert all(lever.estimate.fits is False for lever in report.levers[:-1])
    # Each change is applied on top of the ones before it.
    last = report.levers[-1].config
    assert last.quantization.bits == 4
    assert last.train.per_device_train_batch_size < 4
    text = render(report)
    assert "one change is not enough; apply these in order:" in text
    assert f"with these {len(report.levers)} changes the run fits on a 12 GiB GPU" in text


def test_lever_overrides_reproduce_plan(tmp_path):
    """The overrides of a plan, given to the config as on the command line, give the plan's last estimate."""
    from vlmtune.config import load_config

    data = write_json(tmp_path / "train.json", [{"instruction": "a", "output": "b"}])
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {{name_or_path: {GLM_9B}}}\ndata: {{train: [{data}], max_length: 1024}}\n"
        "train: {per_device_train_batch_size: 4, gradient_checkpointing: false}\n",
        encoding="utf-8",
    )
    plan = run_estimate(load_config(path), gpu_gib=12).levers
    assert len(plan) >= 2
    overrides = [override for lever in plan for override in lever.overrides]
    assert "train.gradient_checkpointing=true" in overrides  # a boolean in the form the command line takes
    applied = run_estimate(load_config(path, overrides), gpu_gib=12)
    assert applied.estimate.total == plan[-1].estimate.total
    assert applied.estimate.fits is True


def test_levers_say_when_nothing_fits(tmp_path):
    from vlmtune.model.estimate_report import write_estimate_json

    report = run_estimate(run_config(GLM_9B, train={"gradient_checkpointing": True}), gpu_gib=8)
    assert report.levers
    smallest = report.levers[-1].estimate
    assert smallest.fits is False
    text = render(report)
    assert f"even with all of them it needs {smallest.total / GIB:.2f} GiB, more than 8 GiB" in text
    # The verdict comes before the list of changes.
    assert text.index("no setting change makes the run fit on a 8 GiB GPU") < text.index("  1. ")
    assert f"use a GPU with at least {smallest.total / GIB:.2f} GiB" in text  # the same figure as the last line
    assert "one change is not enough" not in text
    assert "DeepSpeed ZeRO-3 (examples/deepspeed/zero3.json)" in text
    write_estimate_json(report, tmp_path / "estimate.json")
    written = json.loads((tmp_path / "estimate.json").read_text(encoding="utf-8"))
    assert [lever["change"] for lever in written["levers"]] == [lever.label for lever in report.levers]
    assert [lever["keeps_results"] for lever in written["levers"]] == [lever.keeps_results for lever in report.levers]
    assert written["levers"][-1]["total_bytes"] == smallest.total

    zero3 = run_estimate(
        run_config(GLM_9B, train={"gradient_checkpointing": True, "deepspeed": "examples/deepspeed/zero3.json"}), gpu_gib=8
    )
    assert zero3.zero3 is True
    assert "ZeRO-3 (examples" not in render(zero3)


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"quantization": {"bits": 4}, "lora": {"modules_to_save": ["merger"]}}, "lora.modules_to_save"),
        ({"quantization": {"bits": 8}, "lora": {"modules_to_save": ["visual"]}}, "lora.modules_to_save"),
        ({"quantization": {"bits": 4}, "lora": {"train_merger": True}}, "lora.train_merger"),
        ({"train": {"optim": "adamw_fancy"}}, "adamw_fancy"),
    ],
)
def test_contradictions_rejected_by_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        run_config(GLM_9B, **bad)


def test_missing_deepspeed_file_rejected(tmp_path):
    from vlmtune.config import load_config

    data = write_json(tmp_path / "train.json", [{"instruction": "a", "output": "b"}])
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name_or_path: x}}\ndata: {{train: [{data}]}}\ntrain: {{deepspeed: nowhere.json}}\n")
    with pytest.raises(ConfigError, match="train.deepspeed: file not found: nowhere.json"):
        load_config(path)


def test_estimate_command_prints_verdict(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = write_json(tmp_path / "train.json", [{"instruction": "a", "output": "b"}])
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {{name_or_path: {GLM_9B}, hub: huggingface}}\ndata: {{train: [{data}], max_length: 1024}}\n"
        "train: {per_device_train_batch_size: 4, gradient_checkpointing: true}\n"
    )
    out = tmp_path / "estimate.json"
    command = [str(Path(sys.executable).parent / "vlmtune"), "estimate", str(path)]
    env = {**os.environ, "COLUMNS": "200"}

    result = subprocess.run([*command, "--gpu-gib", "24", "--json", str(out)], capture_output=True, text=True,
                            timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "fits on a 24 GiB GPU: no" in result.stdout
    assert "fits with one change: train.per_device_train_batch_size=2" in result.stdout
    written = json.loads(out.read_text())
    assert written["fits"] is False
    assert written["total_bytes"] == sum(item["bytes"] for item in written["items"])

    result = subprocess.run([*command, "quantization.bits=4"], capture_output=True, text=True, timeout=300, env=env,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "fits on a 24 GiB GPU: yes" in result.stdout

    result = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "GPU:" not in result.stdout
    assert "on CPU the total is tensor memory in RAM" in result.stdout

    result = subprocess.run([*command, "model.device=cpu"], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "fits on a" not in result.stdout  # a config that trains on CPU is estimated for CPU
    assert "on CPU the total is tensor memory in RAM" in result.stdout

    result = subprocess.run([*command, "--device", "cpu", "--gpu-gib", "24"], capture_output=True, text=True, timeout=300,
                            env=env, check=False)
    assert result.returncode == 2
    assert "--gpu-gib compares with GPU memory, so it does not apply with --device cpu" in result.stderr


# Measured on the tiny model: the peak of CPU tensor memory over two training steps of the real recipe.
MEASURED_CASES = [
    pytest.param({"lora": {"dropout": 0.0}}, 0, id="plain"),
    pytest.param({"lora": {"dropout": 0.1}}, 0, id="dropout"),
    pytest.param({"lora": {"dropout": 0.1}, "train": {"gradient_checkpointing": True}}, 0, id="checkpointing"),
    pytest.param({"lora": {"dropout": 0.0, "use_dora": True}}, 0, id="dora"),
    pytest.param({"lora": {"dropout": 0.0, "modules_to_save": ["lm_head"]}}, 0, id="modules_to_save"),
    pytest.param({"lora": {"dropout": 0.0}}, 1, id="image"),
]


@pytest.mark.slow
@pytest.mark.parametrize("sections, images", MEASURED_CASES)
def test_estimate_close_to_measured_peak(tiny_model_dir, tmp_path, sections, images):
    from vlmtune.encoding.collator import supervised_positions
    from vlmtune.model.estimate import estimate_memory
    from vlmtune.training.memory import cpu_peak_bytes, tensor_bytes
    from vlmtune.training.recipe import LoraRecipe

    text = "小橘今天很开心喵" * 12
    if images:
        image = str(REPO_ROOT / "data" / "images" / "orange_cat.png")
        rows = [{"instruction": f"<image>问题{i} " + text, "input": "", "output": text, "images": [image]} for i in range(4)]
    else:
        rows = [{"instruction": f"问题{i} " + text, "input": "", "output": text} for i in range(4)]
    data = write_json(tmp_path / "train.json", rows)
    pixels = 28 * 28 * 16
    tree = {
        "model": {"name_or_path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": [str(data)], "max_length": 1024, "max_pixels": pixels, "min_pixels": pixels},
        "lora": {"r": 8, "alpha": 16, **sections.get("lora", {})},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 1, "save_steps": 100, "group_by_length": False,
                  **sections.get("train", {})},
        "tracking": {"backend": "none"},
        "evaluation": {"generate": False},
    }
    config = build_config(tree)
    recipe = LoraRecipe(config)
    recipe.setup()
    lengths = {len(sample) for sample in recipe.report.samples}
    static = tensor_bytes(recipe.loaded.model)
    measured = static + cpu_peak_bytes(recipe.train)

    labels = recipe.collator(recipe.report.samples[:4])["labels"]
    logit_share = len(supervised_positions(labels)) / labels.shape[1]
    workload = Workload(4, max(lengths), images_per_sample=images, image_pixels=pixels, logit_share=logit_share)
    estimate = estimate_memory(config, load_model_config(str(tiny_model_dir)), workload, device="cpu")
    ratio = estimate.total / measured
    print(f"estimate {estimate.total / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert abs(ratio - 1) < MEASURED_TOLERANCE, (estimate.items, measured)


def test_deepspeed_run_states_ddp_assumption():
    train = {"deepspeed": "examples/deepspeed/zero3.json", "gradient_checkpointing": True}
    report = run_estimate(run_config(GLM_9B, train=train), gpu_gib=80)
    assert any("ZeRO-3" in line for line in report.assumptions)
    assert report.estimate.fits is True
    assert report.levers == []


@pytest.mark.parametrize("count, text", [(9_410_000_000, "9.41B"), (4_234_000, "4.23M"), (120_000, "120K"), (999, "999")])
def test_parameter_count_text(count, text):
    from vlmtune.model.loading import parameter_count_text

    assert parameter_count_text(count) == text


def test_image_size_from_processor_limit(tiny_model_dir, tmp_path):
    from vlmtune.config import build_config
    from vlmtune.model.estimate_report import run_estimate

    processor_limit = json.loads((tiny_model_dir / "processor_config.json").read_text())["image_processor"]["size"]["longest_edge"]
    config = build_config({"model": {"name_or_path": str(tiny_model_dir), "hub": "local"}, "data": {"train": ["x.json"]}})
    report = run_estimate(config, images_per_sample=1)
    assert report.workload.image_pixels == processor_limit
    assert any("the image processor's limit" in note for note in report.assumptions)


def test_image_longer_than_max_length_warned(tmp_path):
    from vlmtune.model.estimate_report import write_estimate_json

    # GLM-4.1V: two frames of 14-pixel patches share 1,003,520 pixels, 2,500 patches merged 2 x 2 into 625 tokens.
    data = {"train": ["unused.json"], "max_length": 600, "max_pixels": 1003520}
    report = run_estimate(run_config(GLM_9B, data=data), gpu_gib=80)
    [warning] = report.warnings
    assert warning.startswith("1 image(s) of 1,003,520 pixels take 625 tokens, as many as data.max_length=600 or more")
    assert f"warning: {warning[:60]}" in render(report)
    write_estimate_json(report, tmp_path / "estimate.json")
    assert json.loads((tmp_path / "estimate.json").read_text(encoding="utf-8"))["warnings"] == [warning]
    assert run_estimate(run_config(GLM_9B, data={**data, "max_length": 1024}), gpu_gib=80).warnings == []
