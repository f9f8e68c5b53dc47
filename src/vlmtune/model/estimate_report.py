"""The `vlmtune estimate` report: the workload a config implies, the fit verdict and the setting changes that make a run fit."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from vlmtune.config import RunConfig
from vlmtune.model.estimate import GIB, MemoryEstimate, Workload, estimate_memory, image_tokens, load_model_config


MIN_LEVER_PIXELS = 28 * 28 * 64
"""Smallest image area the plan proposes: 64 merged patches on GLM-4.1V (a judgement call: smaller images carry little detail)."""


def with_change(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """Return a copy of the config with some keys of some sections changed."""
    updates = {name: getattr(config, name).model_copy(update=values) for name, values in sections.items()}
    return config.model_copy(update=updates)


@dataclass
class Lever:
    """One setting change of a memory plan and the estimate after it (and after the changes before it)."""

    overrides: list[str]
    """The change as `section.key=value` overrides, which `vlmtune train CONFIG` accepts."""
    note: str
    """The change's effect besides saving memory; empty when the overrides need no explanation."""
    estimate: MemoryEstimate
    config: RunConfig
    workload: Workload
    keeps_results: bool
    """Whether training computes the same thing after the change (up to rounding), only in another way."""

    @property
    def label(self) -> str:
        return " ".join(self.overrides) + (f" ({self.note})" if self.note else "")


@dataclass
class _Candidate:
    """A setting change before it is estimated: the changed keys by section, and the workload they give."""

    changes: dict[str, dict[str, Any]]
    note: str
    workload: Workload
    keeps_results: bool


def _lever_candidates(config: RunConfig, workload: Workload) -> list[_Candidate]:
    """List the setting changes that can lower a run's memory, each with the workload it gives."""
    candidates: list[_Candidate] = []
    if config.train.gradient_checkpointing is not True:
        candidates.append(_Candidate({"train": {"gradient_checkpointing": True}}, "", workload, True))
    if workload.batch_size > 1:
        half = workload.batch_size // 2
        accumulation = config.train.gradient_accumulation_steps * 2
        changes = {"train": {"per_device_train_batch_size": half, "gradient_accumulation_steps": accumulation}}
        candidates.append(_Candidate(changes, "same global batch", replace(workload, batch_size=half), True))
    if config.quantization.bits is None and not config.lora.train_merger:
        note = "QLoRA: 4-bit base weights, so results differ slightly"
        candidates.append(_Candidate({"quantization": {"bits": 4}}, note, workload, False))
    elif config.quantization.bits == 8:
        candidates.append(_Candidate({"quantization": {"bits": 4}}, "4-bit base weights", workload, False))
    if "8bit" not in config.train.optim:
        candidates.append(_Candidate({"train": {"optim": "paged_adamw_8bit"}}, "8-bit optimizer states", workload, False))
    if workload.sequence_length > 256:
        shorter = workload.sequence_length // 2
        note = "longer samples are trimmed or dropped, see data.on_overlength"
        candidates.append(_Candidate({"data": {"max_length": shorter}}, note, replace(workload, sequence_length=shorter), False))
    if workload.images_per_sample and workload.image_pixels and workload.image_pixels > MIN_LEVER_PIXELS:
        smaller = workload.image_pixels // 2
        note = "larger images are scaled down further"
        candidates.append(_Candidate({"data": {"max_pixels": smaller}}, note, replace(workload, image_pixels=smaller), False))
    return candidates


def _overrides(changes: dict[str, dict[str, Any]]) -> list[str]:
    """Write setting changes as `section.key=value` overrides, booleans in YAML's lower case."""
    return [
        f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
        for section, values in changes.items()
        for key, value in values.items()
    ]


def suggest_lever(
    config: RunConfig, model_config: PretrainedConfig, workload: Workload, estimate: MemoryEstimate
) -> Lever | None:
    """Find the next setting change of a plan; None when nothing lowers the estimate.

    Among the changes that make the run fit, one that keeps the training results wins (a smaller
    batch with more accumulation before QLoRA). When none fits alone, the biggest saving wins.
    """
    gib = estimate.gpu_bytes / GIB if estimate.gpu_bytes else None
    levers = []
    for candidate in _lever_candidates(config, workload):
        changed = with_change(config, **candidate.changes)
        result = estimate_memory(changed, model_config, candidate.workload, device=estimate.device, gpu_gib=gib)
        if result.total < estimate.total:
            overrides = _overrides(candidate.changes)
            levers.append(Lever(overrides, candidate.note, result, changed, candidate.workload, candidate.keeps_results))
    if not levers:
        return None
    fitting = [lever for lever in levers if lever.estimate.fits]
    if fitting:
        return min(fitting, key=lambda lever: (not lever.keeps_results, lever.estimate.total))
    return min(levers, key=lambda lever: lever.estimate.total)


