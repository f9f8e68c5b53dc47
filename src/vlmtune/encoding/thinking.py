"""The reply layout of thinking models: building it for training, parsing it after generation.

GLM-4.1V-Thinking replies as (layout `think_answer`)

    <think>\\n{reasoning}</think>\\n<answer>{answer}</answer>

An answer without reasoning gets an empty think block. Earlier assistant turns keep
the layout but drop their reasoning, both in training and in chat history.

Templates that render an assistant message's `reasoning_content` themselves (Qwen3 style,
layout `think`) produce `<think>...</think>` followed by the answer, without answer tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

LayoutName = Literal["think_answer", "think", "none"]

THINK_ANSWER_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
_TAG = re.compile("(" + "|".join(re.escape(tag) for tag in THINK_ANSWER_TOKENS) + ")")


@dataclass(frozen=True)
class ParsedReply:
    reasoning: str
    answer: str
    answer_begun: bool = field(default=False, compare=False, repr=False)
    """Whether the reply has reached its answer part (an `<answer>` tag, or the end of a finished reply)."""


def split_reply(text: str, final: bool = True, opened_by_prompt: bool | None = None, answer_tags: bool = True) -> ParsedReply:
    """Split a reply into reasoning and answer, accepting missing, unclosed and stray tags.

    The text is read once from the start, tag by tag, so a longer text never changes how
    an earlier part was read. With `final=False` the text is a reply still being generated,
    and the result keeps back what later text could still assign: text before the first tag
    (reasoning if `</think>` follows, the whole answer if no tag does), text between `</think>`
    and `<answer>`, and a trailing piece that may begin a tag. Each such result is then
    extended by the next one and by the final one, so streamed pieces add up to the reply
    that a single call returns.

    `opened_by_prompt` says whether the generation prompt ended with `<think>`. True: the reply
    starts inside the think block. False: a reply that starts with text, not a tag, does not
    follow the layout, so all of it is the answer (layout tags in it are dropped), and it can be
    streamed from the first piece. None (not known): text before the first tag is kept back.

    `answer_tags=False` reads the `think` layout: everything after `</think>` is the answer,
    without leading whitespace.

    >>> split_reply("<think>\\nhmm</think>\\n<answer>hi</answer>")
    ParsedReply(reasoning='hmm', answer='hi')
    >>> split_reply("plain")
    ParsedReply(reasoning='', answer='plain')
    """
    state, pending, reasoning, answer = ("think" if opened_by_prompt else "start"), "", "", ""
    for index, piece in enumerate(_TAG.split(text)):
        is_tag = index % 2 == 1
        if state == "start":
            if is_tag and piece == "<think>":
                state, pending = "think", ""
            elif is_tag and piece == "</think>":  # the think block was opened by the prompt
                state, reasoning, pending = ("between" if answer_tags else "answer"), pending, ""
            elif is_tag and piece == "<answer>":
                state, pending = "answer", ""
            elif opened_by_prompt is False and piece.strip():
                state, answer = "plain", piece
            else:
                pending += piece
        elif state == "plain":
            if not is_tag:
                answer += piece
        elif state == "think":
            if is_tag and piece == "</think>":
                state, pending = ("between" if answer_tags else "answer"), ""
            elif is_tag and piece == "<answer>":
                state = "answer"
            elif is_tag and piece == "<think>" and not reasoning.strip():
                pass  # the prompt opened the block and the reply opened it again
            else:
                reasoning += piece
        elif state == "between":
            if is_tag and piece == "<answer>":
                # Text between </think> and <answer> breaks the layout; it is kept as the answer's start, not dropped.
                state, answer, pending = "answer", pending.strip(), ""
            elif not is_tag:
                pending += piece  # a stray layout tag here is left out, as in the answer
        elif state == "answer":
            if is_tag and piece == "</answer>":
                state = "closed"
            elif not is_tag or (not answer_tags and piece == "<answer>"):
                answer += piece
            # Other layout tags inside the answer are stray control tokens, left out of the answer.
    reasoning = reasoning.removeprefix("\n")  # the line break the layout puts after <think>
    if not reasoning.strip():
        reasoning = ""  # a think block of line breaks holds no reasoning
    if state == "plain":
        # Stripping both ends keeps streamed results growing: trailing space returns once text follows it.
        answer = answer.strip() if final else _without_partial_tag(answer).strip()
        return ParsedReply("", answer, answer_begun=True)
    if state == "think" and not final:
        reasoning = _without_partial_tag(reasoning)
    if state in ("start", "between"):
        # A reply without an <answer> tag: its answer is the text outside the think block.
        return ParsedReply(reasoning, pending.strip() if final else "", answer_begun=final)
    if state == "answer" and not final:
        answer = _without_partial_tag(answer)
    # Line breaks around the answer, or left where stray tags were, are not part of it. Streamed
    # results still grow: trailing space returns once text follows it.
    answer = answer.strip()
    return ParsedReply(reasoning, answer, answer_begun=state in ("answer", "closed"))


def _without_partial_tag(text: str) -> str:
    """Return text without a trailing piece that a layout tag could start with, such as `</ans`."""
    start = text.rfind("<")
    if start != -1 and any(tag.startswith(text[start:]) and tag != text[start:] for tag in THINK_ANSWER_TOKENS):
        return text[:start]
    return text


def build_reply(layout: LayoutName, answer: str, reasoning: str = "") -> str:
    """Lay out an assistant reply for the chat template.

    An answer that already contains the layout is split first, so it is never wrapped twice.
    """
    if "<think>" in answer or "<answer>" in answer:
        parsed = split_reply(answer)
        answer, reasoning = parsed.answer, reasoning or parsed.reasoning
    if layout != "think_answer":
        return answer  # a `think` template renders the reasoning from reasoning_content
    return f"<think>\n{reasoning}</think>\n<answer>{answer}</answer>"


def detect_layout(tokenizer) -> LayoutName:
    """think_answer when every layout tag is a single token of the tokenizer, else none."""
    vocabulary = tokenizer.get_vocab()
    return "think_answer" if all(tag in vocabulary for tag in THINK_ANSWER_TOKENS) else "none"
