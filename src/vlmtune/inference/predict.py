"""Batch prediction over a dataset file, written as JSONL and resumable.

Each output line:

    {"id": "test.json, record 3 (line 9)", "model": "/models/GLM-4.1V-9B-Thinking",
     "adapter": "/runs/persona", "system": "你是小橘。", "history": [], "prompt": "你是谁？", "images": [],
     "reference": "我是小橘喵~", "answer": "...", "reasoning": "", "generated_tokens": 17, "stopped": true,
     "finish_reason": "stop"}

history holds the earlier turns of a multi-turn example as {"role", "content"} messages (text only).

model and adapter name what generated the reply: an absolute path for a local folder, else
the hub id as given (adapter is null without one). finish_reason is "stop" for a reply
that ended on a stop token and "length" for one cut at max_new_tokens.

When the data has replies, `NAME.scores.json` beside the output file gives the BLEU and chrF
of all its answers against those references (see inference.metrics).

Lines whose id is already in the output file are skipped, so an interrupted run continues
where it stopped. The id is the record's position in the data file, so before skipping, each
such line is checked against this run: a different model or adapter, a different system
prompt, or a prompt that no longer matches the record (the data file changed) stops the run
with an error instead of mixing replies in one file.
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
from vlmtune.inference.metrics import reference_scores
from vlmtune.outputs import probe_writable

logger = logging.getLogger(__name__)


def finished_rows(output_path: Path, log: bool = True) -> dict[str, tuple[int, dict]]:
    """Map each id already written to the output file to its line number and row; a partly written last line is ignored."""
    if not output_path.is_file():
        return {}
    done = {}
    for line_number, line in enumerate(output_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done[row["id"]] = (line_number, row)
        except (json.JSONDecodeError, KeyError, TypeError):
            if log:
                logger.warning("%s, line %d: not a complete prediction; it will be predicted again", output_path, line_number)
    return done


def score_predictions(output_path: Path) -> tuple[dict, Path] | None:
    """Score the answers in the output file against their references and write `NAME.scores.json` beside it.

    Returns the scores and the path written, or None when no row has a reference.
    """
    rows = [row for _, row in finished_rows(output_path, log=False).values() if row.get("reference")]
    if not rows:
        return None
    scores = {"examples": len(rows), **reference_scores([row["answer"] for row in rows], [row["reference"] for row in rows])}
    path = output_path.with_name(f"{output_path.stem}.scores.json")
    path.write_text(json.dumps(scores, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return scores, path


def cut_off_count(output_path: Path) -> tuple[int, int]:
    """Return how many rows of the output file end without a stop token (finish_reason "length"), and how many rows it has."""
    rows = [row for _, row in finished_rows(output_path, log=False).values()]
    return sum(not row.get("stopped", True) for row in rows), len(rows)


def end_last_line(output_path: Path) -> None:
    """Make the output file end with a newline, so the next row starts a line of its own.

    A run killed while writing leaves a partial last line, which is cut off (finished_rows
    skipped it, so its example is predicted again). A complete row that only lacks its
    newline, such as one after a hand edit, gets the newline.
    """
    if not output_path.is_file():
        return
    data = output_path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        complete = "id" in json.loads(data[start:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        complete = False
    if complete:
        with open(output_path, "ab") as handle:
            handle.write(b"\n")
        return
    with open(output_path, "r+b") as handle:
        handle.truncate(start)
    logger.warning("%s: removed the partly written last line (%d bytes)", output_path, len(data) - start)


def model_label(name: str | None) -> str | None:
    """Return how a row names a model or adapter: the absolute path of a local folder, else the hub id as given."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resume_mismatch(row: dict, expected: dict) -> str | None:
    """Return why a row already in the output file does not match the row this run would write, or None."""
    for key in ("model", "adapter"):
        if key not in row:
            return f"it records no {key}, so it may come from another model (an older vlmtune wrote it)"
        if row[key] != expected[key]:
            return (
                f"it was generated by model {row['model']!r} with adapter {row['adapter']!r}, "
                f"but this run uses model {expected['model']!r} with adapter {expected['adapter']!r}"
            )
    for key, cause in (("prompt", "the data file changed"), ("images", "the data file changed"),
                       ("system", "the system prompt (--system, the data or the adapter's run) changed")):
        if row.get(key) != expected[key]:
            written, current = _field_text(key, row.get(key)), _field_text(key, expected[key])
            return f"its {key} {written} differs from this run's {current}, so {cause} since it was written"
    return None


def _field_text(key: str, value) -> str:
    """Format a row field for a message: JSON, shortened, and (none) for a missing system prompt."""
    if key == "system" and value is None:
        return "(none)"
    return _shorten(json.dumps(value, ensure_ascii=False))


def example_id(conversation: Conversation) -> str:
    """Return the example's file name and record, e.g. `test.json, record 3 (line 9)`, which stays the same from any working folder."""
    path, separator, rest = conversation.source.partition(", record ")
    return f"{Path(path).name}{separator}{rest}" if separator else conversation.source


