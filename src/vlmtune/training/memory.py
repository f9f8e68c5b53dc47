"""Measuring the tensor memory a training step uses, on CPU or on a CUDA GPU."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def cpu_peak_bytes(step: Callable[[], object]) -> int:
    """Run step() and return the peak of CPU tensor memory it allocated above what existed before.

    torch.profiler with profile_memory=True records every allocation and free of the CPU
    allocator, in order; the peak of their running sum is the step's peak. Process RSS would
    mostly measure the libraries, not the tensors.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    current = peak = 0
    for event in events:
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def cuda_peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Run step() and return torch.cuda.max_memory_allocated during it (weights included)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
