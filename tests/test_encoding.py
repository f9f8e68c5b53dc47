"""Conversation -> encoded sample: golden renders, label masks, stop tokens, history, lengths."""

from __future__ import annotations

import pytest

from conftest import data_settings
from vlmtune.data import Conversation, ImagePart, Message, TextPart
from vlmtune.data.alpaca import alpaca_to_conversation
from vlmtune.data.records import Record
from vlmtune.encoding import (
    IGNORE_INDEX,
    ConversationEncoder,
    ParsedReply,
    build_reply,
    check_sample,
    encode_conversations,
    split_reply,
)
from vlmtune.errors import DataError

# The tutorial's catgirl example, as its dataset row.
CATGIRL = {
    "instruction": "沐雪的功能是什么？",
    "input": "",
    "output": "喵~本雪的主要功能是让你开心喵！用可爱的猫娘之力治愈你的心灵，喵呜~",
    "history": [],
}
CATGIRL_PROMPT = "[gMASK]<sop><|user|>\n沐雪的功能是什么？<|assistant|>\n"
CATGIRL_REPLY = "<think>\n</think>\n<answer>喵~本雪的主要功能是让你开心喵！用可爱的猫娘之力治愈你的心灵，喵呜~</answer><|user|>"


def alpaca(row: dict, system: str | None = None) -> Conversation:
    return alpaca_to_conversation(Record(row, "train.json", 0, 1), system)


def decode(encoder: ConversationEncoder, ids: list[int]) -> str:
    return encoder.tokenizer.decode(ids, skip_special_tokens=False)


def supervised_ids(sample) -> list[int]:
    return [label for label in sample.labels if label != IGNORE_INDEX]


def test_catgirl_golden_text_and_mask(encoder):
    sample = encoder.encode(alpaca(CATGIRL))
    assert decode(encoder, sample.input_ids) == CATGIRL_PROMPT + CATGIRL_REPLY
    start = sample.reply_starts[0]
    assert decode(encoder, sample.input_ids[:start]) == CATGIRL_PROMPT
    assert all(label == IGNORE_INDEX for label in sample.labels[:start])
    assert sample.labels[start:] == sample.input_ids[start:]
    assert decode(encoder, supervised_ids(sample)) == CATGIRL_REPLY


def test_catgirl_with_system_prompt(encoder):
    sample = encoder.encode(alpaca(CATGIRL, system="你是沐雪，一只猫娘。"))
    expected = "[gMASK]<sop><|system|>\n你是沐雪，一只猫娘。<|user|>\n沐雪的功能是什么？<|assistant|>\n" + CATGIRL_REPLY
    assert decode(encoder, sample.input_ids) == expected


def test_prompt_equals_inference_tokens(encoder, loaded):
    conversation = alpaca(CATGIRL)
    sample = encoder.encode(conversation)
    inference = loaded.processor.apply_chat_template(
        [{"role": "user", "content": "沐雪的功能是什么？"}], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    inference = inference[0] if isinstance(inference[0], list) else inference
    assert sample.input_ids[: sample.reply_starts[0]] == list(inference)


def test_stop_token_ends_every_turn(encoder, loaded):
    row = {**CATGIRL, "history": [["早上好", "早上好喵~"], ["你会做饭吗", "会一点点喵"]]}
    sample = encoder.encode(alpaca(row))
    assert len(sample.reply_starts) == 3
    stops = set(loaded.stop_token_ids)
    for turn, start in enumerate(sample.reply_starts):
        end = sample.reply_starts[turn + 1] if turn + 1 < len(sample.reply_starts) else len(sample)
        supervised = [label for label in sample.labels[start:end] if label != IGNORE_INDEX]
        assert supervised, f"turn {turn} has no supervised tokens"
        assert supervised[-1] in stops, f"turn {turn} does not end with a stop token"


def test_history_is_rendered_and_trained(encoder):
    row = {**CATGIRL, "history": [["早上好", "早上好喵~"]]}
    sample = encoder.encode(alpaca(row))
    text = decode(encoder, sample.input_ids)
    assert text.startswith("[gMASK]<sop><|user|>\n早上好<|assistant|>\n<think>\n</think>\n<answer>早上好喵~</answer><|user|>\n沐雪")
    supervised_text = decode(encoder, supervised_ids(sample))
    assert "早上好喵~" in supervised_text


def test_train_on_last_turn_only(loaded):
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids, train_on="last_turn")
    row = {**CATGIRL, "history": [["早上好", "早上好喵~"]]}
    sample = encoder.encode(alpaca(row))
    assert all(label == IGNORE_INDEX for label in sample.labels[: sample.reply_starts[1]])
    assert decode(encoder, supervised_ids(sample)) == CATGIRL_REPLY


