"""Sample generations on fixed prompts, their metrics, and reports comparing runs."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from rich.table import Table

from vlmtune.config import DataSettings, DatasetSpec, EvalPrompt, GenerationSettings, RunConfig
from vlmtune.data.conversation import Conversation, ImagePart, Message, TextPart
from vlmtune.data.loading import load_data, load_dataset_file
from vlmtune.encoding.collator import ChatCollator
from vlmtune.encoding.encode import IGNORE_INDEX, ConversationEncoder, conversation_for_generation, encode_conversations
from vlmtune.errors import ConfigError, ModelError
from vlmtune.inference.export import MERGED_CONFIG_NAME
from vlmtune.inference.generate import Generator
from vlmtune.inference.metrics import ReplyMetrics, compute_metrics, follows_layout
from vlmtune.model.loading import LoadedModel, check_adapter_folder, load_adapter, load_model

logger = logging.getLogger(__name__)

REPORT_NAME = "eval_report"
ADAPTER_REPORTS = "eval"
"""Folder inside an adapter folder for `vlmtune eval --adapter` reports."""
MERGED_REPORTS = "eval_merged"
"""Folder, inside the training run's output folder or else the working folder, for `vlmtune eval --merged` reports."""


@dataclass
class EvalRun:
    """Replies of one model state (base, adapter, or a training step) to the fixed prompts."""

    label: str
    step: int | None
    metrics: ReplyMetrics
    samples: list[dict]
    loss: float | None = None
    """Mean loss per supervised token on the evaluated data's replies (`vlmtune eval`), or None."""
    loss_data: str | None = None
    """The data that the loss was measured on: the file given with --data, or the validation or training data."""


def build_prompts(
    conversations: list[Conversation], count: int, extra: list[EvalPrompt], system: str | None
) -> tuple[list[Conversation], list[str | None]]:
    """Return the prompts (data conversations without their last reply, then the extra
    prompts) and each prompt's reference reply (None for the extra prompts)."""
    prompts = [conversation_for_generation(conversation) for conversation in conversations[:count]]
    references: list[str | None] = [
        conversation.messages[-1].text if conversation.messages[-1].role == "assistant" else None
        for conversation in conversations[:count]
    ]
    for number, prompt in enumerate(extra):
        content = [ImagePart(image) for image in prompt.images] + [TextPart(prompt.text)]
        messages = [Message("system", [TextPart(system)])] if system else []
        prompts.append(Conversation([*messages, Message("user", content)], source=f"evaluation.prompts[{number}]"))
        references.append(None)
    return prompts, references


def _prompt_text(conversation: Conversation) -> str:
    """Return the last user message's text, marked when images came with it, e.g. `[1 image] 这是什么？`."""
    message = conversation.messages[-1]
    count = len(message.images)
    if not count:
        return message.text
    return f"[{count} image{'s' if count > 1 else ''}] {message.text}"


def run_evaluation(
    generator: Generator,
    prompts: list[Conversation],
    label: str,
    style_patterns: list[str],
    max_new_tokens: int,
    references: list[str | None] | None = None,
    step: int | None = None,
    cancel: threading.Event | None = None,
) -> EvalRun | None:
    """Generate one reply per prompt (greedy unless the generation settings enable sampling) and score them.

    Setting `cancel` stops the reply being generated after its current token and returns None:
    the replies are incomplete, so they are not scored.
    """
    replies = []
    for prompt in prompts:
        replies.append(generator.generate(prompt, max_new_tokens=max_new_tokens, cancel=cancel))
        if cancel is not None and cancel.is_set():
            return None
    samples = []
    for index, (prompt, reply) in enumerate(zip(prompts, replies)):
        samples.append(
            {
                "prompt": _prompt_text(prompt),
                # The model also saw these earlier user turns and their replies.
                "earlier_turns": sum(message.role == "user" for message in prompt.messages[:-1]),
                "reference": references[index] if references and index < len(references) else None,
                "answer": reply.answer,
                "reasoning": reply.reasoning,
                "generated_tokens": reply.generated_tokens,
                "stopped": reply.stopped,
                "text": reply.text,
                # Per reply, the check that the format validity metric averages (None without the think/answer layout).
                "follows_layout": follows_layout(reply.text) if generator.layout == "think_answer" else None,
            }
        )
    metrics = compute_metrics(replies, generator.layout == "think_answer", style_patterns)
    logger.info(
        "%s: stop rate %.2f, repetition %.2f, distinct-2 %.2f, median length %g tokens",
        label, metrics.stop_rate, metrics.repetition_rate, metrics.distinct_2, metrics.length_median,
    )
    return EvalRun(label, step, metrics, samples)