def plan_levers(
    config: RunConfig, model_config: PretrainedConfig, workload: Workload, estimate: MemoryEstimate
) -> list[Lever]:
    """Return setting changes to apply in order, each chosen by suggest_lever, until the run fits or none helps.

    An empty list means no change lowers the estimate. When the last lever's estimate still
    does not fit, that estimate is the least memory these settings can reach.
    """
    plan: list[Lever] = []
    while estimate.fits is False:
        lever = suggest_lever(config, model_config, workload, estimate)
        if lever is None:
            break
        plan.append(lever)
        config, workload, estimate = lever.config, lever.workload, lever.estimate
    return plan


def estimate_as_dict(estimate: MemoryEstimate) -> dict[str, Any]:
    return {
        "items": [{"name": name, "bytes": size, "note": note} for name, size, note in estimate.items],
        "total_bytes": estimate.total,
        "gpu_bytes": estimate.gpu_bytes,
        "fits": estimate.fits,
    }


def write_estimate_json(report: EstimateReport, path: Path) -> None:
    """Write the estimate, and the setting changes to apply in order when it does not fit."""
    tree = estimate_as_dict(report.estimate)
    # Each change applies on top of the ones before it, so total_bytes is the estimate after all of them so far.
    tree["levers"] = [
        {"change": lever.label, "overrides": lever.overrides, "keeps_results": lever.keeps_results,
         "total_bytes": lever.estimate.total, "fits": lever.estimate.fits}
        for lever in report.levers
    ]
    tree["warnings"] = report.warnings
    path.write_text(json.dumps(tree, indent=2, ensure_ascii=False), encoding="utf-8")


@dataclass
class EstimateReport:
    """An estimate with the workload it assumed and the setting changes to apply when it does not fit."""

    estimate: MemoryEstimate
    workload: Workload
    model_name: str
    assumptions: list[str]
    levers: list[Lever] = field(default_factory=list)
    """The setting changes to apply, in order, when the run does not fit (see plan_levers)."""
    zero3: bool = False
    """The run already shards its weights with DeepSpeed ZeRO-3."""
    warnings: list[str] = field(default_factory=list)
    """Problems with the settings that the memory figures do not show."""


def run_estimate(config: RunConfig, *, images_per_sample: int = 1, device: str = "cuda", gpu_gib: float | None = 24.0) -> EstimateReport:
    """Estimate a run's memory from its config: the batch and max_length it sets, and its images."""
    model_config = load_model_config(config.model.name_or_path, config.model.trust_remote_code)
    assumptions = [f"every sample is data.max_length={config.data.max_length} tokens long (image tokens included)"]
    if config.train.deepspeed:
        assumptions.append(
            f"every process holds all weights, as in DDP; train.deepspeed={config.train.deepspeed} with ZeRO-3 "
            "shards the weights, so it needs less"
        )
    vision_config = getattr(model_config, "vision_config", None)
    pixels = config.data.max_pixels
    if vision_config is None:
        images_per_sample = 0
    elif images_per_sample and pixels is None:
        pixels = _processor_max_pixels(config.model.name_or_path)
        if pixels is not None:
            assumptions.append(
                f"data.max_pixels is unset: {pixels:,} pixels per image, the image processor's limit (an upper "
                "bound: smaller images take fewer)"
            )
        else:
            pixels = vision_config.image_size**2
            assumptions.append(
                f"data.max_pixels is unset: {pixels:,} pixels per image (vision image_size squared, because no local "
                "processor file gives the processor's limit); larger images need more. Set "
                "data.max_pixels to bound them"
            )
    workload = Workload(
        batch_size=config.train.per_device_train_batch_size,
        sequence_length=config.data.max_length,
        images_per_sample=images_per_sample,
        image_pixels=pixels,
    )
    estimate = estimate_memory(config, model_config, workload, device=device, gpu_gib=gpu_gib)
    report = EstimateReport(estimate, workload, config.model.name_or_path, assumptions, zero3=_zero_stage(config) == 3)
    if images_per_sample and vision_config is not None:
        image_total = images_per_sample * image_tokens(model_config, pixels)[1]
        if image_total >= config.data.max_length:
            report.warnings.append(
                f"{images_per_sample} image(s) of {pixels:,} pixels take {image_total:,} tokens, as many as "
                f"data.max_length={config.data.max_length} or more: training would drop every such sample. Raise "
                "data.max_length or lower data.max_pixels"
            )
    if estimate.fits is False:
        report.levers = plan_levers(config, model_config, workload, estimate)
    return report


