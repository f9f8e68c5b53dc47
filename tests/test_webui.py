"""The web UI's logic without a browser: config writing, adapter discovery, progress, jobs and chat."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio", reason="the web UI tests need gradio: pip install -e '.[webui]'")

import gradio as gr  # noqa: E402
from conftest import PERSONA_DATA, REPO_ROOT, write_json  # noqa: E402
from vlmtune.config import GenerationSettings, load_config  # noqa: E402
from vlmtune.errors import ConfigError  # noqa: E402
from vlmtune.inference import Generator  # noqa: E402
from vlmtune.inference.export import MERGED_CONFIG_NAME  # noqa: E402
from vlmtune.webui.adapters import adapter_choices, find_adapters  # noqa: E402
from vlmtune.webui.app import parse_auth  # noqa: E402
from vlmtune.webui.chat import ADAPTER_SIDE, BASE_SIDE, ChatBackend, SideReply, Turn, side_history  # noqa: E402
from vlmtune.webui.chat_tab import ChatTab, chat_messages, reply_messages  # noqa: E402
from vlmtune.webui.forms import (  # noqa: E402
    CONFIG_FILE_NAME,
    TrainForm,
    build_run_config,
    list_presets,
    preset_form_values,
    preview_samples,
    shell_command,
    train_command,
    write_run_config,
)
from vlmtune.webui.jobs import JobManager, read_progress  # noqa: E402
from vlmtune.webui.train_tab import TrainTab  # noqa: E402

SYSTEM_PROMPT = "你是小橘，一只活泼可爱的猫娘助手，说话时常带“喵”。"


def write_preset(folder: Path, tiny_model_dir: Path, **train) -> Path:
    """Write a small preset like configs/demo.yaml, with quick training settings."""
    folder.mkdir(parents=True, exist_ok=True)
    tree = {
        "model": {"name_or_path": str(tiny_model_dir), "hub": "local", "device": "cpu"},
        "data": {"train": ["unused.json"], "system_prompt": SYSTEM_PROMPT, "max_length": 256},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.0},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 0,
                  "logging_steps": 1, "save_steps": 1000, **train},
        "tracking": {"backend": "none"},
        "evaluation": {"generate": False},
    }
    path = folder / "quick.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


def make_form(preset: Path, model: Path, output_dir: Path, dataset: Path = PERSONA_DATA, **values) -> TrainForm:
    return TrainForm(dataset=str(dataset), model=str(model), output_dir=str(output_dir), preset=str(preset), **values)


def form_values(form: TrainForm) -> list:
    """Return the form as the values the Train tab's buttons pass to their handlers."""
    return [getattr(form, field.name) for field in dataclasses.fields(TrainForm)]


