"""Conversations -> encoded samples -> batches, through the processor's chat template."""

from vlmtune.encoding.collator import ChatCollator
from vlmtune.encoding.encode import (
    IGNORE_INDEX,
    ConversationEncoder,
    EncodedSample,
    encode_conversations,
    encode_with_policy,
)
from vlmtune.encoding.inspect import SelfCheck, check_sample, render_sample
from vlmtune.encoding.thinking import ParsedReply, build_reply, split_reply

__all__ = [
    "IGNORE_INDEX",
    "ChatCollator",
    "ConversationEncoder",
    "EncodedSample",
    "ParsedReply",
    "SelfCheck",
    "build_reply",
    "check_sample",
    "encode_conversations",
    "encode_with_policy",
    "render_sample",
    "split_reply",
]
