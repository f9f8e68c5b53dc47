"""The terminal chat loop behind `vlmtune chat`."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import yaml

from rich.console import Console

from vlmtune.config import GenerationSettings, ModelSettings
from vlmtune.errors import ModelError, VlmtuneError
from vlmtune.inference.chat import ChatSession
from vlmtune.inference.generate import Generator, Reply
from vlmtune.model.loading import adapter_base_model, load_adapter, load_model

logger = logging.getLogger(__name__)

HELP = """commands:
  /image PATH_OR_URL   attach an image to your next message (repeat for several)
  /system TEXT         set the system prompt (clears the history)
  /clear               forget the conversation so far
  /exit                quit (Ctrl-D works too)"""


def load_generator(
    model: str | None, adapter: str | None, hub: str, generation: dict[str, Any], thinking: str, device: str
) -> Generator:
    """Load the base model, attach the adapter if given, and wrap both in a Generator."""
    if model is None:
        model = adapter_base_model(adapter) if adapter else None
        if model is None:
            raise ModelError("--model is required unless --adapter names a folder whose adapter_config.json records its base model")
    loaded = load_model(ModelSettings(name_or_path=model, hub=hub, device=device))
    if adapter:
        loaded = load_adapter(loaded, adapter)
    return Generator(loaded, GenerationSettings(**generation), thinking=thinking)


def adapter_system_prompt(adapter: str) -> str | None:
    """Read the data.system_prompt the adapter was trained with from its config.yaml."""
    config_path = Path(adapter) / "config.yaml"
    if not config_path.is_file():
        return None
    tree = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    return (tree.get("data") or {}).get("system_prompt")


def print_reply_end(console: Console, reply: Reply, max_new_tokens: int) -> None:
    console.print()
    if not reply.stopped:
        notice = f"[reply cut off: it reached max_new_tokens={max_new_tokens} without a stop token]"
        console.print(notice, style="yellow", markup=False, highlight=False)


def run_chat(
    *,
    model: str | None,
    adapter: str | None,
    hub: str,
    message: str | None,
    images: list[str],
    system: str | None,
    generation: dict[str, Any],
    thinking: str,
    device: str,
    console: Console,
) -> None:
    generator = load_generator(model, adapter, hub, generation, thinking, device)
    if system is None and adapter:
        system = adapter_system_prompt(adapter)
        if system:
            logger.info("using the system prompt the adapter was trained with (pass --system to change it)")
    session = ChatSession(generator, system_prompt=system)
    max_new_tokens = generator.settings.max_new_tokens

    def show(text: str) -> None:
        console.print(text, end="", markup=False, highlight=False)

    if message is not None:
        reply = session.ask(message, images, on_text=show)
        print_reply_end(console, reply, max_new_tokens)
        return

    console.print("vlmtune chat. Type /help for commands.")
    pending_images: list[str] = []
    while True:
        try:
            line = console.input("[bold cyan]you>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command == "/exit":
            return
        if command == "/help":
            console.print(HELP, markup=False)
        elif command == "/clear":
            session.clear()
            console.print("history cleared")
        elif command == "/system":
            session.system_prompt = argument or None
            session.clear()
            console.print("system prompt set; history cleared")
        elif command == "/image":
            pending_images.extend(shlex.split(argument))
            console.print(f"{len(pending_images)} image(s) attached to your next message")
        elif command.startswith("/"):
            console.print(f"unknown command {command!r}. Type /help for commands.", markup=False)
        else:
            console.print("[bold magenta]model>[/bold magenta] ", end="")
            try:
                reply = session.ask(line, pending_images, on_text=show)
            except VlmtuneError as error:
                console.print(f"\nerror: {error}", markup=False)
                continue
            finally:
                pending_images = []
            print_reply_end(console, reply, max_new_tokens)