def test_form_values_reach_config(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    form = make_form(
        preset, tiny_model_dir, tmp_path / "run", num_train_epochs=2, learning_rate=3e-3, lora_rank=8,
        max_length=300, thinking="none", max_steps=7,
    )
    config = build_run_config(form)
    assert config.data.train[0].path == str(PERSONA_DATA)
    assert config.train.output_dir == str((tmp_path / "run").resolve())
    assert config.train.num_train_epochs == 2
    assert config.train.learning_rate == 3e-3
    assert config.train.max_steps == 7
    assert config.lora.r == 8
    assert config.lora.alpha == 16, "alpha follows the rank with the preset's alpha / r = 2"
    assert config.data.max_length == 300
    assert config.data.thinking == "none"
    assert config.model.hub == "local"
    assert config.data.system_prompt == SYSTEM_PROMPT, "settings outside the form come from the preset"
    assert config.tracking.backend == "none"


def test_written_config_loads_back(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    config = build_run_config(make_form(preset, tiny_model_dir, tmp_path / "run"))
    path = write_run_config(config)
    assert path == (tmp_path / "run" / CONFIG_FILE_NAME).resolve()
    assert SYSTEM_PROMPT in path.read_text(encoding="utf-8"), "Chinese text is written as is, not escaped"
    assert load_config(path) == config


def test_missing_dataset_named_in_message(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError) as error:
        build_run_config(make_form(preset, tiny_model_dir, tmp_path / "run", dataset=missing))
    assert f"dataset: file not found: {missing}" in str(error.value)
    assert "upload" in str(error.value)


def test_hub_dataset_passes_through(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    form = make_form(preset, tiny_model_dir, tmp_path / "run", dataset="modelscope:himzhzx/muice-dataset-train.catgirl")
    [spec] = build_run_config(form).data.train
    assert (spec.hub, spec.path) == ("modelscope", "himzhzx/muice-dataset-train.catgirl")


def test_model_prefix_overrides_preset_hub(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)  # its model.hub is local
    config = build_run_config(make_form(preset, "huggingface:zai-org/GLM-4.1V-9B-Thinking", tmp_path / "run"))
    assert (config.model.hub, config.model.name_or_path) == ("huggingface", "zai-org/GLM-4.1V-9B-Thinking")


def test_wrong_model_paths_rejected_before_run(tiny_model_dir, tmp_path, monkeypatch):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    cases = {
        str(tmp_path / "nowhere"): f"base model: local folder not found: {tmp_path / 'nowhere'}",
        "outputs/tiny-glm4vv": f"base model: local folder not found: {tmp_path / 'outputs' / 'tiny-glm4vv'}",
        str(adapter): "is a LoRA adapter folder",
        str(PERSONA_DATA): "is a file; give the model's folder",
    }
    for model, expected in cases.items():
        with pytest.raises(ConfigError) as error:
            build_run_config(make_form(preset, model, tmp_path / "run"))
        assert expected in str(error.value), model
    # A hub id is left to the run, which downloads it.
    config = build_run_config(make_form(preset, "zai-org/GLM-4.1V-9B-Thinking", tmp_path / "run"))
    assert config.model.name_or_path == "zai-org/GLM-4.1V-9B-Thinking"


def test_empty_fields_reported_together(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    form = TrainForm(dataset="", model="", output_dir="", preset=str(preset))
    with pytest.raises(ConfigError) as error:
        build_run_config(form)
    message = str(error.value)
    assert "dataset: no file chosen" in message
    assert "base model: empty" in message
    assert "output folder: empty" in message


def test_invalid_yaml_preset_named(tiny_model_dir, tmp_path):
    preset = tmp_path / "broken.yaml"
    preset.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        build_run_config(make_form(preset, tiny_model_dir, tmp_path / "run"))
    assert f"preset {preset}: invalid YAML" in str(error.value)


def test_preset_unknown_key_named(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir, learning_rat=0.1)
    with pytest.raises(ConfigError) as error:
        build_run_config(make_form(preset, tiny_model_dir, tmp_path / "run"))
    assert "train.learning_rat: unknown key" in str(error.value)
    assert str(preset) in str(error.value)


def test_missing_preset_named(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError) as error:
        build_run_config(make_form(tmp_path / "gone.yaml", tiny_model_dir, tmp_path / "run"))
    assert "preset not found" in str(error.value)
    assert "gone.yaml" in str(error.value)


def test_presets_listed_from_configs():
    presets = [Path(path).name for path in list_presets(REPO_ROOT / "configs")]
    assert "demo.yaml" in presets
    assert presets == sorted(presets)


def test_empty_presets_folder_warning(tmp_path, caplog):
    presets = tmp_path / "presets"
    presets.mkdir()
    tab = TrainTab(JobManager(), None, str(tmp_path / "outputs"), str(presets), i18n=lambda key: key)
    with caplog.at_level(logging.WARNING, logger="vlmtune.webui.train_tab"), gr.Blocks():
        tab.build()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"no YAML presets in {presets}" in message
    assert "pass --presets FOLDER" in message
    assert "None" not in message
    with pytest.raises(ConfigError, match="no preset chosen.*--presets FOLDER"):
        preset_form_values("")


def test_train_command_runs_cli():
    command = train_command("out/train_config.yaml", overwrite=True)
    assert command[1:4] == ["-m", "vlmtune.cli.main", "train"]
    assert shell_command(command) == "vlmtune train out/train_config.yaml --overwrite"


def test_adapters_found_in_order(tmp_path):
    for folder in ["b-run", "b-run/checkpoint-10", "b-run/checkpoint-2", "b-run/initial_adapter", "a-run", "a-run/nested"]:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "no-adapter").mkdir()
    found = [str(Path(path).relative_to(tmp_path)) for path in find_adapters(tmp_path)]
    assert found == ["a-run", "a-run/nested", "b-run", "b-run/checkpoint-2", "b-run/checkpoint-10"]


def test_adapter_choices_mark_other_bases(tmp_path, tiny_model_dir):
    bases = {"hub-copy": f"ZhipuAI/{tiny_model_dir.name}", "mine": str(tiny_model_dir), "other": "Qwen/Qwen2.5-VL-3B-Instruct"}
    for folder in ["hub-copy", "mine", "other", "unrecorded"]:
        (tmp_path / folder).mkdir()
        recorded = {"base_model_name_or_path": bases[folder]} if folder in bases else {}
        write_json(tmp_path / folder / "adapter_config.json", recorded)
    choices = adapter_choices(find_adapters(tmp_path), str(tiny_model_dir))
    values = [Path(value).name for _, value in choices]
    assert values == ["hub-copy", "mine", "unrecorded", "other"]  # this base's adapters first
    labels = [label for label, _ in choices]
    assert labels[:3] == [str(tmp_path / name) for name in values[:3]]
    assert labels[3] == f"{tmp_path / 'other'} (trained on Qwen/Qwen2.5-VL-3B-Instruct)"


def test_adapters_of_missing_folder(tmp_path):
    assert find_adapters(tmp_path / "missing") == []
    assert find_adapters(None) == []


def test_progress_parsing(tmp_path):
    path = tmp_path / "progress.jsonl"
    earlier = json.dumps({"event": "log", "step": 99, "max_steps": 100, "logs": {"loss": 9.0}}) + "\n"
    lines = [
        {"event": "train_begin", "step": 0, "max_steps": 20},
        {"event": "log", "step": 1, "max_steps": 20, "logs": {"loss": 2.5, "learning_rate": 0.001}},
        {"event": "log", "step": 2, "max_steps": 20, "logs": {"loss": 2.0}},
        {"event": "log", "step": 2, "max_steps": 20, "logs": {"eval_loss": 2.2}},
        {"event": "stop_requested", "step": 3, "max_steps": 20, "signal": "SIGINT"},
        {"event": "save", "step": 3, "max_steps": 20, "checkpoint": "out/checkpoint-3"},
    ]
    text = earlier + "".join(json.dumps(line) + "\n" for line in lines) + '{"event": "log", "st'
    path.write_text(text, encoding="utf-8")
    progress = read_progress(path, offset=len(earlier.encode("utf-8")))
    assert progress.training_started
    assert progress.losses == [(1, 2.5), (2, 2.0)]
    assert progress.eval_losses == [(2, 2.2)]
    assert progress.checkpoints == ["out/checkpoint-3"]
    assert progress.stop_requested
    assert not progress.training_ended
    assert (progress.step, progress.max_steps) == (3, 20)


def test_progress_of_missing_file(tmp_path):
    progress = read_progress(tmp_path / "progress.jsonl")
    assert progress.losses == []
    assert not progress.training_started


def test_auth_parsing():
    assert parse_auth("alice:pa:ss") == ("alice", "pa:ss")
    assert parse_auth(None) is None
    for bad in ["alice", ":secret", "alice:"]:
        with pytest.raises(ConfigError, match="--auth"):
            parse_auth(bad)


def test_form_takes_preset_values(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: {max_length: 512, thinking: none}\nlora: {r: 32}\ntrain: {num_train_epochs: 10, learning_rate: 0.003}\n",
                      encoding="utf-8")
    assert preset_form_values(str(preset)) == [10, 0.003, 32, 512, "none", -1]  # max_steps: vlmtune's default
    demo = preset_form_values(str(REPO_ROOT / "configs" / "demo.yaml"))
    demo_tree = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    assert demo[0] == demo_tree["train"]["num_train_epochs"]
    assert demo[2] == demo_tree["lora"]["r"]
    with pytest.raises(ConfigError, match="preset not found"):
        preset_form_values(str(tmp_path / "none.yaml"))


def test_preview_marks_supervised_tokens(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    config = build_run_config(make_form(preset, tiny_model_dir, tmp_path / "run"))
    previews = preview_samples(config, count=2)
    assert len(previews) == 2
    for preview in previews:
        assert preview.check.ok, preview.check.problems
        kinds = {kind for _, kind in preview.segments}
        assert kinds == {"supervised", "masked"}
        supervised_text = "".join(piece for piece, kind in preview.segments if kind == "supervised")
        assert supervised_text.endswith("<|user|>"), "the supervised part ends with the stop token"
        assert SYSTEM_PROMPT in "".join(piece for piece, kind in preview.segments if kind == "masked")


def test_preview_shows_image_runs(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    image = REPO_ROOT / "data" / "images" / "orange_cat.png"
    rows = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "这是什么？"}]},
        {"role": "assistant", "content": "一只橘猫喵~"},
    ]}]
    dataset = write_json(tmp_path / "images.json", rows)
    config = build_run_config(make_form(preset, tiny_model_dir, tmp_path / "run", dataset=dataset, max_length=2048))
    (preview,) = preview_samples(config, count=1)
    images = [piece for piece, kind in preview.segments if kind == "image"]
    assert len(images) == 1
    assert "×" in images[0]