def _last_reply(conversation: Conversation) -> str | None:
    last = conversation.messages[-1] if conversation.messages else None
    return last.text if last is not None and last.role == "assistant" else None


def _prompt_fields(prompt: Conversation) -> dict:
    last = prompt.messages[-1] if prompt.messages else None
    first = prompt.messages[0] if prompt.messages else None
    history = [message for message in prompt.messages[:-1] if message.role != "system"]
    return {
        "system": first.text if first is not None and first.role == "system" else None,
        "history": [_history_entry(message) for message in history],
        "prompt": last.text if last is not None else "",
        "images": [image.source for image in last.images] if last is not None else [],
    }


def _history_entry(message) -> dict:
    """Return an earlier turn as a row records it: role and text, and its images where it has any."""
    entry = {"role": message.role, "content": message.text}
    if message.images:
        entry["images"] = [image.source for image in message.images]
    return entry


def check_output_file(output: Path) -> None:
    """Raise DataError unless --output can be written as a file, before any model is loaded.

    The file itself is created only with the first batch of replies, so a test file is written
    and removed beside it.
    """
    if output.is_dir():
        raise DataError(f"--output {output} is a folder; give a file path, e.g. {output / 'predictions.jsonl'}")
    try:
        probe_writable(output.parent)
    except OSError as error:
        raise DataError(f"--output {output}: cannot write there ({error.strerror or error}); choose a path you can write to") from None


def pending_examples(
    conversations: list[Conversation], output: Path, producer: dict[str, str | None], log: bool = True
) -> list[Conversation]:
    """Return the conversations the output file has no row for yet. With `log`, log how many are done and which lines are broken.

    Raises DataError when a row already there was generated by another model or adapter than
    producer names, for another prompt than its record's, or for an example not in `conversations`.
    """
    ids = [example_id(conversation) for conversation in conversations]
    if len(set(ids)) != len(ids):
        raise DataError("two examples share an id (file and record); predict one file at a time")
    done = finished_rows(output, log)
    known = set(ids)
    others = [example for example in done if example not in known]
    if others:
        line_number, _ = done[others[0]]
        raise DataError(
            f"--output {output} has {len(others)} row(s) for examples that --data does not contain (the first: "
            f"line {line_number}, {others[0]}). Resuming would mix the predictions of different data; pass a new "
            "--output file for each data file, or delete this one to predict every example again"
        )
    pending = []
    for example, conversation in zip(ids, conversations):
        if example not in done:
            pending.append(conversation)
            continue
        line_number, row = done[example]
        expected = {**producer, **_prompt_fields(conversation_for_generation(conversation))}
        problem = _resume_mismatch(row, expected)
        if problem is not None:
            raise DataError(
                f"--output {output}, line {line_number} ({example}): {problem}. Resuming would mix replies that do "
                "not belong together; pass a new --output file, or delete this one to predict every example again"
            )
    if done and pending and log:
        logger.info("%d of %d examples are already in %s; predicting the other %d", len(conversations) - len(pending), len(conversations), output, len(pending))
    return pending


def producer_labels(model: str | None, adapter: str | None) -> dict[str, str | None]:
    """Return the model and adapter fields of the rows this run writes."""
    return {"model": model_label(model), "adapter": model_label(adapter)}


def predict(
    generator: Generator,
    conversations: list[Conversation],
    output_path: str | Path,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    *,
    model: str | None = None,
    adapter: str | None = None,
) -> int:
    """Generate a reply for every conversation not yet in the output file; returns how many were written.

    model and adapter are the names the rows record (see the module docstring). Raises DataError when
    a row already in the output file was generated by another model or adapter, or for another prompt.
    """
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    producer = producer_labels(model, adapter)
    pending = pending_examples(conversations, output, producer)
    end_last_line(output)

    written = 0
    with tqdm(total=len(pending), desc="predict", unit="example", disable=None) as progress:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            prompts = [conversation_for_generation(conversation) for conversation in batch]
            replies = generator.generate_batch(prompts, max_new_tokens)
            # Opened per batch, after its replies exist, so a run that fails at once leaves no empty file.
            lines = []
            for conversation, prompt, reply in zip(batch, prompts, replies):
                row = {
                    "id": example_id(conversation),
                    **producer,
                    **_prompt_fields(prompt),
                    "reference": _last_reply(conversation),
                    "answer": reply.answer,
                    "reasoning": reply.reasoning,
                    "generated_tokens": reply.generated_tokens,
                    "stopped": reply.stopped,
                    "finish_reason": "stop" if reply.stopped else "length",
                }
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            # One write per batch, so an interrupt between batches leaves whole rows.
            with open(output, "a", encoding="utf-8") as handle:
                handle.write("".join(lines))
            written += len(batch)
            progress.update(len(batch))
    return written
