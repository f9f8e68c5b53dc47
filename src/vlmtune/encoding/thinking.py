"""The reply layout of thinking models: building it for training, parsing it after generation.

GLM-4.1V-Thinking replies as

    <think>\\n{reasoning}</think>\\n<answer>{answer}</answer>

An answer without reasoning gets an empty think block. Earlier assistant turns keep
the layout but drop their reasoning, both in training and in chat history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

LayoutName = Literal["think_answer", "none"]

_THINK = re.compile(r"<think>\n?(.*?)</think>\n?", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
THINK_ANSWER_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass(frozen=True)
class ParsedReply:
    reasoning: str
    answer: str


def split_reply(text: str) -> ParsedReply:
    """Split a reply into reasoning and answer, accepting a missing or unclosed block.

    >>> split_reply("<think>\\nhmm</think>\\n<answer>hi</answer>")
    ParsedReply(reasoning='hmm', answer='hi')
    >>> split_reply("plain")
    ParsedReply(reasoning='', answer='plain')
    """
    reasoning = ""
    think = _THINK.search(text)
    if think:
        reasoning = think.group(1)
        text = text[: think.start()] + text[think.end() :]
    elif text.startswith("<think>"):
        # The think block was never closed: reasoning runs up to an <answer> tag, if any.
        body = text[len("<think>") :].lstrip("\n")
        reasoning, tag, rest = body.partition("<answer>")
        if not tag:
            return ParsedReply(reasoning=reasoning, answer="")
        text = tag + rest
    answer = _ANSWER.search(text)
    return ParsedReply(reasoning=reasoning, answer=answer.group(1) if answer else text.strip())


def build_reply(layout: LayoutName, answer: str, reasoning: str = "") -> str:
    """Lay out an assistant reply for the chat template.

    An answer that already contains the layout is split first, so it is never wrapped twice.
    """
    if "<think>" in answer or "<answer>" in answer:
        parsed = split_reply(answer)
        answer, reasoning = parsed.answer, reasoning or parsed.reasoning
    if layout == "none":
        return answer
    return f"<think>\n{reasoning}</think>\n<answer>{answer}</answer>"


def detect_layout(tokenizer) -> LayoutName:
    """think_answer when every layout tag is a single token of the tokenizer, else none."""
    vocabulary = tokenizer.get_vocab()
    return "think_answer" if all(tag in vocabulary for tag in THINK_ANSWER_TOKENS) else "none"