def test_self_check_passes_on_multi_turn(encoder):
    row = {**CATGIRL, "history": [["早上好", "早上好喵~"], ["1+1=?", "2喵"]]}
    conversation = alpaca(row, system="你是沐雪。")
    check = check_sample(encoder, conversation, encoder.encode(conversation))
    assert check.prompt_matches_template
    assert check.ends_with_stop_token
    assert check.ok, check.problems


def test_reasoning_kept_only_in_final_reply(encoder):
    conversation = Conversation(
        [
            Message("user", [TextPart("q1")]),
            Message("assistant", [TextPart("a1")], reasoning="old thoughts"),
            Message("user", [TextPart("q2")]),
            Message("assistant", [TextPart("a2")], reasoning="new thoughts"),
        ]
    )
    sample = encoder.encode(conversation)
    text = decode(encoder, sample.input_ids)
    assert "old thoughts" not in text
    assert "<think>\nnew thoughts</think>\n<answer>a2</answer>" in text
    # The first reply lost its reasoning, so it is context only: only the last reply is supervised.
    assert all(label == IGNORE_INDEX for label in sample.labels[: sample.reply_starts[1]])
    assert decode(encoder, supervised_ids(sample)).startswith("<think>\nnew thoughts</think>")


def test_existing_layout_not_wrapped_twice():
    laid_out = "<think>\nhmm</think>\n<answer>喵</answer>"
    assert build_reply("think_answer", laid_out) == laid_out
    assert build_reply("none", laid_out) == "喵"


@pytest.mark.parametrize(
    "text, reasoning, answer",
    [
        ("<think>\nhmm</think>\n<answer>hi</answer>", "hmm", "hi"),
        ("<think>\n</think>\n<answer>喵~</answer>", "", "喵~"),
        ("<think>\nstill thinking", "still thinking", ""),
        ("<think>\nx</think>\n<answer>unclosed", "x", "unclosed"),
        ("<think>\nnever closed<answer>hi</answer>", "never closed", "hi"),
        ("plain answer", "", "plain answer"),
    ],
)
def test_split_reply_cases(text, reasoning, answer):
    parsed = split_reply(text)
    assert parsed.reasoning == reasoning
    assert parsed.answer == answer


@pytest.mark.parametrize(
    "text, show_thinking, expected",
    [
        ("<think>\nLet me think.</think>\n<answer>Hi!</answer>", True, "[thinking]\nLet me think.\n[answer]\nHi!"),
        ("<think>\nLet me think.</think>\n<answer>Hi!</answer>", False, "Hi!"),
        ("<think>\nstill going", True, "[thinking]\nstill going"),
        ("<think>\nstill going", False, ""),
        ("<think>\n</think>\n<answer>Hi!</answer>", True, "[answer]\nHi!"),
        ("<think>\n", True, ""),
        ("喵，你好", True, "[answer]\n喵，你好"),  # a reply that opens no think block
        ("喵，你好", False, "喵，你好"),
    ],
)
def test_visible_text_labels_reasoning(text, show_thinking, expected):
    from vlmtune.inference.generate import visible_text

    assert visible_text(text, "think_answer", show_thinking) == expected


