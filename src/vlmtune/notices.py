"""Log lines that a process writes once, however many times their cause comes up."""

from __future__ import annotations

import logging
from typing import Any

_logged: set[str] = set()


def log_once(logger: logging.Logger, level: int, message: str, *args: Any) -> None:
    """Log the message unless this process has logged the same text before (each sample generation
    builds its own encoder, for one, and each would repeat the encoder's notes)."""
    text = message % args if args else message
    if text not in _logged:
        _logged.add(text)
        logger.log(level, text)