def _zero_stage(config: RunConfig) -> int | None:
    """Return the ZeRO stage of the run's DeepSpeed file, or None without one (or without a readable stage)."""
    if not config.train.deepspeed:
        return None
    try:
        tree = json.loads(Path(config.train.deepspeed).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stage = (tree.get("zero_optimization") or {}).get("stage") if isinstance(tree, dict) else None
    return stage if isinstance(stage, int) else None


def _processor_max_pixels(name_or_path: str) -> int | None:
    """Return the largest image area (size.longest_edge) of a local model's image processor, if its files give one.

    transformers 5 saves the image processor inside processor_config.json; older folders have
    preprocessor_config.json.
    """
    folder = Path(name_or_path).expanduser()
    candidates = [
        (folder / "processor_config.json", lambda tree: tree.get("image_processor") or {}),
        (folder / "preprocessor_config.json", lambda tree: tree),
    ]
    for path, image_processor in candidates:
        if path.is_file():
            size = image_processor(json.loads(path.read_text(encoding="utf-8"))).get("size") or {}
            value = size.get("longest_edge") if isinstance(size, dict) else None
            if isinstance(value, int):
                return value
    return None


def estimate_table(report: EstimateReport):
    """Render the estimate as a rich table with the total and the fit verdict."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    estimate = report.estimate
    table = Table(title=f"Estimated training memory per device: {report.model_name}", title_justify="left")
    table.add_column("item")
    table.add_column("GiB", justify="right")
    table.add_column("how it is counted")
    for name, size, note in estimate.items:
        table.add_row(name, f"{size / GIB:.2f}", note)
    table.add_section()
    table.add_row("total", f"{estimate.total / GIB:.2f}", "")
    lines = [Text(f"assumes {item}") for item in report.assumptions]
    lines.extend(Text(f"warning: {item}", style="yellow") for item in report.warnings)
    if estimate.gpu_bytes is not None:
        verdict = "yes" if estimate.fits else "no"
        lines.append(Text(f"fits on a {estimate.gpu_bytes / GIB:g} GiB GPU: {verdict}", style="green" if estimate.fits else "red"))
    elif estimate.device == "cpu":
        lines.append(Text(_cpu_memory_line(estimate.total)))
    if estimate.fits is False:
        lines.extend(Text(line) for line in lever_lines(report.levers, estimate.gpu_bytes, sharded=report.zero3))
    return Group(table, *lines)


def lever_lines(levers: list[Lever], gpu_bytes: int, sharded: bool = False) -> list[str]:
    """Describe a plan of setting changes: what to change, in which order, and whether the run then fits.

    `sharded`: the run already shards its weights with ZeRO-3, so the lines do not suggest it.
    """
    gpu = f"{gpu_bytes / GIB:g} GiB"
    sharding = "" if sharded else ", or shard the weights over several GPUs with DeepSpeed ZeRO-3 (examples/deepspeed/zero3.json)"
    if not levers:
        return [f"no setting change lowers the estimate: use a GPU with more than {gpu}{sharding}"]
    first = levers[0]
    if len(levers) == 1 and first.estimate.fits:
        return [f"fits with one change: {first.label} -> {first.estimate.total / GIB:.2f} GiB"]
    last = levers[-1].estimate
    if last.fits:
        lines = ["one change is not enough; apply these in order:"]
    else:
        # This comes first, so that a reader does not apply the changes expecting the run to fit.
        lines = [
            f"no setting change makes the run fit on a {gpu} GPU: use a GPU with at least "
            f"{last.total / GIB:.2f} GiB{sharding}. These changes, in order, come closest:"
        ]
    for number, lever in enumerate(levers, start=1):
        lines.append(f"  {number}. {lever.label} -> {lever.estimate.total / GIB:.2f} GiB")
    if last.fits:
        lines.append(f"with these {len(levers)} changes the run fits on a {gpu} GPU")
    else:
        lines.append(f"even with all of them it needs {last.total / GIB:.2f} GiB, more than {gpu}")
    return lines


def _cpu_memory_line(total: int) -> str:
    """Compare a CPU run's estimate with this machine's physical memory, where the OS reports it."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # os.sysconf is missing on Windows
        physical = None
    line = "on CPU the total is tensor memory in RAM (Python and its libraries need more besides)"
    if physical is None or physical <= 0:
        return line
    return f"{line}: {total / physical:.0%} of this machine's {physical / GIB:.0f} GiB"
