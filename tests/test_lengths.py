"""Length handling: statistics, trimming old turns, and the `data stats` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import data_settings, write_json
from vlmtune.config import load_config
from vlmtune.data import Conversation, Message, TextPart
from vlmtune.encoding import encode_conversations
from vlmtune.encoding.stats import length_stats, text_histogram
from vlmtune.webui.forms import preview_samples


def conversation(turns: int, answer: str = "好的喵", source: str = "chat.json, record 0 (line 1)") -> Conversation:
    messages = [Message("system", [TextPart("你是小橘。")])]
    for number in range(turns):
        messages.append(Message("user", [TextPart(f"第{number}个问题" + "喵" * 40)]))
        messages.append(Message("assistant", [TextPart(answer)]))
    return Conversation(messages, source=source)


def test_length_stats_values():
    [only] = length_stats({"a.json": [10, 20, 30, 40, 100]}, max_length=35)
    assert (only.count, only.min, only.median, only.p95, only.max) == (5, 10, 30, 100, 100)
    assert only.over_max_length == 2


def test_length_stats_adds_total_row():
    rows = length_stats({"a.json": [1, 2], "b.json": [3]}, max_length=10)
    assert [row.dataset for row in rows] == ["a.json", "b.json", "all"]
    assert rows[-1].count == 3


def test_text_histogram_lines():
    lines = text_histogram([1, 1, 1, 50, 100]).splitlines()
    assert lines[0].split()[1] == "3"
    assert sum(int(line.split()[1]) for line in lines) == 5
    assert lines[-1].split()[0].endswith("-100")  # the last bin ends at the longest sample
    assert text_histogram([88, 20, 40]).splitlines()[-1].split()[0].endswith("-88")


def test_trim_history_removes_oldest_turns(encoder):
    long = conversation(turns=4)
    full_length = len(encoder.encode(long))
    one_turn = len(encoder.encode(conversation(turns=1)))
    report = encode_conversations(encoder, [long], data_settings(max_length=one_turn + 5, on_overlength="trim_history"))
    [sample] = report.samples
    assert len(sample) == one_turn
    assert report.trimmed == 1
    assert report.lengths["chat.json"] == [full_length]
    text = encoder.tokenizer.decode(sample.input_ids, skip_special_tokens=False)
    assert text.startswith("[gMASK]<sop><|system|>\n你是小橘。<|user|>\n第3个问题")


def test_trim_history_drops_when_last_turn_too_long(encoder):
    too_long = conversation(turns=2, answer="喵" * 400)
    report = encode_conversations(encoder, [too_long], data_settings(max_length=120, on_overlength="trim_history"))
    assert report.samples == []
    assert list(report.dropped) == ["longer than data.max_length=120 tokens"]


def test_data_stats_command(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "train.json", [{"instruction": "问" * n, "output": "答"} for n in range(1, 30)])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_model_dir}, hub: local}}\ndata: {{train: [{data}], max_length: 40}}\n"
        f"train: {{output_dir: {tmp_path / 'out'}}}\n",
        encoding="utf-8",
    )
    vlmtune = str(Path(sys.executable).parent / "vlmtune")
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([vlmtune, "data", "stats", str(config)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "encoded example lengths in tokens, before data.on_overlength (data.max_length=40)" in result.stdout
    assert f"{data} " in result.stdout
    assert "│      29 │" in result.stdout
    png = tmp_path / "out" / "length_histogram.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "validation" not in result.stdout

    result = subprocess.run([vlmtune, "data", "stats", str(config), "data.val_size=0.1", "--png", str(tmp_path / "h.png")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "the table counts the training split only; 3 validation example(s)" in result.stdout
    assert "│      26 │" in result.stdout

    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    for png, expected in (
        (tmp_path / "hist.txt", f"error: --png {tmp_path / 'hist.txt'}: the histogram is a PNG image, so give a path ending in .png"),
        (tmp_path / "notes.txt" / "h.png", f"error: --png {tmp_path / 'notes.txt' / 'h.png'}: cannot write there"),
    ):
        result = subprocess.run([vlmtune, "data", "stats", str(config), "--png", str(png)], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 2
        assert expected in result.stderr
        assert "encoded example lengths" not in result.stdout  # checked before encoding


def test_histogram_draws_chinese_dataset_names(tmp_path, caplog):
    import logging
    import warnings

    from matplotlib import font_manager

    from vlmtune.encoding.stats import CJK_FONTS, write_histogram_png

    has_cjk_font = any(font.name in CJK_FONTS for font in font_manager.fontManager.ttflist)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="vlmtune"):
        warnings.simplefilter("always")
        write_histogram_png({"data/阿福人设.json": [3, 5, 8], "data/b.json": [4, 4]}, 10, tmp_path / "h.png")
    assert [str(warning.message) for warning in caught if "Glyph" in str(warning.message)] == []
    # With a CJK font the name is drawn; without one the legend numbers the datasets and the log maps the numbers to names.
    assert ("dataset 1 = 阿福人设.json" in caplog.text) is not has_cjk_font


def test_histogram_survives_training_runs(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "train.json", [{"instruction": f"第{n}个问题", "output": "好的喵"} for n in range(4)])
    config = tmp_path / "run.yaml"
    output_dir = tmp_path / "out"
    config.write_text(
        f"model: {{name_or_path: {tiny_model_dir}, hub: local, device: cpu}}\ndata: {{train: [{data}], max_length: 64}}\n"
        f"train: {{output_dir: {output_dir}, max_steps: 1, per_device_train_batch_size: 2, save_steps: 100}}\n"
        "tracking: {backend: none}\nevaluation: {generate: false}\n",
        encoding="utf-8",
    )
    stats = _vlmtune("data", "stats", str(config))
    assert stats.returncode == 0, stats.stderr
    png = output_dir / "length_histogram.png"
    assert f"histogram written to {png}" in stats.stdout
    written = png.read_bytes()

    # The histogram alone is no earlier run, so training starts in that folder.
    first = _vlmtune("train", str(config))
    assert first.returncode == 0, first.stderr
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert png.read_bytes() == written

    second = _vlmtune("train", str(config), "--overwrite")
    assert second.returncode == 0, second.stderr
    assert "removed the earlier run" in second.stderr
    assert png.read_bytes() == written


def _long_history_config(tiny_model_dir: Path, tmp_path: Path, on_overlength: str) -> Path:
    """Write a config over three examples: one short, one fitting after trimming its history, one never fitting."""
    history = [[f"第{number}个问题" + "喵" * 40, "好的喵"] for number in range(3)]
    rows = [
        {"instruction": "你好", "output": "你好喵"},
        {"instruction": "再问一次", "output": "好的喵", "history": history},
        {"instruction": "长回答", "output": "喵" * 400},
    ]
    data = write_json(tmp_path / "chat.json", rows)
    config = tmp_path / f"{on_overlength}.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_model_dir}, hub: local}}\n"
        f"data: {{train: [{data}], max_length: 80, on_overlength: {on_overlength}}}\n"
        f"train: {{output_dir: {tmp_path / 'out'}}}\n",
        encoding="utf-8",
    )
    return config


def _vlmtune(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "vlmtune"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_data_stats_follows_trim_history(tiny_model_dir, tmp_path):
    result = _vlmtune("data", "stats", str(_long_history_config(tiny_model_dir, tmp_path, "trim_history")))
    assert result.returncode == 0, result.stderr
    assert "the oldest turns of 1 example(s) were removed" in result.stderr
    assert "dropped 1 example(s): longer than data.max_length=80 tokens" in result.stderr
    assert "encoded 2 sample(s)" in result.stderr
    output = " ".join(result.stdout.split())  # rich wraps long lines
    assert "before data.on_overlength" in output
    assert ("with data.on_overlength=trim_history, training uses 2 of these 3 examples: 1 with their oldest turns "
            "removed to fit, 1 dropped as longer than data.max_length=80") in output


def test_data_stats_counts_overlength_errors(tiny_model_dir, tmp_path):
    result = _vlmtune("data", "stats", str(_long_history_config(tiny_model_dir, tmp_path, "error")))
    assert result.returncode == 0, result.stderr
    assert "dropped" not in result.stderr
    assert "2 sample(s) are longer than data.max_length=80, and data.on_overlength=error stops training" in result.stdout


def test_inspect_shows_samples_as_trained(tiny_model_dir, tmp_path):
    result = _vlmtune("inspect", str(_long_history_config(tiny_model_dir, tmp_path, "trim_history")), "-n", "3")
    assert result.returncode == 0, result.stderr
    output = " ".join(result.stdout.split())  # rich wraps long lines
    assert output.count("self-check ok") == 2
    assert "the oldest turns were removed to fit data.max_length=80" in output
    assert "第0个问题" not in output  # trimmed away
    assert "第2个问题" in output
    assert "training skips this example: longer than data.max_length=80 tokens" in output


def test_inspect_fails_where_training_stops(tiny_model_dir, tmp_path):
    result = _vlmtune("inspect", str(_long_history_config(tiny_model_dir, tmp_path, "error")), "-n", "3")
    assert result.returncode == 1
    output = " ".join(result.stdout.split())
    assert "training stops at this example" in output
    assert "more than data.max_length=80" in output


def test_manifest_counts_validation_and_trims(encoder):
    from vlmtune.data.loading import SkipReport
    from vlmtune.training.recipe import example_counts

    settings = data_settings(max_length=120, on_overlength="trim_history")
    training = encode_conversations(encoder, [conversation(turns=4), conversation(turns=1)], settings)
    validation = encode_conversations(encoder, [conversation(turns=2, answer="喵" * 400)], settings)
    counts = example_counts(SkipReport(), training, validation)
    assert counts["trimmed"] == 1
    assert counts["dropped"] == {}
    assert counts["validation_dropped"] == {"longer than data.max_length=120 tokens": 1}
    assert counts["validation_trimmed"] == 0
    assert "validation_dropped" not in example_counts(SkipReport(), training, None)


def test_web_preview_shows_samples_as_trained(tiny_model_dir, tmp_path):
    config = load_config(_long_history_config(tiny_model_dir, tmp_path, "trim_history"))
    plain, trimmed, skipped = preview_samples(config, count=3)
    assert plain.check.ok
    assert plain.note is None
    assert trimmed.check.ok
    assert trimmed.length <= 80
    assert "the oldest turns were removed to fit data.max_length=80" in trimmed.note
    text = "".join(piece for piece, _ in trimmed.segments)
    assert "第2个问题" in text
    assert "第0个问题" not in text  # trimmed away
    assert skipped.check is None
    assert skipped.segments == []
    assert skipped.note == "training skips this example: longer than data.max_length=80 tokens"


def test_stats_table_keeps_long_names_whole():
    import io

    from rich.console import Console

    from vlmtune.encoding.stats import LengthStats, stats_table

    names = ["/tmp/trial/mydata/中文数据/水果.json", "/tmp/trial/mydata/中文数据/水果对话.jsonl"]
    rows = [LengthStats(name, 8, 10, 12.0, 20, 24, 0) for name in names]
    output = io.StringIO()
    Console(file=output, width=60).print(stats_table(rows, 512))
    # The dataset column's pieces, line by line: a wrapped name continues on the next line.
    cells = [line.split("│")[1].strip() for line in output.getvalue().splitlines() if line.startswith("│")]
    assert "".join(cells) == "".join(names)