def test_visible_text_grows_while_streaming():
    from vlmtune.inference.generate import visible_text

    # Layout tags are single special tokens, so streamed text never contains half a tag.
    for chunks in (
        ["<think>", "\n", "a", "bc", "</think>", "\n", "<answer>", "x", "yz", "</answer>"],
        ["<think>", "\n", "</think>", "\n", "<answer>", "x", "yz", "</answer>"],  # no reasoning
        ["喵", "，你", "好"],  # no layout tags at all
        ["想一想", "</think>", "\n", "<answer>", "好", "</answer>"],  # the think block opened by the prompt
        ["</think>", "\n", "<answer>", "\n", "<think>", "\n", "<think>", "\n", "<answer>", "\n"],  # stray tags
        ["<think>", "\n", "a", "</think>", "b", "<answer>", "c"],  # text between the blocks
        ["<answer>", "x <", "/ans", "wer> y"],  # a tag written as plain characters
    ):
        texts = ["".join(chunks[:end]) for end in range(1, len(chunks) + 1)]
        for show_thinking in (True, False):
            shown = [visible_text(text, "think_answer", show_thinking, final=False) for text in texts]
            shown.append(visible_text(texts[-1], "think_answer", show_thinking, final=True))
            for earlier, later in zip(shown, shown[1:]):
                assert later.startswith(earlier), (chunks, earlier, later)


@pytest.mark.parametrize(
    "text, reasoning, answer",
    [
        ("想一想</think>\n<answer>好</answer>", "想一想", "好"),
        # Layout tags inside the answer are stray control tokens: the answer leaves them out.
        ("</think>\n<answer>\n<think>\n<think>\n<answer>\n", "", ""),
        ("</think>\n</think>\n<answer>喵~<think>\n</think>\n<answer>\n\n", "", "喵~"),  # tags between the blocks
        ("<think>\n</think>\n<answer></think>汪义</answer>", "", "汪义"),
        ("<think>\n\n\n</think>\n<answer>汪</answer>", "", "汪"),  # line breaks alone are no reasoning
        ("<think>\na</think>b<answer>c", "a", "bc"),  # text between the blocks is kept
        ("<think>\na</think>\n b ", "a", "b"),
    ],
)
def test_split_reply_stray_tags(text, reasoning, answer):
    assert split_reply(text) == ParsedReply(reasoning, answer)


@pytest.mark.parametrize(
    "text, opened_by_prompt, reasoning, answer",
    [
        ("喵，你好<think>\n想想", False, "", "喵，你好\n想想"),  # text first: the layout is not followed
        ("\n<think>\nhmm</think>\n<answer>hi</answer>", False, "hmm", "hi"),  # a tag first: the layout
        ("想一想</think>\n<answer>好</answer>", True, "想一想", "好"),
        ("<think>\nhmm</think>\n<answer>hi</answer>", True, "hmm", "hi"),  # opened by the prompt and the reply
    ],
)
def test_split_reply_knows_prompt(text, opened_by_prompt, reasoning, answer):
    parsed = split_reply(text, opened_by_prompt=opened_by_prompt)
    assert parsed.reasoning == reasoning
    assert parsed.answer == answer


def test_plain_reply_streams_from_first_piece():
    from vlmtune.inference.generate import visible_text

    chunks = ["喵", "，你 ", "好", "<think>", "\n想", "<", "/answer> 吧"]
    texts = ["".join(chunks[:end]) for end in range(1, len(chunks) + 1)]
    shown = [visible_text(text, "think_answer", False, final=False, opened_by_prompt=False) for text in texts]
    shown.append(visible_text(texts[-1], "think_answer", False, final=True, opened_by_prompt=False))
    assert shown[0] == "喵"  # not kept back until the reply ends
    for earlier, later in zip(shown, shown[1:]):
        assert later.startswith(earlier), (earlier, later)
    assert shown[-1] == "喵，你 好\n想 吧"


@pytest.mark.parametrize(
    "text, opened_by_prompt, reasoning, answer",
    [
        ("<think>\n一加一等于二。\n</think>\n\n2喵", False, "一加一等于二。\n", "2喵"),
        ("一加一等于二。</think>\n\n2喵", True, "一加一等于二。", "2喵"),  # the prompt opened the block
        ("2喵", False, "", "2喵"),
    ],
)
def test_split_reply_think_layout(text, opened_by_prompt, reasoning, answer):
    parsed = split_reply(text, opened_by_prompt=opened_by_prompt, answer_tags=False)
    assert parsed.reasoning == reasoning
    assert parsed.answer == answer


