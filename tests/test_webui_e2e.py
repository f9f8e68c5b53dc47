"""The web UI in a real headless Chromium, driven by Selenium, against `vlmtune webui` on the tiny model.

Needs Debian's `chromium` and `chromium-driver` packages and the `selenium` package. Where
they are missing the tests are skipped, except under CI (the CI variable set), where they fail.
Screenshots of each tab go to outputs/webui-screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO_ROOT, write_json

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = REPO_ROOT / "outputs" / "webui-screenshots"
IMAGE = REPO_ROOT / "data" / "images" / "orange_cat.png"
MAX_NEW_TOKENS = 32


def _missing_browser() -> str | None:
    """Return why the browser tests cannot run here, or None when they can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} not found: install Debian's chromium and chromium-driver packages"
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module", autouse=True)
def _require_browser():
    reason = _missing_browser()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run under CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vlmtune webui exited with {process.returncode}:\n{log.read_text(encoding='utf-8')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"vlmtune webui did not answer at {url} within {timeout:.0f} s:\n{log.read_text(encoding='utf-8')[-3000:]}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, trained_adapter) -> dict[str, Path]:
    """An outputs folder with one trained adapter, a quick preset and a small dataset."""
    root = tmp_path_factory.mktemp("webui")
    outputs = root / "outputs"
    shutil.copytree(trained_adapter, outputs / "cat-adapter")
    presets = root / "presets"
    presets.mkdir()
    preset = {
        "model": {"name_or_path": str(tiny_model_dir), "hub": "local", "device": "cpu"},
        "data": {"train": ["unused.json"], "max_length": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 0,
                  "logging_steps": 1, "save_steps": 1000},
        "tracking": {"backend": "none"},
        "evaluation": {"generate": False},
    }
    (presets / "quick.yaml").write_text(json.dumps(preset), encoding="utf-8")
    rows = [{"instruction": f"第{i}个问题", "input": "", "output": "好的喵~"} for i in range(8)]
    dataset = write_json(root / "small.json", rows)
    return {"root": root, "outputs": outputs, "presets": presets, "dataset": dataset, "model": tiny_model_dir}


@pytest.fixture(scope="module")
def server(workspace):
    """`vlmtune webui` on a free port of 127.0.0.1, stopped with SIGINT at the end."""
    port = _free_port()
    log = workspace["root"] / "server.log"
    command = [
        sys.executable, "-m", "vlmtune.cli.main", "webui",
        "--model", str(workspace["model"]), "--hub", "local", "--device", "cpu",
        "--outputs", str(workspace["outputs"]), "--presets", str(workspace["presets"]),
        "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "offline"}
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_http(url, process, log, timeout=180)
        yield url
    finally:
        process.send_signal(subprocess.signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _browser(language: str = "en-US"):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"intl.accept_languages": language})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def page(server):
    driver = _browser()
    driver.get(server)
    yield driver
    driver.quit()


def _wait(condition, timeout: float, message: str, interval: float = 0.1):
    """Poll condition until it returns a true value; an element replaced while read counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(interval)
    pytest.fail(message)


def _find(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def _find_all(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _bot_texts(driver, chatbot: str) -> list[str]:
    """Return the texts of the answer messages; a reasoning block (a thought) is a message of its own after its answer."""
    from selenium.webdriver.common.by import By

    messages = _find_all(driver, f"{chatbot} [data-testid='bot']")
    return [element.text for element in messages if not element.find_elements(By.CSS_SELECTOR, ".thought-group")]


def _send(driver, text: str, images: list[Path] = ()) -> None:
    from selenium.webdriver.common.keys import Keys

    for image in images:
        _find(driver, "#chat-message input[type=file]").send_keys(str(image))
    if images:
        _wait(lambda: _find_all(driver, "#chat-message img"), 20, "the attached image shows no thumbnail")
    box = _find(driver, "#chat-message textarea")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _open_tab(driver, name: str) -> None:
    tabs = _wait(lambda: [tab for tab in _find_all(driver, "button[role=tab]") if tab.text.strip() == name], 30,
                 f"no tab named {name!r}")
    tabs[0].click()


def _screenshot(driver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _clear_chat(driver) -> None:
    # The page may still be loading when a test runs first or alone.
    clear = _wait(lambda: _find_all(driver, "#chat-clear"), 30, "the chat's Clear button never appeared")
    clear[0].click()
    _wait(lambda: not _bot_texts(driver, "#chat-main"), 10, "Clear left messages in the chat")


def test_text_message_streams_reply(page):
    _wait(lambda: _find_all(page, "#chat-message textarea"), 30, "the chat box never appeared")
    # A long reply, so the page is polled many times while it streams.
    _set_max_new_tokens(page, 160)
    _send(page, "你好，你是谁？")
    seen: list[str] = []

    def finished() -> bool:
        texts = _bot_texts(page, "#chat-main")
        if texts and texts[-1] and (not seen or seen[-1] != texts[-1]):
            seen.append(texts[-1])
        return bool(texts) and "reply cut off" in texts[-1]

    _wait(finished, 120, f"no finished reply; texts seen: {seen}", interval=0.05)
    assert len(seen) >= 2, f"the reply arrived in one piece, not streamed: {seen}"
    assert "max_new_tokens=160" in seen[-1]
    _set_max_new_tokens(page, MAX_NEW_TOKENS)
    user_messages = [element.text for element in _find_all(page, "#chat-main [data-testid='user']")]
    assert user_messages == ["你好，你是谁？"], "Chinese text round-trips through the page"
    _screenshot(page, "chat")


def test_image_message_shows_image(page):
    _clear_chat(page)
    _send(page, "你觉得这只猫怎么样？", images=[IMAGE])
    _wait(lambda: len(_bot_texts(page, "#chat-main")) == 1 and "reply cut off" in _bot_texts(page, "#chat-main")[0],
          120, "no reply to the message with an image")
    assert _find_all(page, "#chat-main [data-testid='user'] img"), "the image is shown in the user's turn"
    assert _find(page, "#chat-error").text == ""
    _screenshot(page, "chat-image")


def _set_max_new_tokens(driver, value: int) -> None:
    from selenium.webdriver.common.keys import Keys

    if not _find_all(driver, "#chat-max-new-tokens input[type=number]"):
        _find(driver, "#chat-settings .label-wrap").click()
        _wait(lambda: _find_all(driver, "#chat-max-new-tokens input[type=number]"), 10, "the settings did not open")
    field = _find(driver, "#chat-max-new-tokens input[type=number]")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value))
    field.send_keys(Keys.TAB)


def test_regenerate_and_undo(page):
    _set_max_new_tokens(page, 16)
    _find(page, "#chat-regenerate").click()
    _wait(lambda: [text for text in _bot_texts(page, "#chat-main") if "max_new_tokens=16" in text], 120,
          "regenerate did not answer again with the new token limit")
    assert len(_bot_texts(page, "#chat-main")) == 1, "regenerate replaces the last reply"
    _find(page, "#chat-undo").click()
    _wait(lambda: not _find_all(page, "#chat-main [data-testid='user']"), 10, "undo left the last turn")
    _set_max_new_tokens(page, MAX_NEW_TOKENS)


def test_stop_button_stops_reply(page):
    _clear_chat(page)
    # The base model's random weights answer this prompt with about 2,000 tokens before a stop token.
    _set_max_new_tokens(page, 3000)
    _send(page, "讲个故事")
    _wait(lambda: any(text.strip() for text in _bot_texts(page, "#chat-main")), 60, "the reply never started")
    # A click from script: WebDriver's own click waits until the page has time for it, which may be after the reply.
    page.execute_script("document.querySelector('#chat-stop').click()")
    _wait(lambda: "reply stopped with the Stop button" in (_bot_texts(page, "#chat-main") or [""])[-1], 30,
          "the Stop button did not stop the reply")
    assert "reply cut off" not in _bot_texts(page, "#chat-main")[-1]
    _set_max_new_tokens(page, MAX_NEW_TOKENS)


def test_compare_shows_two_replies(page, workspace):
    adapter = str(workspace["outputs"] / "cat-adapter")
    field = _find(page, "#chat-adapter input")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'});", field)
    field.click()
    field.send_keys(adapter)
    options = _wait(lambda: [item for item in _find_all(page, "#chat-adapter li[role=option]")
                             if item.get_attribute("aria-label") == adapter], 10,
                    f"the adapter list does not offer {adapter}")
    options[0].click()
    _wait(lambda: _find(page, "#chat-adapter input").get_attribute("value") == adapter, 10, "the adapter was not selected")
    _find(page, "#chat-compare input").click()
    _wait(lambda: [chat for chat in _find_all(page, "#chat-base") if chat.is_displayed()], 10, "compare mode shows no base-model column")
    _send(page, "第3个问题")

    def both_replied() -> bool:
        adapter_texts, base_texts = _bot_texts(page, "#chat-main"), _bot_texts(page, "#chat-base")
        return len(adapter_texts) == 1 and len(base_texts) == 1 and "reply cut off" in base_texts[0]

    _wait(both_replied, 180, "compare mode did not show a reply on both sides")
    adapter_reply, base_reply = _bot_texts(page, "#chat-main")[0], _bot_texts(page, "#chat-base")[0]
    assert adapter_reply == "好的喵~", "the adapter learned its one reply and stops by itself"
    assert "reply cut off" not in adapter_reply
    assert base_reply != adapter_reply
    _screenshot(page, "chat-compare")


@pytest.mark.slow
def test_training_run_stops_with_checkpoint(page, workspace):
    from selenium.webdriver.common.keys import Keys

    _open_tab(page, "Train")
    output = workspace["root"] / "runs" / "first"

    def fill(selector: str, text: str) -> None:
        field = _find(page, selector)
        field.clear()
        field.send_keys(text)
        field.send_keys(Keys.TAB)

    fill("#train-dataset textarea", str(workspace["dataset"]))
    fill("#train-output textarea", str(output))
    _find(page, "#train-more .label-wrap").click()
    _wait(lambda: _find_all(page, "#train-max-steps input"), 10, "the 'More' section did not open")
    fill("#train-max-steps input", "400")
    _find(page, "#train-preview").click()
    _wait(lambda: "self-check ok" in _find(page, "#train-status").text, 60, "the preview shows no self-check")
    # The status text can render a moment before the highlighted samples.
    _wait(lambda: _find_all(page, "#train-sample-0"), 10, "the preview shows no encoded sample")
    assert _find(page, "#train-sample-0").is_displayed()
    _screenshot(page, "train-preview")

    _find(page, "#train-start").click()
    _wait(lambda: "Started" in _find(page, "#train-status").text, 30, _find(page, "#train-status").text)
    command = _find(page, "#train-command textarea").get_attribute("value")
    assert command == f"vlmtune train {output / 'train_config.yaml'}"

    def loss_points() -> int:
        return len([element for element in _find_all(page, "#train-loss [aria-label^='step:']")])

    _wait(lambda: loss_points() >= 3, 180, f"the loss chart got no points; log:\n{_log(output)}", interval=0.5)
    assert "running: step" in _find(page, "#train-progress-box").text

    # A reloaded page reattaches to the server's job.
    page.refresh()
    _open_tab(page, "Train")
    _wait(lambda: _find(page, "#train-command textarea").get_attribute("value") == command, 30,
          "the reloaded page does not show the running job")
    _wait(lambda: loss_points() >= 3, 30, "the reloaded page shows no loss points")
    _screenshot(page, "train-running")

    _find(page, "#train-stop").click()
    _wait(lambda: "stopped; adapter saved" in _find(page, "#train-progress-box").text, 120,
          f"the run did not stop with an adapter; log:\n{_log(output)}", interval=0.5)
    _screenshot(page, "train-stopped")

    checkpoints = sorted(output.glob("checkpoint-*"))
    assert len(checkpoints) == 1, "the stop saved one checkpoint"
    step = int(checkpoints[0].name.removeprefix("checkpoint-"))
    assert 3 <= step < 400
    assert (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert (output / "adapter_config.json").is_file()
    assert (output / "config.yaml").is_file()
    assert (output / "train_config.yaml").is_file()

    # The reloaded page shows the job's form, so Resume continues the stopped run from its checkpoint, here
    # for two more steps. The reload closed "More".
    assert _find(page, "#train-dataset textarea").get_attribute("value") == str(workspace["dataset"])
    assert _find(page, "#train-output textarea").get_attribute("value") == str(output)
    _find(page, "#train-more .label-wrap").click()
    _wait(lambda: _find_all(page, "#train-max-steps input"), 10, "the 'More' section did not open")
    fill("#train-max-steps input", str(step + 2))
    _find(page, "#train-resume").click()
    _wait(lambda: "Resumed" in _find(page, "#train-status").text, 30, _find(page, "#train-status").text)
    assert _find(page, "#train-command textarea").get_attribute("value") == f"{command} --resume"
    _wait(lambda: "finished; adapter saved" in _find(page, "#train-progress-box").text, 180,
          f"the resumed run did not finish; log:\n{_log(output)}", interval=0.5)
    assert f"step {step + 2} / {step + 2}" in _find(page, "#train-progress-box").text
    assert (output / f"checkpoint-{step + 2}").is_dir()


def test_bad_dataset_shows_message(page, workspace):
    from selenium.webdriver.common.keys import Keys

    _open_tab(page, "Train")
    missing = workspace["root"] / "missing.json"
    field = _find(page, "#train-dataset textarea")
    field.clear()
    field.send_keys(str(missing))
    field.send_keys(Keys.TAB)
    _find(page, "#train-preview").click()
    _wait(lambda: "file not found" in _find(page, "#train-status").text, 30, "no message for a missing dataset")
    status = _find(page, "#train-status").text
    assert str(missing) in status
    assert "Traceback" not in status


def _log(output: Path) -> str:
    log = output / "train.log"
    return log.read_text(encoding="utf-8")[-3000:] if log.is_file() else "(no train.log)"


def test_chinese_labels_follow_browser(server):
    driver = _browser("zh-CN")
    try:
        driver.get(server)
        _wait(lambda: [tab.text for tab in _find_all(driver, "button[role=tab]")] == ["对话", "训练"], 30,
              "the tabs are not labelled in Chinese for a zh-CN browser")
        assert "系统提示词" in _find(driver, "#chat-system").text
        _screenshot(driver, "chat-zh")
    finally:
        driver.quit()


def test_page_loads_nothing_from_elsewhere(page, server):
    resources = page.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
    assert resources, "the browser recorded no resource loads"
    outside = [url for url in resources if not url.startswith((server, "data:", "blob:"))]
    assert outside == [], "the page loads resources only from the local server"
