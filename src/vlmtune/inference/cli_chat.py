"""The terminal chat loop behind `vlmtune chat`."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console

from vlmtune.config import GenerationSettings, ModelSettings
from vlmtune.data.validate import check_image_file
from vlmtune.encoding.images import load_image
from vlmtune.errors import ConfigError, ModelError, VlmtuneError
from vlmtune.inference.chat import ChatSession
from vlmtune.inference.export import MERGED_CONFIG_NAME, MERGED_MANIFEST_NAME, recorded_system_prompt, training_config_path
from vlmtune.inference.generate import Generator, Reply
from vlmtune.model.loading import adapter_base_model, check_adapter_folder, load_adapter, load_model, resolve_device

logger = logging.getLogger(__name__)

HELP = """commands:
  /image PATH_OR_URL   attach an image to your next message (repeat for several)
  /system [TEXT]       show the system prompt, or set it ('' for none; clears the history)
  /clear               forget the conversation so far
  /exit                quit (Ctrl-D, or Ctrl-C at the prompt, works too)
Ctrl-C while a reply is generated stops it."""


def check_image_argument(image: str) -> str:
    """Fail early for a local image that does not exist or is not a picture; URLs are checked when loaded."""
    if image.startswith(("http://", "https://", "data:")):
        return image
    path = Path(image.removeprefix("file://")).expanduser()
    check_image_file(path, "")
    load_image(str(path))
    return str(path)


def _training_record(adapter: str | None, model: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the training run's config tree and manifest: the adapter's run folder, else a merged model's copies.

    A checkpoint-N folder has no config.yaml of its own, so its training run's folder is read.
    """
    candidates = []
    if adapter and (trained := training_config_path(adapter)) is not None:
        candidates.append((trained, trained.parent / "run_manifest.json"))
    if model:
        candidates.append((Path(model) / MERGED_CONFIG_NAME, Path(model) / MERGED_MANIFEST_NAME))
    for config_path, manifest_path in candidates:
        if config_path.is_file():
            tree = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
            manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
            return tree, manifest
    return {}, {}


def trained_data_settings(adapter: str | None, model: str | None = None) -> dict[str, Any]:
    """Read the data section of the training config: the adapter's config.yaml, else a merged model's copy."""
    return _training_record(adapter, model)[0].get("data") or {}


def trained_system_prompt(adapter: str | None, model: str | None = None) -> str | None:
    """Return the system prompt the adapter or merged model was trained with (see export.recorded_system_prompt).

    Logs how the training examples' system prompts differed, if they did: a warning, unless the
    prompt used is the one most examples had.
    """
    config, manifest = _training_record(adapter, model)
    prompt, note = recorded_system_prompt(config, manifest)
    if note:
        most_common = (manifest.get("system_prompts") or {}).get("most_common")
        log = logger.info if prompt is not None and prompt == most_common else logger.warning
        log("%s; replies use %s unless you set another", note, repr(prompt) if prompt else "no system prompt")
    return prompt


def system_prompt_for(system: str | None, adapter: str | None, model: str | None = None) -> str | None:
    """Return the --system value ("" for none), else the system prompt the adapter or merged model was trained with."""
    if system is not None:
        return system or None
    trained = trained_system_prompt(adapter, model)
    if trained:
        logger.info("using the system prompt of the training run (pass --system to change it)")
    return trained


