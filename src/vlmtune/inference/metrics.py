"""Metrics over generated replies: did the model learn to stop, to vary, to keep its layout and style.

Definitions (all shares are between 0 and 1):

- stop rate: replies that ended on a stop token before max_new_tokens.
- empty answers: replies with no answer text once the layout tags are read (a reply of
  empty think blocks, for one), which the stop rate counts as stopped.
- repetition: replies whose tail is a loop. The tail is the last 200 characters of the
  answer; it is a loop when, for some period p from 1 to 50 characters, at least 80% of
  the tail's characters equal the character p places earlier. Answers shorter than 40
  characters are never counted as loops.
- distinct-2: distinct character bigrams divided by all character bigrams, over the
  answers of all replies (whitespace removed). 1.0 means no bigram repeats.
- reply length: median and 95th percentile (nearest rank) of generated tokens.
- format validity: replies whose raw text is exactly `<think>…</think>` followed by
  `<answer>…</answer>`, for thinking layouts only.
- style: for each user-given regular expression, the share of answers it matches.

Against reference replies (`vlmtune predict` on data with replies), from sacrebleu, 0 to 100:

- BLEU: corpus BLEU-4 with sacrebleu's `zh` tokenizer, which splits Chinese into characters
  and tokenizes other text as the standard `13a` tokenizer does.
- chrF: character n-gram F-score (n up to 6, spaces ignored), which needs no word splitting.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass, field

from vlmtune.encoding.stats import percentile
from vlmtune.inference.generate import Reply

TAIL_CHARS = 200
MAX_PERIOD = 50
LOOP_THRESHOLD = 0.8
MIN_LOOP_CHARS = 40
_LAYOUT = re.compile(r"<think>\n?.*?</think>\n?<answer>.*?</answer>\s*", re.DOTALL)


def is_repetitive(answer: str) -> bool:
    """True when the answer's last 200 characters are mostly one repeated n-gram."""
    if len(answer) < MIN_LOOP_CHARS:
        return False
    tail = answer[-TAIL_CHARS:]
    for period in range(1, min(MAX_PERIOD, len(tail) // 2) + 1):
        matches = sum(tail[index] == tail[index - period] for index in range(period, len(tail)))
        if matches >= LOOP_THRESHOLD * len(tail):
            return True
    return False


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct character n-grams over all n-grams of the texts; 0.0 when there are none."""
    grams = []
    for text in texts:
        compact = "".join(text.split())
        grams.extend(compact[index : index + n] for index in range(len(compact) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def follows_layout(raw_text: str) -> bool:
    return _LAYOUT.fullmatch(raw_text) is not None


@dataclass
class ReplyMetrics:
    """Metrics over one set of replies; see the module docstring for the definitions."""

    replies: int
    stop_rate: float
    empty_rate: float
    repetition_rate: float
    distinct_2: float
    length_median: float
    length_p95: int
    format_validity: float | None
    style: dict[str, float] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Flat name -> value pairs for a tracker, without empty entries and the reply count, which never changes."""
        values = {
            key: value for key, value in asdict(self).items() if key not in ("style", "replies") and value is not None
        }
        values.update({f"style/{pattern}": share for pattern, share in self.style.items()})
        return values


def compute_metrics(replies: list[Reply], thinking_layout: bool, style_patterns: list[str]) -> ReplyMetrics:
    if not replies:
        raise ValueError("compute_metrics needs at least one reply")
    answers = [reply.answer for reply in replies]
    lengths = [reply.generated_tokens for reply in replies]
    count = len(replies)
    return ReplyMetrics(
        replies=count,
        stop_rate=sum(reply.stopped for reply in replies) / count,
        empty_rate=sum(not answer.strip() for answer in answers) / count,
        repetition_rate=sum(is_repetitive(answer) for answer in answers) / count,
        distinct_2=distinct_n(answers, 2),
        length_median=statistics.median(lengths),
        length_p95=percentile(lengths, 0.95),
        format_validity=sum(follows_layout(reply.text) for reply in replies) / count if thinking_layout else None,
        style={pattern: sum(bool(re.search(pattern, answer)) for answer in answers) / count for pattern in style_patterns},
    )


def reference_scores(answers: list[str], references: list[str]) -> dict[str, float | str]:
    """Score answers against their references: corpus BLEU and chrF, with sacrebleu's signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if not answers or len(answers) != len(references):
        raise ValueError(f"reference_scores needs one reference per answer, got {len(answers)} and {len(references)}")
    bleu, chrf = BLEU(tokenize="zh"), CHRF()
    return {
        "bleu": round(bleu.corpus_score(answers, [references]).score, 2),
        "chrf": round(chrf.corpus_score(answers, [references]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