@pytest.mark.slow
def test_job_stops_and_resumes(tiny_model_dir, tmp_path, caplog):
    """A real `vlmtune train` subprocess: stopped mid-run, it leaves a checkpoint, the adapter and configs. Resume continues it."""
    import time

    caplog.set_level(logging.INFO, logger="vlmtune")

    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    form = make_form(preset, tiny_model_dir, tmp_path / "run", max_steps=2000, learning_rate=1e-3)
    config = build_run_config(form)
    config_path = write_run_config(config)
    command = train_command(config_path)
    jobs = JobManager()
    tab = TrainTab(jobs, str(tiny_model_dir), str(tmp_path), str(tmp_path / "presets"), i18n=str)
    job = jobs.start(command, shell_command(command), config.train.output_dir)
    try:
        deadline = time.time() + 180
        while len(job.progress().losses) < 2 and job.return_code is None and time.time() < deadline:
            time.sleep(0.5)
        assert len(job.progress().losses) >= 2, job.log_tail()
        with pytest.raises(ConfigError, match="already active"):
            jobs.start(command, shell_command(command), config.train.output_dir)
        jobs.stop()
        assert job.wait(timeout=120) == 128 + signal.SIGINT, job.log_tail()  # the status of a SIGINT stop
    finally:
        jobs.shutdown(timeout=30)
    output = Path(config.train.output_dir)
    progress = job.progress()
    assert job.state == "stopped"
    assert progress.stop_requested
    assert progress.training_ended
    assert progress.step < 2000
    assert progress.checkpoints == [str(output / f"checkpoint-{progress.step}")]
    assert (output / f"checkpoint-{progress.step}" / "adapter_model.safetensors").is_file()
    assert (output / "adapter_config.json").is_file()
    assert (output / "config.yaml").is_file()
    assert (output / CONFIG_FILE_NAME).is_file()
    assert "SIGINT received" in job.log_tail()
    assert find_adapters(output)[0] == str(output)

    # Start rejects the folder, and Resume continues from the checkpoint to the new last step.
    stopped_at = progress.step
    status, _ = tab.start_run(*form_values(form), False)
    assert "Click Resume" in status
    resumed_form = form_values(dataclasses.replace(form, max_steps=stopped_at + 2))
    status, typed_command = tab.resume_run(*resumed_form)
    assert status.startswith("Resumed"), status
    assert tab.restore_form() == resumed_form  # what a page opened now shows
    assert typed_command == f"vlmtune train {output / CONFIG_FILE_NAME} --resume"
    resumed = jobs.job
    try:
        assert resumed.wait(timeout=180) == 0, resumed.log_tail()
    finally:
        jobs.shutdown(timeout=30)
    assert resumed.state == "finished"
    assert resumed.progress().step == stopped_at + 2
    assert resumed.progress().losses[: len(progress.losses)] == progress.losses  # the chart keeps the first session
    assert not resumed.progress().stop_requested  # that flag was the first session's
    # The server log records how each run ended, from a thread that waits for the process.
    deadline = time.time() + 10
    while f"training run {resumed.process.pid} finished" not in caplog.text and time.time() < deadline:
        time.sleep(0.1)
    assert f"training run {job.process.pid} stopped (exit status {128 + signal.SIGINT})" in caplog.text
    assert f"training run {resumed.process.pid} finished (exit status 0)" in caplog.text
    assert (output / f"checkpoint-{stopped_at + 2}").is_dir()
    assert "train.max_steps" in resumed.log_tail()  # the changed setting is listed


