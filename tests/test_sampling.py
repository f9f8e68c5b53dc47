"""Sample generations during training on the bundled data, logged to a real SwanLab run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PERSONA_DATA
from test_training import read_swanlab_records, read_swanlab_scalars
from vlmtune.config import build_config
from vlmtune.training.recipe import LoraRecipe

STEPS = 60


@pytest.fixture(scope="module")
def sampled_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampling")
    tree = {
        "model": {"name_or_path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": [str(PERSONA_DATA)], "max_samples": 96, "max_length": 256, "system_prompt": "你是小橘。"},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.0},
        "train": {"output_dir": str(folder / "out"), "max_steps": STEPS, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 1, "learning_rate": 3e-3, "warmup_steps": 5, "save_steps": 1000,
                  "eval_steps": 30, "logging_steps": 10, "seed": 1},
        "tracking": {"backend": "swanlab", "swanlab_mode": "offline"},
        "evaluation": {"num_data_prompts": 8, "max_new_tokens": 48, "style_patterns": ["喵"],
                       "prompts": ["你是谁？"]},
    }
    recipe = LoraRecipe(build_config(tree))
    recipe.setup()
    recipe.train()
    recipe.save()
    return recipe


def test_stop_rate_rises_with_training(sampled_run):
    runs = sampled_run.sampling.runs
    assert [run.step for run in runs] == [0, 30, 60]
    assert runs[-1].metrics.stop_rate > runs[0].metrics.stop_rate
    assert runs[0].metrics.stop_rate <= 0.25
    assert runs[-1].metrics.stop_rate >= 0.75
    assert runs[-1].metrics.replies == 9


def test_metrics_and_replies_in_swanlab_run(sampled_run):
    folder = sampled_run.tracking.run_folder()
    scalars = read_swanlab_scalars(folder)
    assert [step for step, _ in scalars["samples/stop_rate"]] == [0, 30, 60]
    for key in ("samples/repetition_rate", "samples/distinct_2", "samples/length_median", "samples/length_p95",
                "samples/format_validity", "samples/style/喵"):
        assert len(scalars[key]) == 3, key
    media = [record.media for record in read_swanlab_records(folder) if record.HasField("media")]
    assert [(item.key, item.step) for item in media] == [("samples/generations", step) for step in (0, 30, 60)]
    captions = [entry.caption for entry in media[-1].value.items]
    assert len(captions) == 9
    assert captions[-1] == "你是谁？"


def test_report_and_loss_plot_next_to_adapter(sampled_run):
    output_dir = sampled_run.output_dir
    report = json.loads((output_dir / "eval_report.json").read_text(encoding="utf-8"))
    assert [run["label"] for run in report] == ["base", f"step {STEPS}"]
    assert report[1]["samples"][-1]["prompt"] == "你是谁？"
    markdown = (output_dir / "eval_report.md").read_text(encoding="utf-8")
    assert "| stop rate |" in markdown
    assert "你是谁？" in markdown
    assert (output_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_compares_base_and_adapter(sampled_run, tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_model_dir}, device: cpu}}\n"
        f"data: {{train: [{PERSONA_DATA}], system_prompt: 你是小橘。}}\n"
        "evaluation: {num_data_prompts: 3, max_new_tokens: 32, style_patterns: [喵]}\n",
        encoding="utf-8",
    )
    vlmtune = str(Path(sys.executable).parent / "vlmtune")
    result = subprocess.run(
        [vlmtune, "eval", str(config), "--adapter", str(sampled_run.output_dir), "--output", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "stop rate" in result.stdout
    assert "adapter" in result.stdout
    report = json.loads((tmp_path / "report" / "eval_report.json").read_text(encoding="utf-8"))
    assert [run["label"] for run in report] == ["base", "adapter"]
    assert report[1]["metrics"]["stop_rate"] > report[0]["metrics"]["stop_rate"]
    # Each reply's raw text and layout check, which the format validity metric averages.
    for run in report:
        flags = [sample["follows_layout"] for sample in run["samples"]]
        assert all(isinstance(flag, bool) for flag in flags)
        assert sum(flags) / len(flags) == pytest.approx(run["metrics"]["format_validity"])
        for sample in run["samples"]:
            if sample["follows_layout"]:
                assert "<answer>" in sample["text"]
    # The adapter was trained on these replies, so their loss is lower with it.
    assert report[1]["loss"] < report[0]["loss"]
    assert "loss on the replies" in result.stdout
    assert report[0]["loss_data"] == "the training data"  # the config has no validation data
    markdown = (tmp_path / "report" / "eval_report.md").read_text(encoding="utf-8")
    assert "| loss on the replies of the training data |" in markdown
    assert "Loss: mean cross-entropy per supervised token" in markdown


def test_reply_loss_weights_tokens_and_skips_prompts(loaded):
    import torch

    from vlmtune.config import DataSettings
    from vlmtune.data import Conversation, Message, TextPart
    from vlmtune.encoding import ChatCollator, ConversationEncoder
    from vlmtune.inference.evaluation import reply_loss

    def conversation(prompt: str, reply: str | None) -> Conversation:
        messages = [Message("user", [TextPart(prompt)])]
        return Conversation(messages + ([Message("assistant", [TextPart(reply)])] if reply else []), source=prompt)

    settings = DataSettings(train=["unused.json"])
    short, long = conversation("你好", "喵"), conversation("你是谁？", "我是小橘，一只活泼可爱的猫娘喵~")
    assert reply_loss(loaded, [conversation("只有提示", None)], settings) is None

    encoder = ConversationEncoder.from_settings(loaded.processor, loaded.stop_token_ids, settings)
    collator = ChatCollator(pad_token_id=loaded.tokenizer.pad_token_id)
    per_example = []
    with torch.no_grad():
        for item in (short, long):
            batch = collator([encoder.encode(item)])
            per_example.append((loaded.model(**batch).loss.item(), int((batch["labels"][:, 1:] != -100).sum())))
    # One batch of both: the mean over all supervised tokens, not the mean of the two examples' means.
    expected = sum(loss * count for loss, count in per_example) / sum(count for _, count in per_example)
    with_prompt_only = [short, long, conversation("只有提示", None)]
    assert reply_loss(loaded, with_prompt_only, settings) == pytest.approx(expected, rel=1e-4)