def load_generator(
    model: str | None, adapter: str | None, hub: str, generation: dict[str, Any], thinking: str, device: str
) -> Generator:
    """Load the base model, attach the adapter if given, and wrap both in a Generator.

    With an adapter, or a merged model that `vlmtune export` wrote, the reply layout and image
    pixel limits of the training run are reused, so chat renders prompts exactly as training did.
    """
    try:
        settings = GenerationSettings(**generation)
    except ValidationError as error:
        problems = [f"--{str(item['loc'][0]).replace('_', '-')}: {item['msg']}" for item in error.errors()]
        raise ConfigError("invalid generation options: " + "; ".join(problems)) from None
    if adapter:
        check_adapter_folder(adapter)
        if model is not None:
            _warn_if_merged_twice(model, adapter)
    option = "--model"
    if model is None:
        model = adapter_base_model(adapter) if adapter else None
        if model is None:
            raise ModelError("--model is required unless --adapter names a folder whose adapter_config.json records its base model")
        option = f"the base model that {adapter}/adapter_config.json records (pass --model to use another)"
    resolve_device(device)  # an unavailable device fails here, before the model loads
    try:
        model_settings = ModelSettings(name_or_path=model, hub=hub, device=device)
    except ValidationError as error:  # a hub prefix that contradicts --hub
        raise ConfigError(f"--model: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    try:
        loaded = load_model(model_settings)
    except ModelError as error:  # its message names the config key, and here the model came from an option
        raise ModelError(str(error).replace("model.name_or_path", option, 1).replace("model.hub", "--hub")) from None
    if adapter:
        loaded = load_adapter(loaded, adapter)
    trained = trained_data_settings(adapter, model)
    if thinking == "auto" and trained.get("thinking"):
        thinking = trained["thinking"]
    return Generator(
        loaded,
        settings,
        thinking=thinking,
        min_pixels=trained.get("min_pixels"),
        max_pixels=trained.get("max_pixels"),
    )


def _warn_if_merged_twice(model: str, adapter: str) -> None:
    """Warn when --model is a vlmtune-merged model and the adapter was not trained on it, as it may be merged in already."""
    merged = Path(model).expanduser()
    if not (merged / MERGED_CONFIG_NAME).is_file():
        return
    base = adapter_base_model(adapter)
    if base is not None and Path(base).expanduser().resolve() == merged.resolve():
        return  # an adapter trained on top of the merged model
    logger.warning(
        "--model %s is a merged model (it has %s) and the adapter %s was trained on %s, not on it. If the merged "
        "model contains this adapter, it now applies twice; pass its base model with --model, or drop --adapter",
        model, MERGED_CONFIG_NAME, adapter, base or "another model",
    )


def cut_off_notice(max_new_tokens: int) -> str:
    """Return the marker shown after a reply that reached the token limit without a stop token."""
    return f"[reply cut off: it reached max_new_tokens={max_new_tokens} without a stop token]"


INTERRUPTED_NOTICE = "[reply stopped with Ctrl-C; the history keeps the part above. Ctrl-C at the prompt quits]"


def print_reply_end(
    console: Console, reply: Reply, max_new_tokens: int, show_thinking: bool, interrupted: bool = False
) -> None:
    """Print the markers after a reply: reasoning only, an empty answer, or a reply cut off by the limit or by Ctrl-C."""
    console.print()
    if not reply.answer.strip() and reply.reasoning.strip() and not show_thinking:
        console.print("[the reply contains reasoning only; pass --show-thinking to see it]", style="yellow", markup=False)
    elif not reply.answer.strip():
        console.print("[the reply's answer is empty]", style="yellow", markup=False)
    if reply.stopped:
        return
    if interrupted:
        console.print(INTERRUPTED_NOTICE, style="yellow", markup=False, highlight=False)
    else:
        console.print(cut_off_notice(max_new_tokens), style="yellow", markup=False, highlight=False)


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """Make Ctrl-C (SIGINT) set `event` inside the block instead of raising KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    images = [check_image_argument(image) for image in images]
    generator = load_generator(model, adapter, hub, generation, thinking, device)
    show_thinking = generator.settings.show_thinking
    session = ChatSession(generator, system_prompt=system_prompt_for(system, adapter, model))
    max_new_tokens = generator.settings.max_new_tokens

    def show(text: str) -> None:
        console.print(text, end="", markup=False, highlight=False)

    if message is not None:
        reply = session.ask(message, images, on_text=show)
        print_reply_end(console, reply, max_new_tokens, show_thinking)
        return

    console.print("vlmtune chat. Type /help for commands.")
    # --image without --message: the images go with the first message, as if attached with /image.
    pending_images: list[str] = list(images)
    if pending_images:
        console.print(f"{len(pending_images)} image(s) attached to your next message")
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
        elif command == "/system" and not argument.strip():
            current = repr(session.system_prompt) if session.system_prompt else "none"
            console.print(f"system prompt: {current}. /system TEXT replaces it, /system '' removes it", markup=False)
        elif command == "/system":
            session.system_prompt = None if argument.strip() in ("''", '""') else argument
            session.clear()
            console.print(f"system prompt {'set' if session.system_prompt else 'removed'}; history cleared")
        elif command == "/image" and not argument.strip():
            console.print("usage: /image PATH_OR_URL (quote a path that has spaces)", markup=False)
        elif command == "/image":
            try:
                attached = [check_image_argument(image) for image in shlex.split(argument)]
            except ValueError as error:  # unbalanced quotes
                console.print(f"error: cannot read the image path {argument!r}: {error}", markup=False, soft_wrap=True)
                continue
            except VlmtuneError as error:
                console.print(f"error: {error}", markup=False, soft_wrap=True)
                continue
            pending_images.extend(attached)
            console.print(f"{len(pending_images)} image(s) attached to your next message")
        elif command.startswith("/"):
            console.print(f"unknown command {command!r}. Type /help for commands.", markup=False)
        else:
            console.print("[bold magenta]model>[/bold magenta] ", end="")
            interrupt = threading.Event()
            try:
                with ctrl_c_sets(interrupt):
                    reply = session.ask(line, pending_images, on_text=show, cancel=interrupt)
            except VlmtuneError as error:
                console.print(f"\nerror: {error}", markup=False, soft_wrap=True)
                continue
            finally:
                pending_images = []
            print_reply_end(console, reply, max_new_tokens, show_thinking, interrupted=interrupt.is_set())