def test_think_layout_answer_streams_after_think():
    from vlmtune.inference.generate import visible_text

    chunks = ["<think>", "\n想", "一想\n", "</think>", "\n\n", "好", "的喵", "<", "br>"]
    texts = ["".join(chunks[:end]) for end in range(1, len(chunks) + 1)]
    shown = [visible_text(text, "think", False, final=False, opened_by_prompt=False) for text in texts]
    shown.append(visible_text(texts[-1], "think", False, final=True, opened_by_prompt=False))
    assert shown[5] == "好"  # the answer streams without waiting for an <answer> tag
    for earlier, later in zip(shown, shown[1:]):
        assert later.startswith(earlier), (earlier, later)
    assert shown[-1] == "好的喵<br>"


def test_plain_layout_without_thinking(loaded):
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids, thinking="none")
    sample = encoder.encode(alpaca(CATGIRL))
    assert decode(encoder, supervised_ids(sample)) == CATGIRL["output"] + "<|user|>"


def test_overlength_dropped_and_counted(encoder):
    short = alpaca(CATGIRL)
    long = alpaca({**CATGIRL, "output": "喵" * 600})
    report = encode_conversations(encoder, [short, long], data_settings(max_length=128))
    assert len(report.samples) == 1
    [(reason, sources)] = report.dropped.items()
    assert "max_length=128" in reason
    assert sources == [long.source]


def test_overlength_error_names_example(encoder):
    long = alpaca({**CATGIRL, "output": "喵" * 600})
    with pytest.raises(DataError, match=r"train.json, record 1 .*max_length=128"):
        encode_conversations(encoder, [long], data_settings(max_length=128, on_overlength="error"))


def test_image_tokens_expanded_and_masked(encoder, loaded, tmp_path):
    from PIL import Image

    image_path = tmp_path / "red.png"
    Image.new("RGB", (120, 90), (220, 40, 40)).save(image_path)
    conversation = Conversation(
        [
            Message("user", [ImagePart(str(image_path)), TextPart("这是什么颜色？")]),
            Message("assistant", [TextPart("红色喵")]),
        ],
        source="inline",
    )
    sample = encoder.encode(conversation)
    image_id = encoder.tokenizer.convert_tokens_to_ids("<|image|>")
    merge = loaded.processor.image_processor.merge_size ** 2
    expected = int(sample.image_grid_thw.prod()) // merge
    positions = [index for index, token in enumerate(sample.input_ids) if token == image_id]
    assert len(positions) == expected
    assert all(sample.labels[index] == IGNORE_INDEX for index in positions)
    assert sample.mm_token_type_ids.count(1) == expected
    assert check_sample(encoder, conversation, sample).ok


def test_missing_image_names_example(encoder):
    conversation = Conversation(
        [Message("user", [ImagePart("/no/such.png"), TextPart("?")]), Message("assistant", [TextPart("!")])],
        source="data.json, record 4 (line 9)",
    )
    with pytest.raises(DataError, match=r"record 4 .*image not found: /no/such.png"):
        encoder.encode(conversation)


def test_chinese_round_trip(encoder):
    text = "喵~「小橘」最喜欢🐟和🍊！English mixed 123"
    sample = encoder.encode(alpaca({"instruction": "说点什么", "input": "", "output": text}))
    assert text in decode(encoder, sample.input_ids)


def test_control_token_inside_tag_not_shown(loaded):
    """A sampled reply can split a layout tag with a control token; the tag must not reach the answer."""
    from vlmtune.config import GenerationSettings
    from vlmtune.inference import Generator

    generator = Generator(loaded, GenerationSettings())
    tokenizer = loaded.tokenizer
    ids = [
        *tokenizer.encode("你好<answer", add_special_tokens=False),
        tokenizer.convert_tokens_to_ids("[gMASK]"),
        *tokenizer.encode(">喵", add_special_tokens=False),
    ]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "你好<answer[gMASK]>喵"
    reply = generator._to_reply(ids, opened_by_prompt=False)
    assert reply.answer == "你好喵"
