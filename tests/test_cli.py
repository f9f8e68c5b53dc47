"""The `vlmtune` command as a user runs it: real subprocesses, tiny model, no network."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_json
from vlmtune.inference.cli_chat import system_prompt_for
from vlmtune.inference.export import MERGED_CONFIG_NAME

VLMTUNE = str(Path(sys.executable).parent / "vlmtune")


def run(*args: str, stdin: str | None = None, cwd: Path | None = None, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path} if path is not None else None
    return subprocess.run(
        [VLMTUNE, *args], input=stdin, capture_output=True, text=True, timeout=300, cwd=cwd, check=False, env=env
    )


@pytest.fixture(scope="module")
def config_file(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    write_json(
        folder / "train.json",
        [
            {"instruction": "你是谁？", "input": "", "output": "我是小橘喵~", "history": [["你好", "你好喵~"]]},
            {"instruction": "1+1=?", "input": "", "output": "2喵"},
        ],
    )
    config = folder / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_model_dir}, hub: local, device: cpu}}\n"
        "data: {train: [train.json], system_prompt: 你是小橘。, max_length: 256}\n"
        f"train: {{output_dir: {folder / 'out'}, max_steps: 2, per_device_train_batch_size: 2, save_steps: 1}}\n"
        "tracking: {backend: none}\nevaluation: {max_new_tokens: 8, num_data_prompts: 1}\n",
        encoding="utf-8",
    )
    return config


def test_tiny_model_command(tmp_path):
    result = run("tiny-model", str(tmp_path / "m"), "--seed", "3")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "processor_config.json", "chat_template.jinja"):
        assert (tmp_path / "m" / name).is_file(), name


def test_tiny_model_rejects_foreign_folder(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    (adapter / "tokenizer.json").write_text("trained tokenizer", encoding="utf-8")
    (adapter / "checkpoint-2").mkdir()
    result = run("tiny-model", str(adapter))
    assert result.returncode == 2, result.stderr
    assert "adapter_config.json, checkpoint-2/" in result.stderr
    assert "choose a new or empty folder" in result.stderr
    assert (adapter / "tokenizer.json").read_text(encoding="utf-8") == "trained tokenizer"
    assert not (adapter / "model.safetensors").exists()


def test_tiny_model_keeps_saved_model(tiny_model_dir, tmp_path):
    """A save_pretrained folder has the same file names as a tiny checkpoint, so its chat template distinguishes them."""
    saved = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, saved)
    (saved / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    weights = (saved / "model.safetensors").read_bytes()
    result = run("tiny-model", str(saved), "--architecture", "qwen2.5")
    assert result.returncode == 2, result.stderr
    assert "chat template is not one of vlmtune's tiny templates" in result.stderr
    assert (saved / "model.safetensors").read_bytes() == weights


def test_tiny_model_rebuild_without_corpus(tmp_path):
    # Outside the repository root the default corpus is missing, which the command warns about.
    first = run("tiny-model", "m", "--architecture", "glm4v", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "WARNING" in first.stderr
    assert "data/persona_zh/train.json not found" in first.stderr
    assert "Pass --corpus FILE" in first.stderr
    assert (tmp_path / "m" / "processor_config.json").is_file()
    # Rebuilding into the same folder works, and the text-only build leaves no processor file behind.
    again = run("tiny-model", "m", "--architecture", "qwen2.5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "m" / "processor_config.json").exists()
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_inspect_shows_self_check(config_file):
    result = run("inspect", str(config_file), "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("self-check ok") == 2
    assert "<answer>我是小橘喵~</answer><|user|>" in result.stdout
    # Piped output has no colour, so brackets mark the supervised tokens, the stop token among them.
    assert "supervised tokens are shown between ⟦ and ⟧" in result.stdout
    assert "</answer><|user|>⟧" in result.stdout
    assert "⟦你好" not in result.stdout  # the prompt is not supervised
    assert "showing all" not in result.stdout


def test_inspect_finds_a_record_and_says_when_fewer(config_file):
    found = run("inspect", str(config_file), "--find", "1+1")
    assert found.returncode == 0, found.stderr
    assert found.stdout.count("self-check ok") == 1
    assert "2喵</answer>" in found.stdout
    assert "showing all 1 sample(s): there are fewer than --count 3" in found.stdout
    by_record = run("inspect", str(config_file), "--find", "record 1 ", "--count", "5")
    assert by_record.stdout.count("self-check ok") == 1
    assert "我是小橘喵~" in by_record.stdout
    missing = run("inspect", str(config_file), "--find", "不存在的字")
    assert missing.returncode == 2
    assert "--find '不存在的字': no training sample's source or text contains it" in missing.stderr


def test_train_then_chat_with_adapter(config_file):
    result = run("train", str(config_file), path=f"{Path(VLMTUNE).parent}{os.pathsep}{os.defpath}")
    assert result.returncode == 0, result.stderr
    output_dir = config_file.parent / "out"
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert f"chat with it: vlmtune chat --adapter {output_dir}" in result.stdout  # found on PATH, so typed by name
    # Piped output: metrics as log lines, no progress bars or printed dicts.
    assert "step 2/2: train_runtime" in result.stderr
    assert "{'train_runtime'" not in result.stdout + result.stderr
    assert "it/s]" not in result.stderr  # no progress bars (text=True turns their \r into line breaks)

    chat = run("chat", "--adapter", str(output_dir), "--message", "你好", "--max-new-tokens", "4")
    assert chat.returncode == 0, chat.stderr
    assert "using the system prompt of the training run" in chat.stderr
    assert "reply cut off: it reached max_new_tokens=4" in chat.stdout
    # chat, predict and serve share this choice of system prompt.
    assert system_prompt_for(None, str(output_dir)) == "你是小橘。"
    assert system_prompt_for("你是沐雪。", str(output_dir)) == "你是沐雪。"
    assert system_prompt_for("", str(output_dir)) is None


def test_chat_with_merged_model_uses_system_prompt(tiny_model_dir, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    (merged / MERGED_CONFIG_NAME).write_text("data:\n  system_prompt: 你是小橘。\n", encoding="utf-8")
    chat = run("chat", "--model", str(merged), "--message", "你好", "--max-new-tokens", "2")
    assert chat.returncode == 0, chat.stderr
    assert "using the system prompt of the training run" in chat.stderr


def test_checkpoint_uses_run_system_prompt(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-20"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("data:\n  system_prompt: 你是小橘。\n", encoding="utf-8")
    assert system_prompt_for(None, str(checkpoint)) == "你是小橘。"
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert system_prompt_for(None, str(other)) is None  # only checkpoint-N folders look one level up


def test_eval_checks_its_folders_before_loading(config_file, tmp_path):
    missing_adapter = run("eval", str(config_file), "--adapter", str(tmp_path / "nope"))
    assert missing_adapter.returncode == 2
    assert f"--adapter: folder not found: {tmp_path / 'nope'}" in missing_adapter.stderr
    assert "loaded" not in missing_adapter.stderr
    assert "read " not in missing_adapter.stderr
    missing_merged = run("eval", str(config_file), "--merged", str(tmp_path / "gone"))
    assert f"--merged: folder not found: {tmp_path / 'gone'}" in missing_merged.stderr


def test_eval_invalid_prompt_names_skip(config_file, tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "prompts.json", [{"instruction": "你好"}, {"instruction": 5}])
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    result = run("eval", str(config_file), "--merged", str(merged), "--data", str(data))
    assert result.returncode == 2
    assert "field 'instruction' must be a string, got int 5 (add data.on_invalid=skip to the command" in result.stderr
    assert "loaded" not in result.stderr  # the data fails before the model loads


def test_eval_merged_report_beside_run(config_file, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_config = f"train:\n  output_dir: {run_dir}\n"
    (run_dir / "config.yaml").write_text(run_config, encoding="utf-8")
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    (merged / MERGED_CONFIG_NAME).write_text(run_config, encoding="utf-8")

    result = run("eval", str(config_file), "--merged", str(merged), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report_dir = run_dir / "eval_merged" / "merged"
    assert (report_dir / "eval_report.json").is_file()
    assert (report_dir / "eval_report.md").is_file()
    assert f"report written to {report_dir / 'eval_report.json'}" in result.stdout.replace("\n", "")
    assert not (merged / "eval").exists()
    assert sorted(path.name for path in merged.iterdir()) == sorted([*(p.name for p in tiny_model_dir.iterdir()), MERGED_CONFIG_NAME])

    # Once the run's folder contains another run, the report goes under the working folder.
    (run_dir / "config.yaml").write_text(run_config + "lora: {r: 4}\n", encoding="utf-8")
    result = run("eval", str(config_file), "--merged", str(merged), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval_merged" / "merged" / "eval_report.json").is_file()
    assert "contains another run now" in result.stderr

    chosen = tmp_path / "chosen"
    result = run("eval", str(config_file), "--merged", str(merged), "--output", str(chosen), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (chosen / "eval_report.json").is_file()


def test_cli_hides_kernel_lookup_warning(tiny_model_dir):
    # bitsandbytes 0.50.2 logs this at import on CPUs with AVX512-BF16 when its optional kernel is not cached.
    chat = run("chat", "--model", str(tiny_model_dir), "--message", "你好", "--max-new-tokens", "2")
    assert chat.returncode == 0, chat.stderr
    assert "gemm_4bit_forward" not in chat.stderr
    assert "publisher trust check" not in chat.stderr


def test_chat_model_error_names_the_option(tmp_path):
    chat = run("chat", "--model", str(tmp_path / "missing"), "--message", "你好")
    assert chat.returncode != 0
    assert f"--model: local folder not found: {tmp_path / 'missing'}" in chat.stderr
    assert "model.name_or_path" not in chat.stderr
    assert "--hub" in chat.stderr


def test_kernel_lookup_filter_keeps_other_warnings():
    script = (
        "import logging\n"
        "from vlmtune.cli.main import _setup_logging\n"
        "_setup_logging(verbose=False, quiet=False)\n"
        "ops = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "ops.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s', 'not cached')\n"
        "ops.warning('bitsandbytes warning that stays')\n"
        "hub = logging.getLogger('kernels._internals.hf_hub')\n"
        "hub.warning(\"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because offline\")\n"
        "hub.warning(\"Skipping publisher trust check for 'someone/other-kernel' because offline\")\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr
    assert "quantization-bitsandbytes" not in result.stderr
    assert "bitsandbytes warning that stays" in result.stderr
    assert "someone/other-kernel" in result.stderr


def test_int8_cast_warning_logged_once():
    # bitsandbytes 0.50.2 logs this on every 8-bit layer call whose input is not float16.
    script = (
        "import logging\n"
        "from vlmtune.cli.main import _setup_logging\n"
        "_setup_logging(verbose=False, quiet=False)\n"
        "matmul = logging.getLogger('bitsandbytes.autograd._functions')\n"
        "for _ in range(5):\n"
        "    matmul.warning('MatMul8bitLt: inputs will be cast from %s to float16 during quantization', 'torch.float32')\n"
        "matmul.warning('MatMul8bitLt: inputs will be cast from %s to float16 during quantization', 'torch.bfloat16')\n"
        "matmul.warning('another bitsandbytes warning')\n"
        "matmul.warning('another bitsandbytes warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("inputs will be cast from torch.float32 to float16") == 1
    assert result.stderr.count("inputs will be cast from torch.bfloat16 to float16") == 1
    assert "(logged once; later copies are hidden)" in result.stderr
    assert result.stderr.count("another bitsandbytes warning") == 2


def test_image_option_goes_with_first_message(tiny_model_dir):
    image = Path(__file__).resolve().parents[1] / "data" / "images" / "orange_cat.png"
    result = run("-v", "chat", "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--image", str(image),
                 stdin="这只猫怎么样？\n还有呢？\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "1 image(s) attached to your next message" in result.stdout
    assert "sending a message with 1 image(s) after 0 earlier message(s)" in result.stderr
    assert "sending a message with 0 image(s) after 2 earlier message(s)" in result.stderr


def test_interactive_chat_with_image(tiny_model_dir):
    image = Path(__file__).resolve().parents[1] / "data" / "images" / "orange_cat.png"
    script = f"/image {image}\n这只猫怎么样？\n/clear\n/unknown\n/exit\n"
    result = run("chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "1 image(s) attached to your next message" in result.stdout
    assert "history cleared" in result.stdout
    assert "unknown command '/unknown'" in result.stdout
    assert result.stdout.count("reply cut off") == 1


def test_ctrl_c_stops_reply_not_chat(tiny_model_dir):
    """Ctrl-C during a reply stops it, and the chat goes on with the partial reply in its history."""
    import threading

    # The base model's random weights rarely stop, so each reply runs until it is interrupted.
    process = subprocess.Popen([VLMTUNE, "-v", "chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3000"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: list[str] = []
    logged: list[str] = []
    for target in (lambda: printed.extend(iter(lambda: process.stdout.read(1), "")),
                   lambda: logged.extend(iter(process.stderr.readline, ""))):
        threading.Thread(target=target, daemon=True).start()

    def wait_for(condition, step: str) -> None:
        # Generous, because loading the model takes minutes on a loaded machine.
        deadline = time.monotonic() + 300
        while not condition():
            assert process.poll() is None, f"chat exited while waiting for {step}: {''.join(logged)[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {step}: {''.join(logged)[-3000:]}"
            time.sleep(0.05)

    def reply_started(number: int) -> bool:
        replies = "".join(printed).split("model> ")[1:]
        return len(replies) >= number and len(replies[number - 1]) >= 5

    process.stdin.write("讲个故事\n")
    process.stdin.flush()
    wait_for(lambda: reply_started(1), "five characters of the first reply")
    process.send_signal(signal.SIGINT)
    process.stdin.write("还有呢？\n")
    process.stdin.flush()
    # The stopped reply stays in the history.
    wait_for(lambda: "sending a message with 0 image(s) after 2 earlier message(s)" in "".join(logged), "the second message")
    wait_for(lambda: reply_started(2), "five characters of the second reply")
    process.send_signal(signal.SIGINT)
    process.stdin.close()  # then the chat quits at the prompt
    assert process.wait(timeout=120) == 0, "".join(logged)[-3000:]
    assert "".join(printed).count("[reply stopped with Ctrl-C") == 2
    assert "KeyboardInterrupt" not in "".join(logged)


def test_train_on_adapter_folder_explained(config_file, trained_adapter, tmp_path):
    result = run("train", str(config_file), f"model.name_or_path={trained_adapter}", f"train.output_dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"model.name_or_path: {trained_adapter} is a LoRA adapter folder" in result.stderr
    assert f"to train on from it, set lora.init_from={trained_adapter} in the training config" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_interactive_commands_without_argument(tiny_model_dir):
    script = "/image\n/image 'unclosed\n/system\n/system 你是小橘。\n/system\n/system ''\n/system\n/exit\n"
    result = run("chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "usage: /image PATH_OR_URL" in result.stdout
    assert "cannot read the image path" in result.stdout
    assert "image(s) attached" not in result.stdout
    assert result.stdout.count("system prompt: none.") == 2
    assert "system prompt: '你是小橘。'." in result.stdout
    assert "system prompt set; history cleared" in result.stdout
    assert "system prompt removed; history cleared" in result.stdout


def test_version_option():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"vlmtune {importlib.metadata.version('vlmtune')}"


def test_predict_missing_adapter_named_first(tmp_path):
    """A mistyped --adapter with an existing --output file is reported as the missing folder, not as a resume mismatch."""
    data = write_json(tmp_path / "test.json", [{"instruction": "你好", "output": "喵"}])
    output = tmp_path / "p.jsonl"
    row = {"id": "test.json, record 1 (line 2)", "model": "some-model", "adapter": "some-adapter", "reply": "喵"}
    output.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    result = run("predict", "--adapter", str(tmp_path / "nope"), "--data", str(data), "--output", str(output))
    assert result.returncode == 2
    assert f"--adapter: folder not found: {tmp_path / 'nope'}" in result.stderr
    assert "generated by model" not in result.stderr


def test_chat_argument_errors_before_loading(tiny_model_dir, tmp_path):
    missing_adapter = run("chat", "--adapter", str(tmp_path / "nope"), "--message", "hi")
    assert missing_adapter.returncode == 2
    assert f"--adapter: folder not found: {tmp_path / 'nope'}" in missing_adapter.stderr
    missing_image = run("chat", "--model", str(tiny_model_dir), "--image", "nosuch.png", "--message", "hi")
    assert missing_image.returncode == 2
    assert "image not found: nosuch.png" in missing_image.stderr
    assert "loaded" not in missing_image.stderr
    (tmp_path / "fake.png").write_text("not a picture", encoding="utf-8")
    fake_image = run("chat", "--model", str(tiny_model_dir), "--image", str(tmp_path / "fake.png"), "--message", "hi")
    assert fake_image.returncode == 2
    assert "not a recognised image format" in fake_image.stderr
    assert "loaded" not in fake_image.stderr
    folder_image = run("chat", "--model", str(tiny_model_dir), "--image", str(tmp_path), "--message", "hi")
    assert folder_image.returncode == 2
    assert f"image path {tmp_path} is a folder; name an image file in it" in " ".join(folder_image.stderr.split())
    not_an_adapter = run("chat", "--adapter", str(tmp_path), "--message", "hi")
    assert f"--adapter: no adapter_config.json in {tmp_path}" in not_an_adapter.stderr
    interactive = run("chat", "--model", str(tiny_model_dir), stdin="/image nosuch.png\n/exit\n")
    assert "error: image not found: nosuch.png" in interactive.stdout
    assert "attached" not in interactive.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["chat", "--top-p", "0", "--sample"], "--top-p: Input should be greater than 0"),
        (["chat", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
        (["chat", "--thinking", "bogus"], "'bogus' is not one of 'auto', 'think_answer', 'think', 'none'"),
        (["chat", "--hub", "hf"], "'hf' is not one of 'auto', 'local', 'modelscope', 'huggingface'"),
        (["chat", "--device", "cuda:99"], "device 'cuda:99':"),
        (["chat", "--device", "gpu"], "device 'gpu' is invalid: use auto, cpu, cuda or cuda:N"),
        (["predict", "--batch-size", "0", "--data", "x.json", "--output", "p.jsonl"], "Invalid value for '--batch-size'"),
        (["serve", "--port", "99999"], "Invalid value for '--port'"),
    ],
)
def test_option_errors_before_loading(tiny_model_dir, arguments, message):
    result = run(*arguments, "--model", str(tiny_model_dir), *(["--message", "hi"] if arguments[0] == "chat" else []))
    output = " ".join(result.stderr.replace("│", " ").split())  # rich boxes and wraps usage errors
    assert result.returncode in (1, 2), output
    assert message in output
    assert "Traceback" not in result.stderr
    assert "loaded" not in result.stderr


@pytest.mark.parametrize("command", ["serve", "webui"])
def test_busy_port_fails_before_loading(tiny_model_dir, command):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run(command, "--model", str(tiny_model_dir), "--port", str(port), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: the port is already in use; pass another --port" in result.stderr
    assert "loaded" not in result.stderr
    assert "serving" not in result.stdout


@pytest.mark.parametrize("count", ["0", "-1"])
def test_inspect_rejects_count_below_one(config_file, count):
    result = run("inspect", str(config_file), "-n", count)
    output = " ".join(result.stderr.replace("│", " ").split())  # rich boxes and wraps usage errors
    assert result.returncode == 2, output
    assert "Invalid value for '--count' / '-n': Input should be greater than or equal to 1" in output


def test_config_error_is_one_clear_message(config_file):
    result = run("train", str(config_file), "train.learning_rate=-1", "lora.rank=4")
    assert result.returncode == 2
    assert "error: invalid config" in result.stderr
    assert "train.learning_rate" in result.stderr
    assert "lora.rank: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_tutorial_lora_targets_rejected(config_file, tmp_path):
    targets = "lora.target_modules=[q_proj, gate_proj, up_proj]"
    result = run("train", str(config_file), targets, f"train.output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert "'gate_proj' matches" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_error_before_torch_loads(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: {name_or_path: x}\ndata: {train: [a.json]}\ntrain: {padding_free: maybe}\n", encoding="utf-8")
    code = (
        "import sys\nfrom vlmtune.cli.main import main\nsys.argv = ['vlmtune', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch loaded:', 'torch' in sys.modules)"
    )
    for command in (["train", str(config)], ["inspect", str(config)], ["eval", str(config), "--adapter", "x"],
                    ["data", "stats", str(config)]):
        result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120)
        assert "train.padding_free (line 3): must be true or false, or auto" in result.stderr, command
        assert "torch loaded: False" in result.stdout, command

    write_json(tmp_path / "a.json", [{"instruction": "你好"}])
    config.write_text("model: {name_or_path: x}\ndata: {train: [a.json]}\n", encoding="utf-8")
    for command in (["train", str(config)], ["inspect", str(config)], ["data", "stats", str(config)]):
        result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120)
        assert "a.json, record 1 (line 2): field 'output' is missing" in result.stderr, command
        assert "torch loaded: False" in result.stdout, command


def test_resume_without_checkpoint(tmp_path, config_file):
    result = run("train", str(config_file), f"train.output_dir={tmp_path / 'fresh'}", "--resume")
    assert result.returncode == 2
    assert "--resume: no checkpoint-N folder" in result.stderr


@pytest.mark.slow
def test_sigint_stop_prints_resume_hint(config_file, tmp_path):
    output_dir = tmp_path / "stopped"
    # SwanLab installs its own SIGINT handler when its run starts, and every step generates samples that it
    # logs: the stop lands on a generation step, and the run must not be finished under the callbacks.
    command = [VLMTUNE, "train", str(config_file), f"train.output_dir={output_dir}", "train.max_steps=500",
               "train.save_steps=1000", "train.eval_steps=1", "tracking.backend=swanlab",
               "tracking.swanlab_mode=offline"]
    # With .venv/bin off PATH, the printed commands name vlmtune by the path it was started with.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PATH": os.defpath})
    progress = output_dir / "progress.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and '"event": "log"' in progress.read_text(encoding="utf-8"):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]  # the shell's status for a SIGINT stop
    assert "SIGINT received: stopping after the current step and saving a checkpoint" in stderr
    assert "training stopped by SIGINT at step" in stdout
    overrides = " ".join(command[3:])
    assert f"continue it with: {VLMTUNE} train {config_file} {overrides} --resume" in stdout
    assert f"chat with it: {VLMTUNE} chat --adapter {output_dir}" in stdout
    assert list(output_dir.glob("checkpoint-*"))
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert "requires an active Run" not in stderr
    assert len(list((output_dir / "swanlog").glob("run-*"))) == 1, "the stop opened a second SwanLab run"


@pytest.mark.slow
def test_terminal_ctrl_c_with_dataloader_workers(config_file, tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the dataloader workers ignore it."""
    output_dir = tmp_path / "stopped"
    command = [VLMTUNE, "train", str(config_file), f"train.output_dir={output_dir}", "train.max_steps=500",
               "train.save_steps=1000", "train.dataloader_num_workers=2", "evaluation.generate=false"]
    process = start_offline(command, start_new_session=True)
    wait_for_event(process, output_dir / "progress.jsonl", "log")
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert stderr.count("SIGINT received: stopping after the current step") == 1  # not once more per worker
    assert "exited unexpectedly" not in stderr
    assert "training stopped by SIGINT at step" in stdout
    assert list(output_dir.glob("checkpoint-*"))


