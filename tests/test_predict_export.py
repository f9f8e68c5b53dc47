"""Batch predict (fields, resume) and export (merge round trip, files, adapter-only card)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PERSONA_DATA, new_file_mode, write_json
from vlmtune.config import DatasetSpec, GenerationSettings, ModelSettings
from vlmtune.data.loading import load_dataset_file
from vlmtune.errors import DataError, ModelError
from vlmtune.inference import Generator
from vlmtune.inference.cli_chat import system_prompt_for, trained_data_settings
from vlmtune.inference.export import (
    MERGED_CONFIG_NAME,
    MERGED_MANIFEST_NAME,
    MAX_SHARE_OF_CHANGE,
    export_adapter_only,
    export_merged,
    tensor_names,
)
from vlmtune.inference.predict import example_id, predict
from vlmtune.model.loading import check_adapter_folder, load_adapter, load_model

FIXTURES = Path(__file__).parent / "fixtures" / "layouts"
FIELDS = {"id", "model", "adapter", "system", "history", "prompt", "images", "reference", "answer", "reasoning", "generated_tokens", "stopped", "finish_reason"}


@pytest.fixture(scope="module")
def adapter_dir(trained_adapter) -> Path:
    return trained_adapter


def test_predict_fields_and_resume(adapter_dir, tiny_model_dir, tmp_path):
    loaded = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(adapter_dir))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=24))
    conversations = load_dataset_file(DatasetSpec(path=str(PERSONA_DATA)), "你是小橘。")[:5]
    output = tmp_path / "predictions.jsonl"

    assert predict(generator, conversations[:3], output, batch_size=2, model=str(tiny_model_dir), adapter=str(adapter_dir)) == 3
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [set(row) for row in rows] == [FIELDS] * 3
    assert rows[0]["model"] == str(tiny_model_dir.resolve())
    assert rows[0]["adapter"] == str(adapter_dir.resolve())
    assert rows[0]["id"] == "train.json, record 1 (line 2)"
    assert rows[0]["system"] == conversations[0].messages[0].text  # the record's own system prompt
    assert rows[0]["reference"] == conversations[0].messages[-1].text
    for row in rows:
        assert row["finish_reason"] == ("stop" if row["stopped"] else "length")
        assert row["generated_tokens"] <= 24
    raw = output.read_text(encoding="utf-8")
    assert json.dumps(conversations[0].messages[-1].text, ensure_ascii=False)[1:-1] in raw  # Chinese not escaped

    # resumes after the first three
    assert predict(generator, conversations, output, batch_size=2, model=str(tiny_model_dir), adapter=str(adapter_dir)) == 2
    ids = [json.loads(line)["id"] for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(ids) == 5
    assert len(set(ids)) == 5


def test_predict_resume_after_partial_line(adapter_dir, tiny_model_dir, tmp_path):
    loaded = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(adapter_dir))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=8))
    conversations = load_dataset_file(DatasetSpec(path=str(PERSONA_DATA)), "你是小橘。")[:4]
    output = tmp_path / "predictions.jsonl"
    labels = {"model": str(tiny_model_dir), "adapter": str(adapter_dir)}
    predict(generator, conversations[:3], output, batch_size=3, **labels)
    lines = output.read_text(encoding="utf-8").splitlines()

    # A run killed in the middle of the third row, then resumed.
    output.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40], encoding="utf-8")
    assert predict(generator, conversations, output, batch_size=3, **labels) == 2
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [example_id(conversation) for conversation in conversations]

    # A complete last row without its newline is kept.
    output.write_text("\n".join(lines), encoding="utf-8")
    assert predict(generator, conversations, output, batch_size=3, **labels) == 1
    assert len([json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]) == 4


def test_predict_resume_rejects_mismatched_rows(adapter_dir, tiny_model_dir, tmp_path):
    loaded = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(adapter_dir))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=2))
    rows = [{"instruction": "你是谁？", "output": "小橘"}, {"instruction": "你好", "output": "喵"}]
    data = write_json(tmp_path / "test.json", rows)
    output = tmp_path / "p.jsonl"
    producer = {"model": str(tiny_model_dir), "adapter": str(adapter_dir)}
    assert predict(generator, load_dataset_file(DatasetSpec(path=str(data))), output, **producer) == 2
    written = output.read_text(encoding="utf-8")

    # The same data and model: nothing is left to predict.
    assert predict(generator, load_dataset_file(DatasetSpec(path=str(data))), output, **producer) == 0

    # Another adapter (here none) must not append to the first one's rows.
    with pytest.raises(DataError) as caught:
        predict(generator, load_dataset_file(DatasetSpec(path=str(data))), output, model=str(tiny_model_dir))
    message = str(caught.value)
    assert "line 1 (test.json, record 1 (line 2))" in message
    assert f"with adapter {str(adapter_dir.resolve())!r}" in message
    assert "with adapter None" in message
    assert "pass a new --output file" in message

    # A record inserted at the top moves every record down, so record 1 now has another prompt.
    write_json(data, [{"instruction": "新问题", "output": "新回答"}, *rows])
    with pytest.raises(DataError) as caught:
        predict(generator, load_dataset_file(DatasetSpec(path=str(data))), output, **producer)
    message = str(caught.value)
    assert "test.json, record 1 (line 2)" in message
    assert 'its prompt "你是谁？" differs from this run\'s "新问题", so the data file changed' in message
    assert output.read_text(encoding="utf-8") == written

    # Another system prompt gives other replies, so those rows do not belong either.
    write_json(data, rows)
    with pytest.raises(DataError, match=r'its system \(none\) differs from this run\'s "你是沐雪。", so the system prompt'):
        predict(generator, load_dataset_file(DatasetSpec(path=str(data)), "你是沐雪。"), output, **producer)

    # Another data file has other example ids, so none of its examples matches a row, and nothing may be appended.
    other_data = write_json(tmp_path / "other.json", [{"instruction": "早上好", "output": "喵"}])
    with pytest.raises(DataError) as caught:
        predict(generator, load_dataset_file(DatasetSpec(path=str(other_data))), output, **producer)
    assert "has 2 row(s) for examples that --data does not contain (the first: line 1, test.json, record 1" in str(caught.value)
    assert output.read_text(encoding="utf-8") == written

    # Rows that record no model (an older vlmtune wrote them) are not trusted either.
    old_row = {key: value for key, value in json.loads(written.splitlines()[0]).items() if key not in ("model", "adapter")}
    old_output = tmp_path / "old.jsonl"
    old_output.write_text(json.dumps(old_row, ensure_ascii=False) + "\n", encoding="utf-8")
    write_json(data, rows)
    with pytest.raises(DataError, match="it records no model"):
        predict(generator, load_dataset_file(DatasetSpec(path=str(data))), old_output, **producer)


def test_row_history_keeps_earlier_images():
    from vlmtune.data import Conversation, ImagePart, Message, TextPart
    from vlmtune.inference.predict import _prompt_fields

    conversation = Conversation([
        Message("user", [ImagePart("cat.png"), TextPart("这是什么？")]),
        Message("assistant", [TextPart("一只猫喵~")]),
        Message("user", [ImagePart("dog.png"), TextPart("这个呢？")]),
    ])
    fields = _prompt_fields(conversation)
    assert fields["history"] == [
        {"role": "user", "content": "这是什么？", "images": ["cat.png"]},
        {"role": "assistant", "content": "一只猫喵~"},
    ]
    assert fields["images"] == ["dog.png"]


def test_predict_reads_prompts_without_replies(adapter_dir, tmp_path):
    alpaca = write_json(tmp_path / "prompts.json", [{"instruction": "你是谁？"}, {"instruction": "你好", "output": ""},
                                                    {"instruction": "再说一遍", "history": [["你是谁？", "我是小橘"]]}])
    messages = write_json(tmp_path / "chat.json", [{"messages": [{"role": "user", "content": "你好"}]}])
    assert [len(c.messages) for c in load_dataset_file(DatasetSpec(path=str(alpaca)), prompts_only=True)] == [1, 1, 3]
    assert [c.messages[-1].role for c in load_dataset_file(DatasetSpec(path=str(messages)), prompts_only=True)] == ["user"]
    with pytest.raises(DataError, match="field 'output' is missing"):
        load_dataset_file(DatasetSpec(path=str(alpaca)))  # training data needs the reply

    vlmtune = str(Path(sys.executable).parent / "vlmtune")
    output = tmp_path / "p.jsonl"
    result = subprocess.run(
        [vlmtune, "predict", "--adapter", str(adapter_dir), "--data", str(alpaca), "--output", str(output), "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == ["你是谁？", "你好", "再说一遍"]
    assert [row["reference"] for row in rows] == [None, None, None]
    assert "the data has no replies, so the answers are not scored" in result.stdout
    # The trained reply with its think and answer tags needs more than 4 tokens, so some replies are cut off.
    cut_off = [row["finish_reason"] for row in rows].count("length")
    assert cut_off >= 1
    assert f"warning: {cut_off} of the 3 replies in {output} are cut off" in result.stderr
    assert "--max-new-tokens above 4" in result.stderr
    assert not (tmp_path / "p.scores.json").exists()
    assert rows[2]["history"] == [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是小橘"}]
    assert rows[0]["history"] == []

    wrong_role = write_json(tmp_path / "bad.json", [{"messages": [{"role": "assistant", "content": "喵"}]}])
    with pytest.raises(DataError) as caught:
        load_dataset_file(DatasetSpec(path=str(wrong_role)), prompts_only=True)
    assert "where 'user' was expected" in str(caught.value)
    assert "data.on_invalid" not in str(caught.value)  # no training config to set it in


def test_batched_replies_match_single_replies(adapter_dir, tiny_model_dir):
    loaded = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(adapter_dir))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=16))
    conversations = [c for c in load_dataset_file(DatasetSpec(path=str(FIXTURES / "query_response.jsonl")))]
    prompts = [c.messages[:-1] for c in conversations]
    from vlmtune.data import Conversation

    prompts = [Conversation(messages) for messages in prompts]
    batched = generator.generate_batch(prompts)
    single = [generator.generate(prompt) for prompt in prompts]
    assert [reply.answer for reply in batched] == [reply.answer for reply in single]
    assert [reply.stopped for reply in batched] == [reply.stopped for reply in single]


def test_export_round_trip(adapter_dir, tiny_model_dir, tmp_path):
    output = tmp_path / "merged"
    check = export_merged(str(adapter_dir), str(output), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"))
    assert check.ok
    assert check.max_logit_difference < 1e-3
    assert check.share_of_change < 1e-3
    base_files = {path.name for path in tiny_model_dir.iterdir()}
    assert {path.name for path in output.iterdir()} == base_files | {MERGED_CONFIG_NAME, MERGED_MANIFEST_NAME}
    assert tensor_names(output) == tensor_names(tiny_model_dir)
    assert (output / "model.safetensors").stat().st_mode & 0o777 == new_file_mode()
    # The training run's settings come along, so chat and serve on the merged model use them.
    trained = trained_data_settings(None, str(output))
    assert trained == trained_data_settings(str(adapter_dir))
    assert system_prompt_for(None, None, str(output)) == system_prompt_for(None, str(adapter_dir))
    assert trained["max_length"] == 128
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["Glm4vForConditionalGeneration"]  # what vLLM dispatches on
    assert not list(output.glob("adapter_*"))

    # Plain transformers loads it, and its logits equal base + adapter.
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(output).eval()
    adapted = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(adapter_dir))
    ids = torch.tensor([[2, 4, 7, 100, 200, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted.model(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_checkpoint_export_keeps_run_config(adapter_dir, tiny_model_dir, tmp_path):
    import shutil

    # A checkpoint-N folder contains the adapter but not config.yaml, which is in its run folder.
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-5"
    shutil.copytree(adapter_dir, checkpoint, ignore=shutil.ignore_patterns("config.yaml", "checkpoint-*"))
    shutil.copy2(adapter_dir / "config.yaml", run / "config.yaml")
    merged = tmp_path / "merged"
    assert export_merged(str(checkpoint), str(merged), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")).ok
    assert (merged / MERGED_CONFIG_NAME).read_text(encoding="utf-8") == (run / "config.yaml").read_text(encoding="utf-8")
    assert system_prompt_for(None, None, str(merged)) == system_prompt_for(None, str(checkpoint))
    copied = export_adapter_only(str(checkpoint), str(tmp_path / "copy"))
    assert (copied / "config.yaml").is_file()


def test_adapter_on_its_merged_model_warned(adapter_dir, tiny_model_dir, tmp_path, caplog):
    from vlmtune.inference.cli_chat import load_generator

    merged = tmp_path / "merged"
    assert export_merged(str(adapter_dir), str(merged), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")).ok
    with caplog.at_level("WARNING", logger="vlmtune.inference.cli_chat"):
        load_generator(str(merged), str(adapter_dir), "local", {"max_new_tokens": 4}, "auto", "cpu")
    assert f"--model {merged} is a merged model" in caplog.text
    assert "it now applies twice" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmtune.inference.cli_chat"):
        load_generator(str(tiny_model_dir), str(adapter_dir), "local", {"max_new_tokens": 4}, "auto", "cpu")
    assert "applies twice" not in caplog.text


def test_merged_model_keeps_system_prompt(tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / MERGED_CONFIG_NAME).write_text("data:\n  system_prompt: 你是小橘。\n", encoding="utf-8")
    assert system_prompt_for(None, None, str(merged)) == "你是小橘。"
    assert system_prompt_for("你是沐雪。", None, str(merged)) == "你是沐雪。"
    assert system_prompt_for(None, None, str(tmp_path)) is None  # a model folder without the file
    assert system_prompt_for(None, None, "ZhipuAI/GLM-4.1V-9B-Thinking") is None  # a hub id


def test_export_refuses_non_empty_folder(adapter_dir, tiny_model_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("earlier work", encoding="utf-8")
    with pytest.raises(ModelError, match="is not empty"):
        export_merged(str(adapter_dir), str(tmp_path), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"))
    with pytest.raises(ModelError, match="is not empty"):
        export_adapter_only(str(adapter_dir), str(tmp_path))
    a_file = tmp_path / "keep.txt"
    with pytest.raises(ModelError, match=f"^--output: {a_file} is a file; choose a new folder$"):
        export_merged(str(adapter_dir), str(a_file), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"))
    with pytest.raises(ModelError, match=f"^--output: {a_file} is a file; choose a new folder$"):
        export_adapter_only(str(adapter_dir), str(a_file))
    assert a_file.read_text(encoding="utf-8") == "earlier work"


def test_predict_output_checked_before_loading(adapter_dir, tmp_path):
    vlmtune = str(Path(sys.executable).parent / "vlmtune")
    data = write_json(tmp_path / "prompts.json", [{"instruction": "你是谁？"}])
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    for output, expected in (
        (tmp_path, f"error: --output {tmp_path} is a folder; give a file path, e.g. {tmp_path / 'predictions.jsonl'}"),
        (tmp_path / "notes.txt" / "p.jsonl", f"error: --output {tmp_path / 'notes.txt' / 'p.jsonl'}: cannot write there"),
    ):
        result = subprocess.run(
            [vlmtune, "predict", "--adapter", str(adapter_dir), "--data", str(data), "--output", str(output)],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 2
        assert expected in " ".join(result.stderr.split())
        assert "attached adapter" not in result.stderr


def test_export_arguments_checked_before_loading(adapter_dir, tmp_path):
    # A base model that does not exist: loading it would fail with another error.
    base = ModelSettings(name_or_path=str(tmp_path / "no-model"), device="cpu")
    with pytest.raises(ModelError, match=r"--max-shard-size: invalid size 'lots'; give a number and a unit, e\.g\. 5GB"):
        export_merged(str(adapter_dir), str(tmp_path / "out"), base, max_shard_size="lots")
    with pytest.raises(ModelError, match=r"--dtype: invalid value 'fp16'; choose one of auto, bfloat16, float16, float32"):
        export_merged(str(adapter_dir), str(tmp_path / "out"), base, dtype="fp16")
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_no_folder(adapter_dir, tiny_model_dir, tmp_path, monkeypatch):
    """A disk that fills up after the weights are written: the folder goes, so the same export can run again."""
    import vlmtune.inference.export as export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.shutil, "copy2", disk_full)
    output = tmp_path / "merged"
    with pytest.raises(OSError, match="No space left"):
        export_merged(str(adapter_dir), str(output), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"))
    assert not output.exists()


def _adapter_copy(adapter_dir: Path, folder: Path) -> Path:
    """Copy an adapter's folder without its checkpoints."""
    import shutil

    shutil.copytree(adapter_dir, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    return folder


def _scaled_adapter(adapter_dir: Path, folder: Path, factor: float) -> Path:
    """Copy an adapter with its lora_B weights times `factor`: the same directions, a smaller update."""
    from safetensors.torch import load_file, save_file

    _adapter_copy(adapter_dir, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({name: tensor * factor if "lora_B" in name else tensor for name, tensor in weights.items()}, folder / "adapter_model.safetensors")
    return folder


def test_bfloat16_export_trained_adapter_passes(adapter_dir, tiny_model_dir, tmp_path):
    # The tiny model's large random logits (initializer range 0.2) move by more than the absolute
    # bfloat16 tolerance when the merged weights are rounded, but by a small share of what the adapter changes.
    check = export_merged(str(adapter_dir), str(tmp_path / "merged"), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"), dtype="bfloat16")
    assert check.ok
    assert check.max_logit_difference > check.tolerance
    assert 0 < check.share_of_change <= MAX_SHARE_OF_CHANGE


def test_bfloat16_export_small_update_fails(adapter_dir, tiny_model_dir, tmp_path):
    # A hundredth of the trained update is mostly below bfloat16's rounding step, so the merge loses it.
    weak = _scaled_adapter(adapter_dir, tmp_path / "weak", 0.01)
    output = tmp_path / "merged"
    with pytest.raises(ModelError) as caught:
        export_merged(str(weak), str(output), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"), dtype="bfloat16")
    message = str(caught.value)
    assert f"the export in {output} failed its check: reloaded logits differ from base + adapter by at most" in message
    share = float(re.search(r"(\d+\.\d+)% of the adapter's change to them", message).group(1))
    assert share > 100 * MAX_SHARE_OF_CHANGE
    assert f"The merged model was written to {output} in full and kept there" in message
    assert "The merge ran in bfloat16" in message
    assert "export again with --dtype float32" in message.lower()
    assert "delete that folder first or pass a new --output" in message
    assert (output / "model.safetensors").is_file()
    assert (output / "config.json").is_file()

    # The same update merged in float32 keeps the adapter's change.
    check = export_merged(str(weak), str(tmp_path / "merged32"), ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"), dtype="float32")
    assert check.ok and check.share_of_change < 1e-3


def test_adapter_only_export_with_card(adapter_dir, tmp_path):
    output = export_adapter_only(str(adapter_dir), str(tmp_path / "adapter"))
    assert (output / "adapter_model.safetensors").is_file()
    assert (output / "adapter_model.safetensors").stat().st_mode & 0o777 == new_file_mode()
    # The run's record comes along, so chat and serve send the copy the same system prompt.
    assert (output / "run_manifest.json").is_file()
    assert system_prompt_for(None, str(output)) == system_prompt_for(None, str(adapter_dir))
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "base_model:" in card
    assert "r=16, alpha=32" in card
    assert "mean training loss of the last training session" in card


def test_predict_skips_invalid_on_request(adapter_dir, tmp_path):
    vlmtune = str(Path(sys.executable).parent / "vlmtune")
    data = write_json(tmp_path / "test.json", [{"instruction": "你是谁？"}, {"instruction": 5}, {"instruction": "早上好"}])
    command = [vlmtune, "predict", "--adapter", str(adapter_dir), "--data", str(data), "--max-new-tokens", "4"]
    stopped = subprocess.run([*command, "--output", str(tmp_path / "a.jsonl")], capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 2
    assert "field 'instruction' must be a string, got int 5 (pass --on-invalid skip to skip such examples)" in stopped.stderr
    skipped = subprocess.run([*command, "--output", str(tmp_path / "b.jsonl"), "--on-invalid", "skip"],
                             capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    assert "wrote 2 prediction(s)" in skipped.stdout
    assert "skipped 1 invalid example(s)" in skipped.stderr


def test_predict_and_export_commands(adapter_dir, tiny_model_dir, tmp_path):
    vlmtune = str(Path(sys.executable).parent / "vlmtune")
    data = write_json(tmp_path / "test.json", [{"instruction": "你是谁？", "output": "小橘喵~"}])
    result = subprocess.run(
        [vlmtune, "predict", "--adapter", str(adapter_dir), "--data", str(data), "--output", str(tmp_path / "p.jsonl"),
         "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 1 prediction(s)" in result.stdout
    assert "it/s]" not in result.stderr  # no progress bars (weights loading, predict) in piped output
    scores = json.loads((tmp_path / "p.scores.json").read_text(encoding="utf-8"))
    assert scores["examples"] == 1
    assert 0 <= scores["bleu"] <= 100
    assert 0 <= scores["chrf"] <= 100
    assert f"against the references of 1 example(s): BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}" in result.stdout
    again = subprocess.run(
        [vlmtune, "predict", "--adapter", str(adapter_dir), "--data", str(data), "--output", str(tmp_path / "p.jsonl")],
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert f"BLEU {scores['bleu']:.2f}" in again.stdout  # scored again from the file
    assert "loaded" not in again.stderr  # the model is not loaded for nothing
    base_only = subprocess.run(
        [vlmtune, "predict", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "p.jsonl")],
        capture_output=True, text=True, timeout=300,
    )
    assert base_only.returncode == 2
    assert "with adapter None" in base_only.stderr
    assert "loaded" not in base_only.stderr  # rejected before the model loads
    result = subprocess.run(
        [vlmtune, "export", "--adapter", str(adapter_dir), "--output", str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "merged model written to" in result.stdout
    assert "it/s]" not in result.stderr  # no shard-writing bar either

    # The two folders swapped: each command names what the folder is.
    swapped = subprocess.run([vlmtune, "export", "--adapter", str(tiny_model_dir), "--output", str(tmp_path / "m2")],
                             capture_output=True, text=True, timeout=300)
    assert swapped.returncode != 0
    assert f"--adapter: no adapter_config.json in {tiny_model_dir}" in swapped.stderr
    swapped = subprocess.run([vlmtune, "chat", "--model", str(adapter_dir), "--message", "你好"],
                             capture_output=True, text=True, timeout=300)
    assert swapped.returncode != 0
    assert "is a LoRA adapter folder" in swapped.stderr
    assert "Traceback" not in swapped.stderr


def fake_run_folder(folder: Path, data: dict, counts: dict | None) -> Path:
    """Write the config.yaml and run_manifest.json of a training run, which is all the system prompt lookup reads."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": data}, allow_unicode=True), encoding="utf-8")
    manifest = {} if counts is None else {"system_prompts": counts}
    (folder / "run_manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    return folder


def prompt_counts(prompts: list[str | None]) -> dict:
    from vlmtune.data.conversation import Conversation, Message, TextPart
    from vlmtune.training.recipe import system_prompt_counts

    conversations = [
        Conversation([*([Message("system", [TextPart(prompt)])] if prompt else []), Message("user", [TextPart("你好")])])
        for prompt in prompts
    ]
    return system_prompt_counts(conversations)


SYSTEM_PROMPT_CASES = [
    pytest.param({}, ["你是小橘。"] * 3, "你是小橘。", False, id="every-example-its-own-same"),
    pytest.param({"system_prompt": "你是小橘。"}, ["你是小橘。"] * 3, "你是小橘。", False, id="configured"),
    pytest.param({}, [None, None], None, False, id="none"),
    pytest.param({}, ["你是小橘。", "你是沐雪。", "你是小橘。"], None, True, id="different"),
    pytest.param({}, ["你是小橘。", None], None, True, id="some-without"),
    pytest.param({"system_prompt": "你是小橘。"}, None, "你是小橘。", False, id="older-manifest"),
]


def test_most_common_trained_prompt_not_warned(tmp_path, caplog):
    """data.system_prompt that most examples had is the expected choice: logged as information, not a warning."""
    counts = prompt_counts(["你是小橘。", "你是沐雪。", "你是小橘。"])
    adapter = fake_run_folder(tmp_path / "run", {"system_prompt": "你是小橘。"}, counts)
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        assert system_prompt_for(None, str(adapter)) == "你是小橘。"
    [record] = [record for record in caplog.records if "training examples had 2 different system prompts" in record.message]
    assert record.levelno == logging.INFO


@pytest.mark.parametrize("data, prompts, expected, warned", SYSTEM_PROMPT_CASES)
def test_trained_system_prompt_from_examples(tmp_path, caplog, data, prompts, expected, warned):
    counts = None if prompts is None else prompt_counts(prompts)
    adapter = fake_run_folder(tmp_path / "run", data, counts)
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        assert system_prompt_for(None, str(adapter)) == expected
    assert ("training examples had" in caplog.text) == warned
    assert system_prompt_for("", str(adapter)) is None  # --system '' still means none

    # The model card names the same prompt, and how the examples differed.
    from vlmtune.inference.export import model_card

    manifest = json.loads((adapter / "run_manifest.json").read_text(encoding="utf-8"))
    (adapter / "run_manifest.json").write_text(json.dumps({**manifest, "config": {"data": data}}), encoding="utf-8")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}), encoding="utf-8")
    [line] = [line for line in model_card(adapter).splitlines() if line.startswith("- system prompt:")]
    assert line.startswith(f"- system prompt: {json.dumps(expected, ensure_ascii=False) if expected else 'none'}")
    assert ("training examples had" in line) == warned


def _broken_copy(adapter_dir: Path, folder: Path, file_name: str, content: bytes | None) -> Path:
    """Copy an adapter, then replace one of its files with `content` (None removes it)."""
    _adapter_copy(adapter_dir, folder)
    if content is None:
        (folder / file_name).unlink()
    else:
        (folder / file_name).write_bytes(content)
    return folder


def test_damaged_adapter_folders_named(adapter_dir, tmp_path):
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    cases = {
        "no_weights": ("adapter_model.safetensors", None, "has adapter_config.json but no adapter_model.safetensors"),
        "truncated": ("adapter_model.safetensors", weights[:1000], "cannot read {folder}/adapter_model.safetensors ("),
        "bad_json": ("adapter_config.json", b'{"r": 8,', "{folder}/adapter_config.json is not a valid adapter config ("),
        "json_list": ("adapter_config.json", b"[8]", "(a JSON list, not an object)"),
    }
    for name, (file_name, content, expected) in cases.items():
        folder = _broken_copy(adapter_dir, tmp_path / name, file_name, content)
        with pytest.raises(ModelError) as caught:
            check_adapter_folder(folder)
        assert str(caught.value).startswith("--adapter: "), name
        assert expected.format(folder=folder) in str(caught.value), name
        with pytest.raises(ModelError, match="^lora.init_from: "):
            check_adapter_folder(folder, "lora.init_from")
    assert check_adapter_folder(adapter_dir)["r"] == 16


def test_chat_with_truncated_adapter_fails_cleanly(adapter_dir, tmp_path):
    folder = _broken_copy(adapter_dir, tmp_path / "truncated", "adapter_model.safetensors", b"\x00" * 100)
    vlmtune = str(Path(sys.executable).parent / "vlmtune")
    result = subprocess.run([vlmtune, "chat", "--adapter", str(folder), "--message", "你好"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"error: --adapter: cannot read {folder}/adapter_model.safetensors" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_model_folder_without_weights_named(tiny_model_dir, tmp_path):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(tiny_model_dir, half)
    (half / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=rf"^model.name_or_path: {half} has config.json but no weights \(\*.safetensors or \*.bin\); the download may be incomplete"):
        load_model(ModelSettings(name_or_path=str(half), device="cpu"))
    (half / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}), encoding="utf-8"
    )
    shutil.copy(tiny_model_dir / "model.safetensors", half / "model-00001-of-00002.safetensors")
    with pytest.raises(ModelError, match=r"lacks 1 of the 2 weight files that model.safetensors.index.json lists \(first: model-00002-of-00002.safetensors\)"):
        load_model(ModelSettings(name_or_path=str(half), device="cpu"))


def test_prompt_longer_than_context_named(tiny_model_dir, caplog):
    from vlmtune.data import Conversation, Message, TextPart

    loaded = load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=200))
    limit = generator.context_length
    text = "喵" * (2 * limit)
    long = Conversation([Message("user", [TextPart(text)])], source="long.json, record 1 (line 2)")
    with pytest.raises(DataError, match=rf"^long.json, record 1 \(line 2\): the prompt has \d+ tokens, and the model's maximum context length is {limit} tokens"):
        generator.generate(long)
    with pytest.raises(DataError, match=r"^long.json, record 1 \(line 2\): the prompt has"):
        generator.generate_batch([Conversation([Message("user", [TextPart("你好")])]), long])

    # A prompt that leaves less room than max_new_tokens gets a shorter reply, with a warning. Each 喵 is one token.
    overhead = generator.prepare_inputs(Conversation([Message("user", [TextPart("喵")])]))["input_ids"].shape[1] - 1
    near = Conversation([Message("user", [TextPart("喵" * (limit - 50 - overhead))])], source="near.json, record 1 (line 1)")
    length = generator.prepare_inputs(near)["input_ids"].shape[1]
    assert length == limit - 50
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        reply = generator.generate(near)
    assert reply.generated_tokens <= limit - length
    assert f"near.json, record 1 (line 1): the prompt has {length} tokens, so its reply can have {limit - length} new tokens, not 200" in caplog.text
