"""Reply metrics on hand-made replies whose expected values are known, and the evaluation report."""

from __future__ import annotations

import pytest

from vlmtune.inference.generate import Reply
from vlmtune.inference.metrics import compute_metrics, distinct_n, follows_layout, is_repetitive, reference_scores


def reply(answer: str, *, stopped: bool = True, tokens: int = 10, text: str | None = None) -> Reply:
    raw = text if text is not None else f"<think>\n</think>\n<answer>{answer}</answer>"
    return Reply(text=raw, reasoning="", answer=answer, generated_tokens=tokens, stopped=stopped)


LOOPING = "喵呜~这个皮革看起来很舒服喵！" + "（蹭蹭）喵~（舔毛）喵~（打滚）喵~" * 12
HEALTHY = "喵~本雪的主要功能是让你开心喵！用可爱的猫娘之力治愈你的心灵，喵呜~ 今天也要好好吃饭哦，记得多喝水，早点休息。"


@pytest.mark.parametrize(
    "answer, expected",
    [
        (LOOPING, True),
        ("哈" * 300, True),
        (HEALTHY, False),
        ("喵~" * 10, False),  # 20 characters: too short to count as a loop
        ("abcdefghij" * 30, True),
        ("".join(chr(0x4E00 + index) for index in range(300)), False),
    ],
)
def test_is_repetitive(answer, expected):
    assert is_repetitive(answer) is expected


def test_distinct_2_known_values():
    assert distinct_n(["abab"]) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n(["abc", "abc"]) == pytest.approx(2 / 4)
    assert distinct_n(["a b c"]) == pytest.approx(1.0)  # whitespace removed: ab, bc
    assert distinct_n([""]) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\n</think>\n<answer>喵</answer>", True),
        ("<think>\nreasoning here</think>\n<answer>hi</answer>", True),
        ("喵呜~本雪是AI猫猫喵！</think><answer>喵呜~</answer>", False),  # the tutorial's duplicated layout
        ("<think>\nnever closed", False),
        ("<answer>no think</answer>", False),
        ("plain", False),
    ],
)
def test_follows_layout(text, expected):
    assert follows_layout(text) is expected


def test_compute_metrics_mixed_replies():
    replies = [
        reply(HEALTHY, tokens=30),
        reply(LOOPING, stopped=False, tokens=200),
        reply("好的喵~", tokens=6),
        reply("broken", text="broken</think><answer>broken</answer>", tokens=12),
        reply("", text="\n<think></think>\n<think></think>", tokens=9),  # stops, with nothing to show
    ]
    metrics = compute_metrics(replies, thinking_layout=True, style_patterns=["喵", "^好"])
    assert metrics.replies == 5
    assert metrics.stop_rate == pytest.approx(0.8)
    assert metrics.empty_rate == pytest.approx(0.2)
    assert metrics.repetition_rate == pytest.approx(0.2)
    assert metrics.length_median == pytest.approx(12)
    assert metrics.length_p95 == 200
    assert metrics.format_validity == pytest.approx(0.6)
    assert metrics.style == {"喵": pytest.approx(0.6), "^好": pytest.approx(0.2)}
    scalars = metrics.scalars()
    assert scalars["style/喵"] == pytest.approx(0.6)
    assert "style" not in scalars
    assert "replies" not in scalars  # a count that never changes makes a flat chart


def test_reference_scores_bounds_and_chinese():
    same = reference_scores(["我是小橘喵~", "今天天气很好。"], ["我是小橘喵~", "今天天气很好。"])
    assert same["bleu"] == 100.0
    assert same["chrf"] == 100.0
    assert "tok:zh" in same["bleu_signature"]
    unrelated = reference_scores(["狗狗汪汪叫"], ["我是小橘喵~"])
    assert unrelated["bleu"] == 0.0
    assert unrelated["chrf"] < 5
    # Chinese is compared by character, so a near answer scores between the two.
    near = reference_scores(["我是小橘，喵~"], ["我是小橘喵~"])
    assert 0 < near["bleu"] < 100
    assert unrelated["chrf"] < near["chrf"] < 100


def test_reference_scores_needs_one_reference_per_answer():
    with pytest.raises(ValueError, match="one reference per answer, got 2 and 1"):
        reference_scores(["a", "b"], ["a"])


def test_format_validity_absent_without_thinking():
    metrics = compute_metrics([reply("a", text="a")], thinking_layout=False, style_patterns=[])
    assert metrics.format_validity is None
    assert "format_validity" not in metrics.scalars()


def test_report_shows_earlier_turns(tiny_model_dir, tmp_path):
    import json

    from vlmtune.config import GenerationSettings, ModelSettings
    from vlmtune.data import Conversation, Message, TextPart
    from vlmtune.inference.evaluation import run_evaluation, write_report
    from vlmtune.inference.generate import Generator
    from vlmtune.model.loading import load_model

    generator = Generator(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), GenerationSettings())
    history = [Message("user", [TextPart("你好")]), Message("assistant", [TextPart("你好喵~")])]
    prompts = [
        Conversation([*history, Message("user", [TextPart("有什么记忆方法？")])], source="a"),
        Conversation([Message("user", [TextPart("你是谁？")])], source="b"),
    ]
    run = run_evaluation(generator, prompts, "base", [], max_new_tokens=4)
    json_path, markdown_path = write_report([run], tmp_path)
    samples = json.loads(json_path.read_text(encoding="utf-8"))[0]["samples"]
    assert [sample["earlier_turns"] for sample in samples] == [1, 0]
    markdown = markdown_path.read_text(encoding="utf-8")
    assert "| (after 1 earlier turn) 有什么记忆方法？ |" in markdown
    assert "| 你是谁？ |" in markdown


def test_report_prompt_marks_images():
    from vlmtune.data import Conversation, ImagePart, Message, TextPart
    from vlmtune.inference.evaluation import _prompt_text

    text_only = Conversation([Message("user", [TextPart("你好")])])
    with_images = Conversation([Message("user", [ImagePart("a.png"), ImagePart("b.png"), TextPart("哪个好看？")])])
    assert _prompt_text(text_only) == "你好"
    assert _prompt_text(with_images) == "[2 images] 哪个好看？"
