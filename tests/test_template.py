"""The tiny model's chat template renders exactly like GLM-4.1V-9B-Thinking's published one."""

from __future__ import annotations

import pytest

from conftest import REFERENCE_DIR
from vlmtune.model.tiny import glm4v_chat_template

IMAGE = {"type": "image"}
VIDEO = {"type": "video"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


CONVERSATIONS = [
    [{"role": "user", "content": "你是谁？"}],
    [{"role": "system", "content": "你是小橘。"}, {"role": "user", "content": "你好"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [
        {"role": "system", "content": "你是小橘，一只猫娘。"},
        {"role": "user", "content": "早上好"},
        {"role": "assistant", "content": "早上好喵~"},
        {"role": "user", "content": "今天吃什么？"},
    ],
    [{"role": "user", "content": [text("这是什么？")]}],
    [{"role": "user", "content": [IMAGE, text("描述这张图")]}],
    [{"role": "user", "content": [text("比较"), IMAGE, text("和"), IMAGE]}],
    [{"role": "user", "content": [IMAGE, IMAGE, IMAGE]}],
    [{"role": "user", "content": [VIDEO, text("视频里发生了什么？")]}],
    [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, text("猫")]}],
    [{"role": "user", "content": [{"image": "cat.png"}, text("no type key")]}],
    [
        {"role": "user", "content": [IMAGE, text("这是谁的猫？")]},
        {"role": "assistant", "content": "<think>\n看起来是橘猫</think>\n<answer>是小橘的朋友喵~</answer>"},
        {"role": "user", "content": "它几岁？"},
    ],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "line one\nline two\n\n  indented"}],
    [{"role": "user", "content": "  leading and trailing spaces  "}],
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "metadata": "tool_name"}],
    [{"role": "user", "content": "emoji 😺 and ümlaut"}, {"role": "assistant", "content": "喵 😸"}],
    [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3"},
    ],
    [{"role": "observation", "content": "tool output"}, {"role": "user", "content": "after a tool"}],
    [{"role": "user", "content": "{{ not a jinja expression }} {% raw %}"}],
]

# Renders of our template that every checkout checks, with or without the reference file.
GOLDEN = [
    (0, True, "[gMASK]<sop><|user|>\n你是谁？<|assistant|>\n"),
    (1, True, "[gMASK]<sop><|system|>\n你是小橘。<|user|>\n你好<|assistant|>\n"),
    (2, False, "[gMASK]<sop><|user|>\nhi<|assistant|>\nhello"),
    (6, True, "[gMASK]<sop><|user|>\n比较<|begin_of_image|><|image|><|end_of_image|>和"
              "<|begin_of_image|><|image|><|end_of_image|><|assistant|>\n"),
    (8, False, "[gMASK]<sop><|user|>\n<|begin_of_video|><|video|><|end_of_video|>视频里发生了什么？"),
    (17, False, "[gMASK]<sop><|user|>\na<|assistant|>tool_name\nb"),
]


def test_conversation_count():
    assert len(CONVERSATIONS) >= 20


@pytest.mark.parametrize("index, generation_prompt, expected", GOLDEN)
def test_template_golden_renders(loaded, index, generation_prompt, expected):
    rendered = loaded.processor.apply_chat_template(
        CONVERSATIONS[index], tokenize=False, add_generation_prompt=generation_prompt
    )
    assert rendered == expected


def test_processor_uses_vlmtune_template(loaded):
    assert loaded.processor.chat_template == glm4v_chat_template()


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_template_matches_official(loaded, index, generation_prompt):
    official_path = REFERENCE_DIR / "glm-4.1v-9b-thinking.chat_template.jinja"
    if not official_path.is_file():
        pytest.skip(f"reference template not found at {official_path} (it ships beside the repository, not in it)")
    official = official_path.read_text(encoding="utf-8")
    messages = CONVERSATIONS[index]
    ours = loaded.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    theirs = loaded.processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=official
    )
    assert ours == theirs
