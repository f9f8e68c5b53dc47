"""A readable view of encoded samples, and the self-check that inference will see the same prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Literal

from rich.text import Text

from vlmtune.data.conversation import Conversation
from vlmtune.encoding.encode import IGNORE_INDEX, ConversationEncoder, EncodedSample


@dataclass
class SelfCheck:
    """Results of checking one encoded sample against inference-time rendering."""

    prompt_matches_template: bool
    ends_with_stop_token: bool
    supervised_tokens: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def inference_prompt_ids(encoder: ConversationEncoder, conversation: Conversation, upto_message: int) -> list[int]:
    """Token ids that inference feeds the model before assistant message `upto_message`."""
    # Inference renders the conversation up to that message; its earlier replies keep no reasoning.
    messages = encoder.template_messages(Conversation(conversation.messages[:upto_message], conversation.source), with_images=True)
    encoded = encoder.processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )
    ids = encoded["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def check_sample(encoder: ConversationEncoder, conversation: Conversation, sample: EncodedSample) -> SelfCheck:
    """Compare every turn's prompt with apply_chat_template and check the supervised ending."""
    problems = []
    assistant_messages = [index for index, message in enumerate(conversation.messages) if message.role == "assistant"]
    prompt_matches = True
    for turn, (message_index, reply_start) in enumerate(zip(assistant_messages, sample.reply_starts)):
        expected = inference_prompt_ids(encoder, conversation, message_index)
        if [int(token) for token in sample.input_ids[:reply_start]] != expected:
            prompt_matches = False
            problems.append(f"turn {turn + 1}: the training prompt differs from apply_chat_template's prompt")

    supervised = [label for label in sample.labels if label != IGNORE_INDEX]
    ends_with_stop = bool(supervised) and supervised[-1] in encoder.stop_ids
    if not ends_with_stop:
        problems.append("the last supervised token is not a stop token, so the model would not learn to stop")
    return SelfCheck(prompt_matches, ends_with_stop, len(supervised), problems)


SegmentKind = Literal["supervised", "masked", "image"]


def sample_segments(encoder: ConversationEncoder, sample: EncodedSample) -> list[tuple[str, SegmentKind]]:
    """Split a sample into decoded runs of supervised, masked and image tokens.

    A run of image tokens becomes one `<image token>×COUNT` piece, because a count is easier to
    read than hundreds of identical markers.
    """
    tokenizer = encoder.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(encoder.image_token) if encoder.image_token else None
    segments: list[tuple[str, SegmentKind]] = []
    pairs = zip(sample.input_ids, sample.labels)
    for (is_supervised, is_image), run in groupby(pairs, key=lambda pair: (pair[1] != IGNORE_INDEX, pair[0] == image_id)):
        ids = [token for token, _ in run]
        if is_image:
            segments.append((f"{encoder.image_token}×{len(ids)}", "image"))
        else:
            piece = tokenizer.decode(ids, skip_special_tokens=False)
            segments.append((piece, "supervised" if is_supervised else "masked"))
    return segments


SEGMENT_STYLES = {"supervised": "bold green", "masked": "dim", "image": "magenta"}


SUPERVISED_MARKERS = ("⟦", "⟧")
"""Brackets around supervised tokens where no colour shows, such as output piped to a file."""


def render_sample(encoder: ConversationEncoder, sample: EncodedSample, markers: bool = False) -> Text:
    """Supervised tokens in bold green, masked tokens dim; image token runs shown as a count.

    With `markers`, supervised tokens are also put between SUPERVISED_MARKERS.
    """
    text = Text()
    for piece, kind in sample_segments(encoder, sample):
        if markers and kind == "supervised":
            piece = f"{SUPERVISED_MARKERS[0]}{piece}{SUPERVISED_MARKERS[1]}"
        text.append(piece, style=SEGMENT_STYLES[kind])
    return text