@pytest.mark.slow
def test_sigint_stops_sample_generation(config_file, tmp_path):
    output_dir = tmp_path / "stopped"
    # The base model's random weights fill 3000 tokens per sample reply: a sample pass of minutes.
    command = [VLMTUNE, "train", str(config_file), f"train.output_dir={output_dir}", "train.max_steps=50",
               "train.eval_steps=1", "evaluation.max_new_tokens=3000", "evaluation.prompts=[讲个故事, 再讲一个]"]
    process = start_offline(command)
    wait_for_event(process, output_dir / "progress.jsonl", "train_begin")
    time.sleep(1)  # into the base model's sample pass
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "sample generation at step 0 stopped: training is stopping" in stderr
    assert "training stopped by SIGINT at step 1 " in stdout
    # Neither the stopping step nor the end of training generates samples again.
    assert "sample generation at step 1 skipped: training is stopping" in stderr
    assert "stop rate" not in stderr
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert not (output_dir / "samples_base.json").exists(), "a stopped sample pass was kept as the base model's replies"


def start_offline(command: list[str], **options) -> subprocess.Popen:
    """Start a command with HF_HUB_OFFLINE=1 and its output captured as text."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, **options)


def wait_for_event(process: subprocess.Popen, progress: Path, event: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and f'"event": "{event}"' in progress.read_text(encoding="utf-8"):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {event} event in {progress} within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("after_checkpoint", [False, True])
def test_second_sigint_prints_next_command(config_file, tmp_path, after_checkpoint):
    rows = [{"instruction": f"第{i}个问题", "input": "", "output": "好的喵~"} for i in range(400)]
    data = write_json(tmp_path / "many.json", rows)
    output_dir = tmp_path / "interrupted"
    # 200 micro-batches per optimizer step make a step last seconds, so both signals land inside one.
    command = [VLMTUNE, "train", str(config_file), f"train.output_dir={output_dir}", f"data.train=[{data}]",
               "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=200", "train.max_steps=3",
               "train.save_steps=1", "evaluation.generate=false"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PATH": os.defpath})
    wait_for_event(process, output_dir / "progress.jsonl", "save" if after_checkpoint else "train_begin")
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "SIGINT received again: stopping now, without a checkpoint" in stderr
    overrides = shlex.join(command[3:])  # quotes the brackets of data.train=[...]
    if after_checkpoint:
        assert f"continue from its last checkpoint with: {VLMTUNE} train {config_file} {overrides} --resume" in stderr
        assert [path.name for path in output_dir.glob("checkpoint-*")] == ["checkpoint-1"]
    else:
        assert f"no checkpoint was saved, so start it again with: {VLMTUNE} train {config_file} {overrides}\n" in stderr
        assert not list(output_dir.glob("checkpoint-*"))


@pytest.mark.parametrize(
    "answer, reasoning, show_thinking, note",
    [
        ("\n", "", False, "[the reply's answer is empty]"),
        ("", "想了很久", False, "[the reply contains reasoning only; pass --show-thinking to see it]"),
        ("", "想了很久", True, "[the reply's answer is empty]"),
        ("喵", "", False, None),
    ],
)
def test_reply_end_notes(answer, reasoning, show_thinking, note):
    from rich.console import Console

    from vlmtune.inference.cli_chat import print_reply_end
    from vlmtune.inference.generate import Reply

    console = Console(record=True, width=200)
    reply = Reply(text=f"<answer>{answer}", reasoning=reasoning, answer=answer, generated_tokens=3, stopped=True)
    print_reply_end(console, reply, max_new_tokens=64, show_thinking=show_thinking)
    printed = console.export_text()
    if note is None:
        assert printed.strip() == ""
    else:
        assert note in printed


@pytest.mark.slow
def test_sigterm_predict_says_how_to_continue(tiny_model_dir, tmp_path):
    from conftest import PERSONA_DATA

    output = tmp_path / "predictions.jsonl"
    command = [VLMTUNE, "predict", "--model", str(tiny_model_dir), "--data", str(PERSONA_DATA), "--output", str(output),
               "--batch-size", "1", "--max-new-tokens", "16", "--system", ""]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if output.is_file() and output.read_text(encoding="utf-8").count("\n") >= 2:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    finished = output.read_text(encoding="utf-8").count("\n")
    assert f"predict interrupted by SIGTERM: {finished} of 387 examples have a prediction in {output}" in stderr
    assert "run the same command again to predict the others" in stderr
    assert "are already in" not in stderr  # a fresh run that was stopped has nothing from before


def test_used_output_dir_rejected_before_torch_loads(config_file, tmp_path):
    output = tmp_path / "used"
    (output / "checkpoint-2").mkdir(parents=True)
    (output / "adapter_model.safetensors").write_bytes(b"")
    script = (
        "import sys\n"
        "from vlmtune.cli.main import main\n"
        f"sys.argv = ['vlmtune', 'train', {str(config_file)!r}, 'train.output_dir={output}']\n"
        "try:\n    main()\nexcept SystemExit as error:\n    print('exit', error.code)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert f"train.output_dir {output} contains an earlier run" in result.stderr
    assert "exit 2" in result.stdout
    assert "torch imported: False" in result.stdout
