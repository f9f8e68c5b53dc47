"""Token-length statistics of encoded samples: a table, a terminal histogram and a PNG."""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 20


@dataclass(frozen=True)
class LengthStats:
    dataset: str
    count: int
    min: int
    median: float
    p95: int
    max: int
    over_max_length: int

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[int], fraction: float) -> int:
    """Return the nearest-rank percentile: the smallest value with `fraction` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def length_stats(lengths: dict[str, list[int]], max_length: int) -> list[LengthStats]:
    """Per-dataset statistics; a final row named "all" covers every dataset together."""
    groups = dict(lengths)
    if len(groups) > 1:
        groups["all"] = [length for values in lengths.values() for length in values]
    rows = []
    for dataset, values in groups.items():
        ordered = sorted(values)
        rows.append(
            LengthStats(
                dataset=dataset,
                count=len(ordered),
                min=ordered[0],
                median=statistics.median(ordered),
                p95=percentile(ordered, 0.95),
                max=ordered[-1],
                over_max_length=sum(value > max_length for value in ordered),
            )
        )
    return rows


def stats_table(rows: list[LengthStats], max_length: int) -> Table:
    table = Table(title=f"encoded example lengths in tokens, before data.on_overlength (data.max_length={max_length})")
    for column in ("dataset", "samples", "min", "median", "p95", "max", f"> {max_length}"):
        if column == "dataset":  # wrapped, not cut: names of one folder differ at their end
            table.add_column(column, justify="left", overflow="fold")
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row.dataset, str(row.count), str(row.min), f"{row.median:g}", str(row.p95), str(row.max), str(row.over_max_length))
    return table


def _bins(values: list[int]) -> tuple[list[int], list[int]]:
    """Cut [min, max] into at most HISTOGRAM_BINS bins of equal width (the last may be narrower)."""
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // HISTOGRAM_BINS))
    bins = -(-(high - low + 1) // width)
    edges = [low + width * index for index in range(bins)] + [high + 1]
    counts = [0] * bins
    for value in values:
        counts[(value - low) // width] += 1
    return edges, counts


def text_histogram(values: list[int], width: int = 40) -> str:
    """Draw a histogram of lengths as text bars, one line per bin."""
    edges, counts = _bins(values)
    peak = max(counts)
    lines = []
    for index, count in enumerate(counts):
        bar = "#" * round(width * count / peak) if peak else ""
        lines.append(f"{edges[index]:>6}-{edges[index + 1] - 1:<6} {count:>6} {bar}")
    return "\n".join(lines)


# Fonts with Chinese glyphs that matplotlib falls back to for dataset names, where installed.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")


def write_histogram_png(lengths: dict[str, list[int]], max_length: int, path: str | Path) -> Path:
    """Write a histogram per dataset with the max_length cut marked.

    Dataset names in Chinese are drawn with an installed CJK font. Without one, the legend
    numbers the datasets instead of drawing empty boxes, and the log lists the numbers.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager, pyplot

    installed = {font.name for font in font_manager.fontManager.ttflist}
    fallback = [name for name in CJK_FONTS if name in installed]
    labels = [Path(dataset).name for dataset in lengths]
    if not fallback and not all(label.isascii() for label in labels):
        numbered = [f"dataset {number}" for number in range(1, len(labels) + 1)]
        logger.info("no font with Chinese glyphs is installed, so the histogram's legend numbers the datasets: %s",
                    ", ".join(f"{number} = {label}" for number, label in zip(numbered, labels)))
        labels = numbered
    with matplotlib.rc_context({"font.family": ["DejaVu Sans", *fallback]}):
        figure, axis = pyplot.subplots(figsize=(8, 4.5))
        for label, values in zip(labels, lengths.values()):
            axis.hist(values, bins=40, alpha=0.6, label=label)
        axis.axvline(max_length, color="red", linestyle="--", label=f"max_length={max_length}")
        axis.set_xlabel("encoded sample length (tokens)")
        axis.set_ylabel("samples")
        axis.legend()
        figure.tight_layout()
        output = Path(path)
        figure.savefig(output, dpi=100)
        pyplot.close(figure)
    return output