METRIC_ROWS = [
    ("stop rate", "stop_rate", "{:.2f}"),
    ("empty answers", "empty_rate", "{:.2f}"),
    ("repetition", "repetition_rate", "{:.2f}"),
    ("distinct-2", "distinct_2", "{:.2f}"),
    ("median length (tokens)", "length_median", "{:g}"),
    ("p95 length (tokens)", "length_p95", "{:d}"),
    ("format validity", "format_validity", "{:.2f}"),
]


def _metric_rows(runs: list[EvalRun]) -> list[list[str]]:
    rows = []
    for name, attribute, form in METRIC_ROWS:
        values = [getattr(run.metrics, attribute) for run in runs]
        if all(value is None for value in values):
            continue
        rows.append([name, *("-" if value is None else form.format(value) for value in values)])
    for pattern in runs[0].metrics.style:
        rows.append([f"style {pattern}", *(f"{run.metrics.style.get(pattern, 0):.2f}" for run in runs)])
    if any(run.loss is not None for run in runs):
        data = next((run.loss_data for run in runs if run.loss_data), "the data")
        rows.append([f"loss on the replies of {data}", *("-" if run.loss is None else f"{run.loss:.3f}" for run in runs)])
    return rows


METRIC_NOTES = (
    "Stop rate: replies that ended on a stop token. Empty answers: replies with no answer text. "
    "Repetition: replies whose last 200 characters "
    "repeat with a period of 1 to 50 characters for 80% of them. Distinct-2: distinct character "
    "bigrams over all bigrams."
)
FORMAT_NOTE = "Format validity: replies in the exact <think>…</think><answer>…</answer> layout."
STYLE_NOTE = "Style: replies matching each pattern."
LOSS_NOTE = "Loss: mean cross-entropy per supervised token of the data's replies, the tokens that training supervises."


def metric_notes(runs: list[EvalRun]) -> str:
    """Return the notes on the metrics that the table shows."""
    notes = [METRIC_NOTES]
    if any(run.metrics.format_validity is not None for run in runs):
        notes.append(FORMAT_NOTE)
    if runs[0].metrics.style:
        notes.append(STYLE_NOTE)
    if any(run.loss is not None for run in runs):
        notes.append(LOSS_NOTE)
    return " ".join(notes)


def _markdown_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: tags escaped, one line, pipes escaped."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return escaped.replace("\n", "<br>") or "(empty)"


def comparison_table(runs: list[EvalRun]) -> Table:
    table = Table(title=f"sample generations ({runs[0].metrics.replies} prompts)")
    table.add_column("metric")
    for run in runs:
        table.add_column(run.label, justify="right")
    for row in _metric_rows(runs):
        table.add_row(*row)
    return table


def write_report(runs: list[EvalRun], folder: str | Path) -> tuple[Path, Path]:
    """Write eval_report.json (metrics and replies) and eval_report.md (the comparison table)."""
    output = Path(folder)
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / f"{REPORT_NAME}.json"
    payload = [
        {
            "label": run.label, "step": run.step, "metrics": asdict(run.metrics), "loss": run.loss, "loss_data": run.loss_data,
            "samples": run.samples,
        }
        for run in runs
    ]
    json_path.write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")

    header = "| metric | " + " | ".join(run.label for run in runs) + " |"
    lines = [f"# Sample generations ({runs[0].metrics.replies} prompts)", "", header, "|" + "---|" * (len(runs) + 1)]
    lines += ["| " + " | ".join(row) + " |" for row in _metric_rows(runs)]
    lines += ["", metric_notes(runs), ""]
    for run in (runs[0], runs[-1]) if len(runs) > 1 else runs:
        lines += [f"## Replies: {run.label}", "", "| prompt | reply | tokens | ending |", "|---|---|---|---|"]
        for sample in run.samples:
            ending = "stopped" if sample["stopped"] else "cut off"
            earlier = sample.get("earlier_turns", 0)
            history = f"(after {earlier} earlier turn{'s' if earlier > 1 else ''}) " if earlier else ""
            lines.append(
                f"| {history}{_markdown_cell(sample['prompt'])} | {_markdown_cell(sample['answer'])} | "
                f"{sample['generated_tokens']} | {ending} |"
            )
        lines.append("")
    markdown_path = output / f"{REPORT_NAME}.md"
    markdown_path.write_text("\n".join(lines), encoding="utf-8")
    return json_path, markdown_path