def test_resume_without_checkpoint_explained(tiny_model_dir, tmp_path):
    preset = write_preset(tmp_path / "presets", tiny_model_dir)
    form = make_form(preset, tiny_model_dir, tmp_path / "empty-run")
    jobs = JobManager()
    tab = TrainTab(jobs, str(tiny_model_dir), str(tmp_path), str(tmp_path / "presets"), i18n=str)
    status, typed_command = tab.resume_run(*form_values(form))
    assert "contains no checkpoint to resume from" in status
    assert str(tmp_path / "empty-run") in status
    assert typed_command == ""
    assert jobs.job is None


@pytest.fixture(scope="module")
def backend(tiny_model_dir, trained_adapter) -> ChatBackend:
    backend = ChatBackend(str(tiny_model_dir), hub="local", device="cpu")
    backend.use_adapter(str(trained_adapter))
    return backend


def test_web_chat_merged_model_system_prompt(tiny_model_dir, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    (merged / MERGED_CONFIG_NAME).write_text("data:\n  system_prompt: 你是小橘。\n  thinking: none\n", encoding="utf-8")
    backend = ChatBackend(str(merged), hub="local", device="cpu")
    assert backend.trained_system_prompt() == "你是小橘。"
    assert backend.generator(GenerationSettings()).layout == "none"


def test_web_chat_without_system_prompt(tiny_model_dir, tmp_path, monkeypatch):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    (merged / MERGED_CONFIG_NAME).write_text("data:\n  system_prompt: 你是小橘。\n", encoding="utf-8")
    backend = ChatBackend(str(merged), hub="local", device="cpu")
    tab = ChatTab(backend, outputs_dir=None, adapter=None, max_new_tokens=2, i18n=str)
    prompts = []
    real_prepare_inputs = Generator.prepare_inputs

    def recording_prepare_inputs(generator, conversation):
        first = conversation.messages[0]
        prompts.append(first.text if first.role == "system" else None)
        return real_prepare_inputs(generator, conversation)

    # The system message of the conversation that the model encodes.
    monkeypatch.setattr(Generator, "prepare_inputs", recording_prepare_inputs)
    # Settings in the order of the page's inputs: adapter, compare, system, no_system, temperature, top_p, max_new_tokens.
    cases = [("", False, "你是小橘。"), ("你是沐雪。", False, "你是沐雪。"), ("", True, None), ("你是沐雪。", True, None)]
    for system, no_system, expected in cases:
        prompts.clear()
        views = list(tab.send({"text": "你好"}, [], "", False, system, no_system, 0.0, 0.9, 2))
        main_chat, _, turns, error = views[-1][:4]
        assert error == "", (system, no_system)
        assert turns[-1].replies[ADAPTER_SIDE].done, (system, no_system)
        assert main_chat[-1]["role"] == "assistant", (system, no_system)
        assert prompts == [expected], (system, no_system)


@pytest.mark.slow
def test_adapter_reply_streams_and_stops(backend, trained_adapter):
    turns = [Turn(text="第3个问题")]
    updates = [reply.answer for reply in backend.stream_turn(turns, ADAPTER_SIDE, GenerationSettings(max_new_tokens=40), None)]
    final = turns[0].replies[ADAPTER_SIDE]
    assert final.done
    assert final.stopped
    assert final.answer == "好的喵~"
    assert updates[-1] == "好的喵~"
    assert len(updates) >= 2, "the reply arrives in several pieces"


@pytest.mark.slow
def test_base_side_differs_and_is_cut(backend):
    turns = [Turn(text="第3个问题")]
    list(backend.stream_turn(turns, ADAPTER_SIDE, GenerationSettings(max_new_tokens=40), None))
    list(backend.stream_turn(turns, BASE_SIDE, GenerationSettings(max_new_tokens=8), None))
    adapter_reply, base_reply = turns[0].replies[ADAPTER_SIDE], turns[0].replies[BASE_SIDE]
    assert adapter_reply.stopped
    assert not base_reply.stopped, "the untrained base runs to the token limit"
    rendered = chat_messages(turns, BASE_SIDE)
    assert any("reply cut off" in str(message["content"]) for message in rendered)
    assert backend.adapter is not None, "the base side leaves the adapter selected"


@pytest.mark.slow
def test_history_per_side(backend):
    turns = [Turn(text="第1个问题")]
    list(backend.stream_turn(turns, ADAPTER_SIDE, GenerationSettings(max_new_tokens=40), None))
    turns.append(Turn(text="第2个问题"))
    history = side_history(turns, ADAPTER_SIDE)
    assert [message.role for message in history] == ["user", "assistant", "user"]
    assert history[1].text == "好的喵~"
    assert [message.role for message in side_history(turns, BASE_SIDE)] == ["user", "user"]


@pytest.mark.slow
def test_switch_to_second_adapter(backend, trained_adapter, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_adapter, copy)
    backend.use_adapter(str(copy))
    try:
        turns = [Turn(text="第3个问题")]
        list(backend.stream_turn(turns, ADAPTER_SIDE, GenerationSettings(max_new_tokens=40), None))
        assert turns[0].replies[ADAPTER_SIDE].answer == "好的喵~"
        assert backend.adapter == str(copy)
    finally:
        backend.use_adapter(str(trained_adapter))


def test_reply_renders_thinking_collapsed():
    reply = SideReply(answer="好的喵~", reasoning="先想一想", stopped=True, done=True, max_new_tokens=64)
    answer, thought = reply_messages(reply)
    assert answer == {"role": "assistant", "content": "好的喵~"}
    assert thought["content"] == "先想一想"
    assert thought["metadata"]["status"] == "done", "a done thought starts collapsed"


def test_cut_reply_marked():
    reply = SideReply(answer="喵喵喵", stopped=False, done=True, max_new_tokens=8)
    (answer,) = reply_messages(reply)
    assert answer["content"].startswith("喵喵喵")
    assert "reply cut off: it reached max_new_tokens=8" in answer["content"]
    streaming = SideReply(answer="喵", stopped=False, done=False, max_new_tokens=8)
    assert reply_messages(streaming) == [{"role": "assistant", "content": "喵"}], "no mark while it streams"


def test_empty_reply_explained():
    (answer,) = reply_messages(SideReply(answer=" \n", stopped=True, done=True))
    assert answer["content"] == "*(the reply is empty)*"
    assert reply_messages(SideReply(answer="", done=False)) == [{"role": "assistant", "content": ""}], "no mark while it streams"


def test_reasoning_only_reply_explained():
    reply = SideReply(answer="", reasoning="想了很久", stopped=True, done=True)
    answer, thought = reply_messages(reply)
    assert "reasoning only" in answer["content"]
    assert thought["content"] == "想了很久"


def test_images_shown_before_text():
    turns = [Turn(text="这是什么？", images=["a.png", "b.png"])]
    assert chat_messages(turns, ADAPTER_SIDE) == [
        {"role": "user", "content": {"path": "a.png"}},
        {"role": "user", "content": {"path": "b.png"}},
        {"role": "user", "content": "这是什么？"},
    ]


def test_cli_rejects_bad_auth(tiny_model_dir):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "vlmtune.cli.main", "webui", "--model", str(tiny_model_dir), "--auth", "alice"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--auth: expected USER:PASSWORD" in result.stderr


def test_upload_kept_next_to_runs(tmp_path):
    from vlmtune.webui.train_tab import TrainTab

    (tmp_path / "cache").mkdir()
    uploaded = write_json(tmp_path / "cache" / "mine.json", [{"instruction": "你好", "input": "", "output": "喵"}])
    tab = TrainTab(JobManager(), None, str(tmp_path / "outputs"), "configs", i18n=lambda key: key)
    kept = Path(tab.keep_upload(str(uploaded)))
    assert kept == tmp_path / "outputs" / "uploads" / "mine.json"
    assert kept.read_text(encoding="utf-8") == uploaded.read_text(encoding="utf-8")
    assert tab.keep_upload(None) == ""


def test_stop_button_stops_own_reply(tiny_model_dir):
    backend = ChatBackend(str(tiny_model_dir), hub="local", device="cpu")
    tab = ChatTab(backend, outputs_dir=None, adapter=None, max_new_tokens=3000, i18n=str)
    page, other_page = gr.Request(session_hash="page"), gr.Request(session_hash="other-page")
    # The base model's random weights rarely stop, so the reply runs until it is stopped.
    views = tab.send({"text": "讲个故事"}, [], "", False, "", True, 0.0, 0.9, 3000, page)
    for _ in range(3):
        next(views)
    tab.stop_reply(other_page)  # a Stop button in another page leaves this reply alone
    assert "page" in tab.running
    tab.stop_reply(page)
    main_chat, _, turns, error = list(views)[-1][:4]
    reply = turns[-1].replies[ADAPTER_SIDE]
    assert error == ""
    assert reply.done
    assert reply.interrupted
    assert len(reply.answer + reply.reasoning) < 1000, "the reply went on after the Stop button"
    assert main_chat[-1]["content"].endswith("*[reply stopped with the Stop button]*")
    assert "reply cut off" not in main_chat[-1]["content"]
    assert tab.running == {}, "a finished reply leaves no stop event behind"
