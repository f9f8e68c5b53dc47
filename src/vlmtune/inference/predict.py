"""Batch prediction over a dataset file, written as JSONL and resumable.

Each output line:

    {"id": "test.json, record 3 (line 9)", "prompt": "你是谁？", "images": [], "reference": "我是小橘喵~",
     "answer": "...", "reasoning": "", "generated_tokens": 17, "stopped": true,
     "finish_reason": "stop"}

finish_reason is "stop" for a reply that ended on a stop token and "length" for one
cut at max_new_tokens. Lines whose id is already in the output file are skipped, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from vlmtune.data.conversation import Conversation
from vlmtune.encoding.encode import conversation_for_generation
from vlmtune.errors import DataError
from vlmtune.inference.generate import Generator

logger = logging.getLogger(__name__)


def finished_ids(output_path: Path) -> set[str]:
    """Ids already written to the output file; a partly written last line is ignored."""
    if not output_path.is_file():
        return set()
    done = set()
    for line_number, line in enumerate(output_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            logger.warning("%s, line %d: not a complete prediction; it will be predicted again", output_path, line_number)
    return done


def example_id(conversation: Conversation) -> str:
    """Return the example's file name and record, e.g. `test.json, record 3 (line 9)`, which stays the same from any working folder."""
    path, separator, rest = conversation.source.partition(", record ")
    return f"{Path(path).name}{separator}{rest}" if separator else conversation.source


def _last_reply(conversation: Conversation) -> str | None:
    last = conversation.messages[-1] if conversation.messages else None
    return last.text if last is not None and last.role == "assistant" else None


def predict(
    generator: Generator,
    conversations: list[Conversation],
    output_path: str | Path,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
) -> int:
    """Generate a reply for every conversation not yet in the output file; returns how many were written."""
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(output)
    pending = [conversation for conversation in conversations if example_id(conversation) not in done]
    if done:
        logger.info("%d of %d examples are already in %s; predicting the other %d", len(conversations) - len(pending), len(conversations), output, len(pending))
    ids = [example_id(conversation) for conversation in pending]
    if len(set(ids)) != len(ids):
        raise DataError("two examples share an id (file and record); predict one file at a time")

    written = 0
    with open(output, "a", encoding="utf-8") as handle, tqdm(total=len(pending), desc="predict", unit="example") as progress:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            prompts = [conversation_for_generation(conversation) for conversation in batch]
            replies = generator.generate_batch(prompts, max_new_tokens)
            for conversation, prompt, reply in zip(batch, prompts, replies):
                row = {
                    "id": example_id(conversation),
                    "prompt": prompt.messages[-1].text if prompt.messages else "",
                    "images": [image.source for image in prompt.messages[-1].images] if prompt.messages else [],
                    "reference": _last_reply(conversation),
                    "answer": reply.answer,
                    "reasoning": reply.reasoning,
                    "generated_tokens": reply.generated_tokens,
                    "stopped": reply.stopped,
                    "finish_reason": "stop" if reply.stopped else "length",
                }
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            written += len(batch)
            progress.update(len(batch))
    return written