def default_report_dir(adapter: str | None, merged: str | None) -> Path:
    """Return where `vlmtune eval` writes its report when --output is not given.

    An adapter's report goes into ADAPTER/eval. A merged model folder stays free of reports,
    because users copy and upload it: its report goes beside the training run it came from,
    RUN/eval_merged/NAME, else into eval_merged/NAME under the working folder. The run is the
    folder named by train.output_dir in the merged model's vlmtune_config.yaml, and it counts
    only while its config.yaml is still that same file.
    """
    if adapter is not None:
        return Path(adapter) / ADAPTER_REPORTS
    merged_dir = Path(merged)
    name = merged_dir.resolve().name
    run_dir = _training_run_of(merged_dir)
    if run_dir is not None:
        logger.info("the merged model was exported from the training run in %s; writing the report there", run_dir)
        return run_dir / MERGED_REPORTS / name
    return Path(MERGED_REPORTS) / name


def _training_run_of(merged_dir: Path) -> Path | None:
    """Return the output folder of the training run that the merged model was exported from, if it still contains that run."""
    saved = merged_dir / MERGED_CONFIG_NAME
    if not saved.is_file():
        return None
    text = saved.read_text(encoding="utf-8")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    train = tree.get("train") if isinstance(tree, dict) else None
    output_dir = train.get("output_dir") if isinstance(train, dict) else None
    if not isinstance(output_dir, str):
        return None
    # A relative train.output_dir is relative to the folder training ran in, assumed to be the working folder.
    run_config = Path(output_dir) / "config.yaml"
    if not run_config.is_file() or run_config.read_text(encoding="utf-8") != text:
        logger.info(
            "the merged model's training run was not found: train.output_dir %s is missing or contains another run now; "
            "writing the report under the working folder",
            output_dir,
        )
        return None
    return Path(output_dir)


def reply_loss(
    loaded: LoadedModel, conversations: list[Conversation], data: DataSettings, batch_size: int = 4, name: str = "the data"
) -> float | None:
    """Return the mean loss per supervised token on the replies of the conversations that end with one, or None.

    `name` names the data in the log line.
    """
    with_replies = [conversation for conversation in conversations if conversation.messages[-1].role == "assistant"]
    if not with_replies:
        return None
    encoder = ConversationEncoder.from_settings(loaded.processor, loaded.stop_token_ids, data)
    samples = encode_conversations(encoder, with_replies, data).samples
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.stop_token_ids[0]
    collator = ChatCollator(pad_token_id=pad, pixel_loader=encoder.pixel_values)
    model = loaded.model
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            batch = collator(samples[start : start + batch_size])
            batch = {key: value.to(model.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            # The model's loss is the mean over the batch's supervised tokens, which are the labels after the first.
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**batch).loss.item() * count
            tokens += count
    model.train(was_training)
    if not tokens:
        return None
    logger.info("loss on the replies of %d example(s) of %s: %.3f", len(samples), name, total / tokens)
    return total / tokens


def evaluate_against_base(
    config: RunConfig,
    adapter: str | None = None,
    merged: str | None = None,
    data_path: str | None = None,
    count: int | None = None,
) -> list[EvalRun]:
    """Score the base model and then the adapter (or a merged model) on the same prompts."""
    if (adapter is None) == (merged is None):
        raise ConfigError("pass exactly one of --adapter or --merged")
    if adapter is not None:
        check_adapter_folder(adapter)
    elif not Path(merged).is_dir():
        raise ModelError(f"--merged: folder not found: {merged}")
    if data_path is not None:
        conversations = load_dataset_file(
            DatasetSpec(path=data_path), config.data.system_prompt, config.data.on_invalid, prompts_only=True,
            skip_hint="add data.on_invalid=skip to the command",
        )
        loss_data = data_path
    else:
        data = load_data(config.data)
        conversations = data.validation or data.train
        loss_data = "the validation data" if data.validation else "the training data"
    evaluation = config.evaluation
    limit = count if count is not None else evaluation.num_data_prompts
    prompts, references = build_prompts(conversations, limit, evaluation.prompts, config.data.system_prompt)
    if not prompts:
        raise ConfigError("no prompts to evaluate: raise --count or evaluation.num_data_prompts, or add evaluation.prompts")

    data_settings = config.data
    settings = GenerationSettings(**{**config.generation.model_dump(), "max_new_tokens": evaluation.max_new_tokens})

    def score(loaded: LoadedModel, label: str) -> EvalRun:
        generator = Generator(
            loaded, settings, data_settings.thinking, data_settings.min_pixels, data_settings.max_pixels
        )
        run = run_evaluation(generator, prompts, label, evaluation.style_patterns, evaluation.max_new_tokens, references)
        run.loss = reply_loss(loaded, conversations, data_settings, name=loss_data)
        run.loss_data = loss_data
        return run

    base = load_model(config.model)
    runs = [score(base, "base")]
    if adapter is not None:
        runs.append(score(load_adapter(base, adapter), "adapter"))
    else:
        runs.append(score(load_model(config.model.model_copy(update={"name_or_path": merged, "hub": "local"})), "merged"))
    return runs
