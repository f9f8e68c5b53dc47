"""The Chat tab: streamed replies with images, a collapsed thinking block and a compare mode."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator

import gradio as gr

from vlmtune.config import GenerationSettings
from vlmtune.errors import VlmtuneError
from vlmtune.inference.cli_chat import cut_off_notice
from vlmtune.webui.adapters import adapter_choices, find_adapters
from vlmtune.webui.chat import ADAPTER_SIDE, BASE_SIDE, ChatBackend, SideReply, Turn

logger = logging.getLogger(__name__)

THINKING_TITLE = "Thinking · 思考"
STOPPED_NOTICE = "[reply stopped with the Stop button]"


def reply_messages(reply: SideReply) -> list[dict[str, Any]]:
    """Render one reply as Chatbot messages: the answer, then the reasoning as a collapsed thought."""
    answer = reply.answer
    if reply.done and not answer.strip() and reply.reasoning.strip():
        answer = "*(the reply contains reasoning only; open the thinking block below)*"
    elif reply.done and not answer.strip():
        answer = "*(the reply is empty)*"
    if reply.interrupted:
        answer += f"\n\n*{STOPPED_NOTICE}*"
    elif reply.done and not reply.stopped:
        answer += f"\n\n*{cut_off_notice(reply.max_new_tokens)}*"
    messages = [{"role": "assistant", "content": answer}]
    if reply.reasoning.strip():
        messages.append(
            {"role": "assistant", "content": reply.reasoning, "metadata": {"title": THINKING_TITLE, "status": "done"}}
        )
    return messages


def chat_messages(turns: list[Turn], side: str) -> list[dict[str, Any]]:
    """Render one side's conversation for a gr.Chatbot."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        for image in turn.images:
            messages.append({"role": "user", "content": {"path": image}})
        messages.append({"role": "user", "content": turn.text})
        reply = turn.replies.get(side)
        if reply is not None:
            messages.extend(reply_messages(reply))
    return messages


def generation_settings(temperature: float, top_p: float, max_new_tokens: float) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens),
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 0.7,
        top_p=top_p,
    )


