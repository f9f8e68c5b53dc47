"""The Chat tab's model side: one loaded base model, switchable adapters, streamed turns.

The page keeps a list of turns per browser session. Each turn stores the user's text and
images and the reply of each side ("adapter" or "base"), so regenerate and undo only edit
the list, and each side's history is rebuilt from it for the next request.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vlmtune.config import GenerationSettings, ModelSettings
from vlmtune.data.conversation import ImagePart, Message, TextPart
from vlmtune.errors import ModelError
from vlmtune.inference.chat import ChatSession
from vlmtune.inference.cli_chat import trained_data_settings, trained_system_prompt
from vlmtune.inference.generate import Generator, Reply
from vlmtune.model.loading import LoadedModel, adapter_fit_errors, load_adapter, load_model

logger = logging.getLogger(__name__)

ADAPTER_SIDE = "adapter"
BASE_SIDE = "base"


@dataclass
class SideReply:
    """One side's reply to a turn, as far as it has streamed."""

    answer: str = ""
    reasoning: str = ""
    stopped: bool = True
    done: bool = False
    max_new_tokens: int = 0
    interrupted: bool = False
    """True when the user stopped the reply before it ended."""


@dataclass
class Turn:
    text: str
    images: list[str] = field(default_factory=list)
    replies: dict[str, SideReply] = field(default_factory=dict)


def side_history(turns: list[Turn], side: str) -> list[Message]:
    """Rebuild one side's chat history (user messages and that side's answers) from the turns."""
    messages: list[Message] = []
    for turn in turns:
        messages.append(Message("user", [*(ImagePart(image) for image in turn.images), TextPart(turn.text)]))
        reply = turn.replies.get(side)
        if reply is not None:
            messages.append(Message("assistant", [TextPart(reply.answer)], reasoning=reply.reasoning))
    return messages


class ChatBackend:
    """One base model shared by every page session, with adapters attached by peft on request.

    Adapters stay loaded once attached; switching selects another with `set_adapter`, and
    the base model is served from the same weights inside peft's `disable_adapter()`.
    Generation is serialized by a lock, because the weights are shared.
    """

    def __init__(self, model: str, hub: str = "auto", device: str = "auto"):
        self.base_name = model
        self.loaded: LoadedModel = load_model(ModelSettings(name_or_path=model, hub=hub, device=device))
        self._adapter_names: dict[str, str] = {}
        self.adapter: str | None = None
        self.lock = threading.Lock()

    def use_adapter(self, adapter: str | None) -> None:
        """Select an adapter folder, attaching it on first use; None selects the base model."""
        with self.lock:
            if not adapter:
                self.adapter = None
                return
            if adapter not in self._adapter_names:
                self._attach(adapter)
            self.loaded.model.set_adapter(self._adapter_names[adapter])
            self.adapter = adapter
            logger.info("chat uses adapter %s", adapter)

    def _attach(self, adapter: str) -> None:
        if not self._adapter_names:
            self.loaded = load_adapter(self.loaded, adapter)
            self._adapter_names[adapter] = "default"
            return
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelError(f"adapter: no adapter_config.json in {adapter}; choose a folder from the adapter list")
        name = f"adapter_{len(self._adapter_names)}"
        with adapter_fit_errors(adapter, self.loaded.path):
            self.loaded.model.load_adapter(adapter, adapter_name=name)
        self._adapter_names[adapter] = name
        logger.info("attached adapter %s", adapter)

    def trained_system_prompt(self) -> str | None:
        """Return the system prompt the selected adapter (or a merged model) was trained with, if it recorded one."""
        return trained_system_prompt(self.adapter, self.base_name)

    def generator(self, settings: GenerationSettings) -> Generator:
        """Build a generator with the selected adapter's reply layout and pixel limits."""
        trained = trained_data_settings(self.adapter, self.base_name)
        return Generator(
            self.loaded,
            settings,
            thinking=trained.get("thinking") or "auto",
            min_pixels=trained.get("min_pixels"),
            max_pixels=trained.get("max_pixels"),
        )

    @contextlib.contextmanager
    def side(self, side: str) -> Iterator[None]:
        """Run the block with the adapter on (adapter side) or off (base side)."""
        peft_model = self.loaded.model if self._adapter_names else None
        if side == ADAPTER_SIDE and self.adapter is not None:
            yield
        elif peft_model is not None:
            with peft_model.disable_adapter():
                yield
        else:
            yield

    def stream_turn(
        self,
        turns: list[Turn],
        side: str,
        settings: GenerationSettings,
        system_prompt: str | None,
        cancel: threading.Event | None = None,
    ) -> Iterator[SideReply]:
        """Generate the last turn's reply on one side, yielding it as it grows; the last yield has done=True.

        Setting `cancel` stops the reply after the current token. Errors from generation are
        raised in the caller's thread.
        """
        turn = turns[-1]
        reply = SideReply(max_new_tokens=settings.max_new_tokens)
        turn.replies[side] = reply
        updates: queue.Queue[Any] = queue.Queue()

        def on_parts(reasoning: str, answer: str) -> None:
            updates.put((reasoning, answer))

        def run() -> None:
            try:
                with self.lock, self.side(side):
                    session = ChatSession(
                        self.generator(settings), system_prompt=system_prompt, history=side_history(turns[:-1], side)
                    )
                    updates.put(session.ask(turn.text, turn.images, on_parts=on_parts, cancel=cancel))
            except Exception as error:  # re-raised in the caller's thread below
                updates.put(error)

        threading.Thread(target=run, daemon=True).start()
        while True:
            item = updates.get()
            if isinstance(item, Exception):
                del turn.replies[side]
                raise item
            if isinstance(item, Reply):
                reply.answer, reply.reasoning, reply.stopped, reply.done = item.answer, item.reasoning, item.stopped, True
                reply.interrupted = not item.stopped and cancel is not None and cancel.is_set()
                yield reply
                return
            reply.reasoning, reply.answer = item
            yield reply
