"""Logging filters for the CLI: bitsandbytes' optional CPU kernel lookup, and its per-call 8-bit warning."""

from __future__ import annotations

import logging

# Logger name -> start of the message that KernelLookupFilter drops from that logger.
KERNEL_LOOKUP_WARNINGS = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}


class KernelLookupFilter(logging.Filter):
    """Drop the warnings logged when bitsandbytes cannot fetch its optional CPU 4-bit kernel.

    Seen with bitsandbytes 0.50.2 and kernels 0.19.1 on a CPU with AVX512-BF16. Importing
    bitsandbytes (peft imports it whenever it is installed) calls `kernels.get_kernel` to load
    kernels-community/quantization-bitsandbytes from the Hugging Face Hub. When that fails (offline
    without the kernel cached, say), bitsandbytes warns and runs 4-bit matmuls on CPU with its own
    code, so the kernel only speeds up quantized runs on CPU. Other warnings of these loggers pass.

    NOTE: the lookup itself still runs: when online, bitsandbytes downloads the kernel into the
    Hugging Face cache on import. Neither package offers a switch to skip the lookup.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        start = KERNEL_LOOKUP_WARNINGS.get(record.name)
        return start is None or not record.getMessage().startswith(start)


def hide_kernel_lookup_warnings() -> None:
    """Add a KernelLookupFilter to each logger in KERNEL_LOOKUP_WARNINGS, once."""
    for name in KERNEL_LOOKUP_WARNINGS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, KernelLookupFilter) for existing in logger.filters):
            logger.addFilter(KernelLookupFilter())


# Logger name -> start of a message that OnceFilter lets through once per distinct text.
ONCE_WARNINGS = {
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast from",
}


class OnceFilter(logging.Filter):
    """Pass the first copy of each warning in ONCE_WARNINGS and drop the repeats.

    bitsandbytes 0.50.2 logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16
    during quantization" on every forward call of an 8-bit layer whose input is not float16, which
    is every call in an 8-bit run on CPU: over a thousand lines for three training steps of the
    tiny model. The first copy carries all the information. Other messages of these loggers pass unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        start = ONCE_WARNINGS.get(record.name)
        message = record.getMessage()
        if start is None or not message.startswith(start):
            return True
        key = (record.name, message)
        if key in self.seen:
            return False
        self.seen.add(key)
        record.msg = message + " (logged once; later copies are hidden)"
        record.args = None
        return True


def show_repeated_warnings_once() -> None:
    """Add a OnceFilter to each logger in ONCE_WARNINGS, once."""
    for name in ONCE_WARNINGS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, OnceFilter) for existing in logger.filters):
            logger.addFilter(OnceFilter())