class ChatTab:
    """Builds the tab's components and wires its events to a ChatBackend."""

    def __init__(
        self,
        backend: ChatBackend,
        outputs_dir: str | None,
        adapter: str | None,
        max_new_tokens: int,
        i18n: Callable[[str], Any],
    ):
        self.backend = backend
        self.initial_max_new_tokens = max_new_tokens
        self.outputs_dir = outputs_dir
        self.initial_adapter = adapter
        self.i18n = i18n
        self.running: dict[str, threading.Event] = {}
        """The stop event of the reply each page session is generating."""

    def adapter_choices(self) -> list[tuple[str, str]]:
        """Return the adapter list as (label, path) pairs: the base model (""), then adapters of this base first."""
        found = find_adapters(self.outputs_dir)
        if self.initial_adapter and self.initial_adapter not in found:
            found.insert(0, self.initial_adapter)
        return [("", ""), *adapter_choices(found, self.backend.base_name)]

    def build(self) -> None:
        t = self.i18n
        with gr.Row():
            self.adapter = gr.Dropdown(
                choices=self.adapter_choices(), value=self.initial_adapter or "", label=t("adapter"),
                allow_custom_value=True, scale=4, elem_id="chat-adapter",
            )
            self.refresh = gr.Button(t("refresh_adapters"), scale=1, elem_id="chat-refresh")
            self.compare = gr.Checkbox(label=t("compare"), value=False, scale=1, elem_id="chat-compare")
        with gr.Row():
            self.system = gr.Textbox(
                label=t("system_prompt"), info=t("system_prompt_info"), lines=2, scale=4, elem_id="chat-system"
            )
            self.no_system = gr.Checkbox(label=t("no_system_prompt"), value=False, scale=1, elem_id="chat-no-system")
        with gr.Accordion(t("generation_settings"), open=False, elem_id="chat-settings"):
            with gr.Row():
                self.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label=t("temperature"))
                self.top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label=t("top_p"))
                self.max_new_tokens = gr.Slider(1, 4096, value=self.initial_max_new_tokens, step=1, label=t("max_new_tokens"), elem_id="chat-max-new-tokens")
        with gr.Row():
            self.main_chat = gr.Chatbot(label=t("reply_main"), height=420, elem_id="chat-main")
            self.base_chat = gr.Chatbot(label=t("reply_base"), height=420, visible=False, elem_id="chat-base")
        self.error = gr.Markdown(elem_id="chat-error")
        self.message = gr.MultimodalTextbox(
            label=t("message"), placeholder=t("message_placeholder"), file_types=["image"],
            file_count="multiple", elem_id="chat-message",
        )
        with gr.Row():
            self.stop = gr.Button(t("stop_reply"), variant="stop", elem_id="chat-stop")
            self.regenerate = gr.Button(t("regenerate"), elem_id="chat-regenerate")
            self.undo = gr.Button(t("undo"), elem_id="chat-undo")
            self.clear = gr.Button(t("clear"), elem_id="chat-clear")
        self.turns = gr.State([])
        self._wire()

    def _wire(self) -> None:
        settings = [self.adapter, self.compare, self.system, self.no_system, self.temperature, self.top_p, self.max_new_tokens]
        views = [self.main_chat, self.base_chat, self.turns, self.error]
        self.message.submit(
            self.send, [self.message, self.turns, *settings], [*views, self.message], concurrency_id="generation",
            concurrency_limit=1,
        )
        self.regenerate.click(
            self.regenerate_last, [self.turns, *settings], views, concurrency_id="generation", concurrency_limit=1
        )
        self.stop.click(self.stop_reply, queue=False)
        self.undo.click(self.undo_last, [self.turns], views)
        self.clear.click(self.clear_all, None, views)
        self.compare.change(self.toggle_compare, [self.compare], views)
        self.no_system.change(lambda off: gr.Textbox(interactive=not off), [self.no_system], [self.system])
        self.refresh.click(lambda: gr.Dropdown(choices=self.adapter_choices()), None, [self.adapter])

    def _views(self, turns: list[Turn], error: str = "") -> tuple:
        return chat_messages(turns, ADAPTER_SIDE), chat_messages(turns, BASE_SIDE), turns, error

    # The settings are spelled out, not *settings: gradio passes gr.Request only to a parameter before any *args.
    def send(
        self, message: dict, turns: list[Turn], adapter: str, compare: bool, system: str, no_system: bool,
        temperature: float, top_p: float, max_new_tokens: float, request: gr.Request | None = None,
    ) -> Iterator[tuple]:
        text = (message or {}).get("text", "").strip()
        images = [str(item) if isinstance(item, str) else item["path"] for item in (message or {}).get("files", [])]
        if not text:
            yield (*self._views(turns, "Type a message first; images go with a message."), message)
            return
        turns = [*turns, Turn(text=text, images=images)]
        settings = (adapter, compare, system, no_system, temperature, top_p, max_new_tokens)
        for view in self._answer(turns, *settings, session=_session(request)):
            yield (*view, None)

    def regenerate_last(
        self, turns: list[Turn], adapter: str, compare: bool, system: str, no_system: bool, temperature: float,
        top_p: float, max_new_tokens: float, request: gr.Request | None = None,
    ) -> Iterator[tuple]:
        if not turns:
            yield self._views(turns, "Nothing to regenerate yet.")
            return
        last = turns[-1]
        settings = (adapter, compare, system, no_system, temperature, top_p, max_new_tokens)
        yield from self._answer([*turns[:-1], Turn(text=last.text, images=last.images)], *settings, session=_session(request))

    def stop_reply(self, request: gr.Request | None = None) -> None:
        """Stop the reply that this page session is generating, if any, after its current token."""
        session = _session(request)
        cancel = self.running.get(session)
        if cancel is not None:
            cancel.set()
            logger.info("chat reply of page session %s stopped with the Stop button", session)

    def undo_last(self, turns: list[Turn]) -> tuple:
        return self._views(turns[:-1])

    def clear_all(self) -> tuple:
        return self._views([])

    def toggle_compare(self, compare: bool) -> tuple:
        # Each side keeps its own history, so a conversation starts afresh when the mode changes.
        label = self.i18n("reply_adapter") if compare else self.i18n("reply_main")
        return gr.Chatbot(value=[], label=label), gr.Chatbot(value=[], visible=compare), [], ""

    def _answer(
        self, turns: list[Turn], adapter: str, compare: bool, system: str, no_system: bool, temperature: float,
        top_p: float, max_new_tokens: float, session: str,
    ) -> Iterator[tuple]:
        """Stream the last turn's reply on the adapter side, then on the base side in compare mode.

        The Stop button of the same page session (`session`) stops the reply, and the base side's too.
        """
        adapter = (adapter or "").strip() or None
        if compare and adapter is None:
            yield self._views(turns[:-1], "Compare needs an adapter: choose one in the adapter list.")
            return
        settings = generation_settings(temperature, top_p, max_new_tokens)
        sides = [ADAPTER_SIDE, BASE_SIDE] if compare else [ADAPTER_SIDE]
        cancel = self.running[session] = threading.Event()
        try:
            self.backend.use_adapter(adapter)
            # Both sides get the same system prompt, so compare mode differs in the weights alone.
            prompt = None if no_system else (system.strip() or self.backend.trained_system_prompt())
            for side in sides:
                if cancel.is_set():
                    break
                for _ in self.backend.stream_turn(turns, side, settings, prompt, cancel):
                    yield self._views(turns)
        except VlmtuneError as error:
            logger.warning("chat request failed (adapter %s): %s", adapter, error)
            yield self._views(turns[:-1], f"**Error:** {error}")
        except Exception as error:  # shown in the page instead of a traceback; logged in full
            logger.exception("chat generation failed")
            yield self._views(turns[:-1], f"**Error:** generation failed: {type(error).__name__}: {error}")
        finally:
            if self.running.get(session) is cancel:
                del self.running[session]


def _session(request: gr.Request | None) -> str:
    """Return the page session's id: the Stop button stops only the replies of its own page."""
    return getattr(request, "session_hash", None) or ""
