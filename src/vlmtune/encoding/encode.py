"""Conversation -> encoded sample, through the processor's own chat template.

Every prompt is rendered by the chat template exactly as inference renders it
(`add_generation_prompt=True`), and each reply is what the template adds for the
assistant message. Labels are -100 except for the reply tokens and the token that ends
the reply, which is always one of the model's stop ids:

- a template that closes assistant turns itself (Qwen's `<|im_end|>`) supervises that
  token;
- a template that adds nothing after a reply (GLM-4.1V) supervises the token it renders
  next, `<|user|>` on GLM, which is also in `generation_config.eos_token_id`. After the
  last reply that token is appended, because the model must generate it to stop.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from collections.abc import Iterator, Sequence
from typing import Any

import jinja2
import numpy as np
import torch
from PIL import Image

from vlmtune.config import DataSettings
from vlmtune.data.conversation import Conversation, ImagePart, Message, TextPart
from vlmtune.encoding.images import apply_image_limits, load_image, load_image_part, reloadable_image_sources, shown_source
from vlmtune.encoding.thinking import LayoutName, build_reply, detect_layout, split_reply
from vlmtune.errors import DataError, TemplateError
from vlmtune.notices import log_once

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss ignores (torch.nn.CrossEntropyLoss's default ignore_index)."""

ENCODE_BATCH_SIZE = 64
"""Conversations rendered and tokenized together by one encode_many call."""


@dataclass
class EncodedSample:
    """Token ids, labels and vision tensors for one conversation.

    The token sequences are lists when encoded and read-only NumPy arrays when read from the encoded
    table (`encoding.cache.encode_dataset`), so code that reads them accepts both.
    """

    input_ids: Sequence[int]
    labels: Sequence[int]
    reply_starts: list[int]
    """Index of the first token of each assistant reply; ids before it are that turn's prompt."""
    source: str = ""
    mm_token_type_ids: Sequence[int] | None = None
    pixel_values: torch.Tensor | None = None
    """The image processor's output, kept only for images given by http(s) URL or already decoded."""
    image_grid_thw: torch.Tensor | None = None
    image_sources: list[str] | None = None
    """Local image files (absolute paths) and data: URLs, opened and processed again when the sample is
    batched (`ConversationEncoder.pixel_values`), so that the pixel values of all the data's images are
    never in memory at once."""
    resized_images: int = 0
    """Images of this conversation scaled to fit data.min_pixels / data.max_pixels."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def supervised_count(self) -> int:
        return int(np.count_nonzero(np.asarray(self.labels) != IGNORE_INDEX))


class ConversationEncoder:
    """Encodes conversations for one processor (tokenizer + chat template + image processor)."""

    def __init__(
        self,
        processor: Any,
        stop_ids: list[int],
        thinking: str = "auto",
        train_on: str = "all_turns",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.stop_ids = list(stop_ids)
        self.train_on = train_on
        self.thinking_setting = thinking
        self.layout: LayoutName = self._detect_layout() if thinking == "auto" else thinking
        if self.layout == "think" and not self.renders_reasoning_content:
            raise TemplateError(
                "reply layout think (data.thinking or --thinking): the chat template does not render an assistant "
                "message's reasoning_content; use auto, think_answer or none"
            )
        self.image_token: str | None = getattr(processor, "image_token", None)
        self.pixel_limits = apply_image_limits(processor, min_pixels, max_pixels)
        self._warned_dropped_reasoning = False
        self._warned_unrendered_reasoning = False

    @classmethod
    def from_settings(cls, processor: Any, stop_ids: list[int], settings: DataSettings) -> ConversationEncoder:
        return cls(
            processor,
            stop_ids,
            thinking=settings.thinking,
            train_on=settings.train_on,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
        )

    # -- rendering ---------------------------------------------------------------------

    @property
    def accepts_images(self) -> bool:
        """Whether the processor has an image processor and an image token (False for text-only models)."""
        return self.image_token is not None and hasattr(self.processor, "image_processor")

    def check_images(self, conversation: Conversation) -> None:
        """Raise DataError for a conversation with images when the model takes none."""
        if conversation.images and not self.accepts_images:
            raise DataError(
                f"{conversation.source or 'the conversation'}: {len(conversation.images)} image(s) given, but the "
                "model is text-only (its processor takes no images); remove the images or use a vision-language model",
                "images for a text-only model",
            )

    def template_messages(self, conversation: Conversation, *, with_images: bool = False) -> list[dict[str, Any]]:
        """Convert the conversation to chat-template messages, with replies laid out for the model.

        A reply that ends the conversation (the one being trained) keeps its reasoning;
        replies followed by more messages drop it, as chat history does.
        """
        self.check_images(conversation)
        final_index = len(conversation.messages) - 1
        messages = []
        for index, message in enumerate(conversation.messages):
            if message.role == "assistant":
                reasoning = (message.reasoning or "") if index == final_index else ""
                messages.append(self._assistant_message(message.text, reasoning, conversation))
            elif message.role == "system":
                messages.append({"role": "system", "content": message.text})
            else:
                messages.append({"role": "user", "content": self._user_content(message, conversation, with_images)})
        if messages and messages[0]["role"] == "system" and self.system_role_problem is not None:
            messages = self._fold_system(messages, conversation)
        return messages

    @functools.cached_property
    def system_role_problem(self) -> str | None:
        """The reason the chat template cannot take a system message as given, or None when it can.

        Gemma's template raises an error on one, some templates leave it out, and Mistral's
        moves it into the last user message, which changes earlier turns once a turn is
        added. For these the system prompt goes at the start of the first user message,
        in training and in inference alike.
        """
        marker, user = "vlmtune-system-probe", "vlmtune-user-probe"
        probe = [{"role": "system", "content": marker}, {"role": "user", "content": user},
                 {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
        try:
            rendered = self.processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as error:
            problem = f"it raises an error on one: {error}"
        else:
            if marker not in rendered:
                problem = "it leaves the system message out"
            elif user not in rendered or rendered.index(marker) > rendered.index(user):
                problem = "it moves the system message after the first user message"
            else:
                return None
        log_once(
            logger,
            logging.INFO,
            "the chat template has no usable system role (%s), so the system prompt goes at the start of the first "
            "user message, in training and in inference",
            problem,
        )
        return problem

    def _fold_system(self, messages: list[dict[str, Any]], conversation: Conversation) -> list[dict[str, Any]]:
        """Put the system messages' text at the start of the first user message (as Gemma 3's own template does)."""
        leading = 0
        while leading < len(messages) and messages[leading]["role"] == "system":
            leading += 1
        system = "\n\n".join(message["content"] for message in messages[:leading])
        rest = messages[leading:]
        if not rest or rest[0]["role"] != "user":
            raise DataError(
                f"{conversation.source}: the system message is not followed by a user message, and the chat template "
                f"has no usable system role ({self.system_role_problem}); start the conversation with a user message",
                "system message without a user message",
            )
        content = rest[0]["content"]
        if isinstance(content, str):
            content = f"{system}\n\n{content}"
        else:
            content = [{"type": "text", "text": f"{system}\n\n"}, *content]
        return [{"role": "user", "content": content}, *rest[1:]]

    def _detect_layout(self) -> LayoutName:
        """think when the template renders reasoning_content, else think_answer when the tokenizer has GLM's layout tags.

        The template decides first: GLM-4.5V's tokenizer shares GLM-4.1V's tags, but its template
        lays out replies itself, without answer tags.
        """
        if self.renders_reasoning_content:
            return "think"
        return detect_layout(self.tokenizer)

    def _assistant_message(self, text: str, reasoning: str, conversation: Conversation) -> dict[str, Any]:
        """Lay out a reply: in vlmtune's think/answer layout, or with `reasoning_content` for templates that render it."""
        message = {"role": "assistant", "content": build_reply(self.layout, text, reasoning)}
        if self.layout == "think_answer":
            return message
        # build_reply also splits reasoning written as <think>...</think> inside the text.
        reasoning = reasoning or (split_reply(text).reasoning if "<think>" in text else "")
        if not reasoning:
            return message
        if self.layout == "think":
            message["reasoning_content"] = reasoning
        elif not self._warned_unrendered_reasoning:
            self._warned_unrendered_reasoning = True
            if self.thinking_setting == "none":
                logger.info("data.thinking is none, so replies with reasoning are trained on their answers only (first: %s)",
                            conversation.source)
            else:
                logger.warning(
                    "replies with reasoning are trained on their answers only, because the chat template has no "
                    "think/answer tokens and does not render `reasoning_content` (first: %s). Set data.thinking: "
                    "think_answer to train the reasoning as <think>/<answer> text instead",
                    conversation.source,
                )
        return message

    @functools.cached_property
    def renders_reasoning_content(self) -> bool:
        """Whether the chat template renders an assistant message's `reasoning_content` (Qwen3, DeepSeek-R1 style)."""
        marker = "vlmtune-reasoning-probe"
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": marker}]
        return marker in self.render(probe, add_generation_prompt=False)

    def _user_content(self, message: Message, conversation: Conversation, with_images: bool) -> Any:
        if not message.images:
            return message.text
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif with_images:
                parts.append({"type": "image", "image": self.load_image(part, conversation.source)})
            else:
                parts.append({"type": "image"})
        return parts

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool, source: str = "") -> str:
        return self.apply_template(messages, source, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render_many(self, conversations: list[list[dict[str, Any]]], *, add_generation_prompt: bool) -> list[str]:
        """Render several message lists in one `apply_chat_template` call (the same text as one call each)."""
        if not conversations:
            return []
        return self.apply_template(conversations, "", tokenize=False, add_generation_prompt=add_generation_prompt)

    def apply_template(self, messages: list, source: str, **kwargs: Any) -> Any:
        """Call the processor's `apply_chat_template`, and raise an error of the template as a DataError naming the source."""
        try:
            return self.processor.apply_chat_template(messages, **kwargs)
        except jinja2.TemplateError as error:
            where = f"{source}: " if source else ""
            raise DataError(
                f"{where}the chat template rejects this conversation: {error}; change the conversation to fit the "
                "template (for example, alternate user and assistant messages)",
                "rejected by the chat template",
            ) from None

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _tokenize_many(self, texts: list[str]) -> list[list[int]]:
        """Tokenize texts in one call, which the fast tokenizer spreads over threads."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The stop id that ends a reply, found on first use so that loading a cached encoding renders nothing."""
        end_of_turn_id = self._find_end_of_turn_id()
        logger.info(
            "reply layout: %s; end-of-turn token: %s", self.layout, self.tokenizer.convert_ids_to_tokens(end_of_turn_id)
        )
        return end_of_turn_id

    def _find_end_of_turn_id(self) -> int:
        """Find the stop id the template places right after an assistant reply, else use the first stop id."""
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        closed = self.render(probe, add_generation_prompt=False)
        continued = self.render([*probe, {"role": "user", "content": "c"}], add_generation_prompt=False)
        if not continued.startswith(closed):
            raise TemplateError("the chat template renders history differently once a new message is added")
        following = self._tokenize(continued[len(closed) :])
        if following and following[0] in self.stop_ids:
            return following[0]
        reply = self._tokenize(closed[len(self.render(probe[:1], add_generation_prompt=True)) :])
        closing = [token for token in reply if token in self.stop_ids]
        return closing[-1] if closing else self.stop_ids[0]

    # -- encoding ----------------------------------------------------------------------

    def _image_inputs(self, conversation: Conversation) -> tuple[dict[str, torch.Tensor], list[int], int]:
        """Return the image processor's tensors, the token count of each image and how many were resized."""
        images = conversation.images
        if not images:
            return {}, [], 0
        loaded = [self.load_image(image, conversation.source) for image in images]
        image_processor = self.processor.image_processor
        inputs = image_processor(images=loaded, return_tensors="pt")
        merge = image_processor.merge_size
        counts = [int(grid.prod()) // merge**2 for grid in inputs["image_grid_thw"]]
        resized = 0
        if self.pixel_limits is not None:
            # Scaled when the processed size differs from the image's own rounded to whole merged patches.
            factor = image_processor.patch_size * merge
            for image, (_, rows, columns) in zip(loaded, inputs["image_grid_thw"].tolist()):
                rounded = round(image.height / factor) * round(image.width / factor) * factor**2
                resized += rows * columns * image_processor.patch_size**2 != rounded
        return dict(inputs), counts, resized

    def load_image(self, part: ImagePart, source: str) -> Image.Image:
        """Open the image, and raise DataError for one whose shape the image processor rejects."""
        image = load_image_part(part, source)
        count_patches = getattr(getattr(self.processor, "image_processor", None), "get_number_of_image_patches", None)
        if count_patches is not None:
            try:
                count_patches(image.height, image.width, {})
            except ValueError as error:  # GLM-4.1V and Qwen2-VL reject an aspect ratio over 200:1
                raise DataError(
                    f"{source}: the image processor rejects image {shown_source(part.source)} of {image.width}x"
                    f"{image.height} pixels: {error}; crop or pad it, or remove it from the example",
                    "invalid image",
                ) from None
        return image

    def pixel_values(self, sample: EncodedSample) -> torch.Tensor:
        """Return the sample's pixel values, processing its images again where encoding kept none."""
        if sample.pixel_values is not None:
            return sample.pixel_values
        images = [load_image(source, sample.source) for source in sample.image_sources]
        inputs = self.processor.image_processor(images=images, return_tensors="pt")
        if not torch.equal(inputs["image_grid_thw"], sample.image_grid_thw):
            files = [shown_source(source) for source in sample.image_sources]
            raise DataError(
                f"{sample.source}: an image changed size after the data was encoded ({', '.join(files)}). "
                "Start the run again, so that the data is encoded from the current files (with data.cache=false if "
                "the changed file kept its byte size and modification time, which the encoding cache compares)",
                "changed image",
            )
        return inputs["pixel_values"]

    def _expand_images(self, text: str, image_counts: list[int], cursor: int) -> tuple[str, int]:
        """Repeat each image marker in prompt text as many times as that image has tokens."""
        if self.image_token is None or self.image_token not in text:
            return text, cursor
        pieces = text.split(self.image_token)
        expanded = pieces[0]
        for piece in pieces[1:]:
            expanded += self.image_token * image_counts[cursor] + piece
            cursor += 1
        return expanded, cursor

    def encode(self, conversation: Conversation) -> EncodedSample:
        """Encode one conversation; raises DataError for an example that cannot be trained on."""
        [result] = self.encode_many([conversation])
        if isinstance(result, DataError):
            raise result
        return result

    def encode_many(self, conversations: list[Conversation]) -> list[EncodedSample | DataError]:
        """Encode conversations with two template calls and one tokenizer call for all of them.

        Each result is the sample, or the DataError that makes that example untrainable.
        """
        turns: list[_Turns | DataError] = []
        for conversation in conversations:
            try:
                turns.append(self._turns(conversation))
            except DataError as error:
                turns.append(error)
        planned = [item for item in turns if isinstance(item, _Turns)]
        try:
            prompts, fulls = self._render_turns(planned)
        except DataError:  # some conversation is rejected by the template: find which, one at a time
            turns = [self._rendered_alone(item) for item in turns]
            planned = [item for item in turns if isinstance(item, _Turns)]
            prompts, fulls = self._render_turns(planned)
        texts: list[str] = []
        for item in planned:
            rendered = ""
            image_cursor = 0
            for _ in item.turns:
                prompt_text, full_text = next(prompts), next(fulls)
                if not prompt_text.startswith(rendered) or not full_text.startswith(prompt_text):
                    raise TemplateError(
                        f"{item.conversation.source}: the chat template does not render this conversation as a "
                        "growing prefix (an earlier turn changes when a turn is added), so prompts and replies "
                        "cannot be separated; run `vlmtune inspect` to see the rendering"
                    )
                prompt_piece, image_cursor = self._expand_images(prompt_text[len(rendered) :], item.image_counts, image_cursor)
                texts += [prompt_piece, full_text[len(prompt_text) :]]
                rendered = full_text
        token_ids = iter(self._tokenize_many(texts))
        return [item if isinstance(item, DataError) else self._assemble(item, token_ids) for item in turns]

    def _render_turns(self, planned: list[_Turns]) -> tuple[Iterator[str], Iterator[str]]:
        """Render every turn's prompt and prompt + reply, each set in one template call."""
        prompts = self.render_many([item.messages[:turn] for item in planned for turn in item.turns], add_generation_prompt=True)
        fulls = self.render_many(
            [item.messages[: turn + 1] for item in planned for turn in item.turns], add_generation_prompt=False
        )
        return iter(prompts), iter(fulls)

    def _rendered_alone(self, item: _Turns | DataError) -> _Turns | DataError:
        """Return the item, or the DataError that the template raises on the item's conversation alone."""
        if isinstance(item, DataError):
            return item
        try:
            self._render_turns([item])
        except DataError as error:
            return DataError(f"{item.conversation.source}: {error}", error.reason)
        return item

    def _turns(self, conversation: Conversation) -> _Turns:
        messages = self.template_messages(conversation)
        assistant_turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        if not assistant_turns:
            raise DataError(f"{conversation.source}: the conversation has no assistant reply to train on", "no assistant reply")
        image_inputs, image_counts, resized_images = self._image_inputs(conversation)
        return _Turns(conversation, messages, assistant_turns, image_inputs, image_counts, resized_images)

    def _reasoning_dropped(self, item: _Turns, turn_index: int) -> bool:
        """Return True for a reply whose reasoning the template drops because more messages follow.

        Such a reply stays in the sample as context but is not supervised: trained with an
        empty think part, it would teach the model to stop reasoning.
        """
        # System messages folded into the first user message shift the indices by their number.
        message = item.conversation.messages[turn_index + len(item.conversation.messages) - len(item.messages)]
        if turn_index == len(item.messages) - 1 or not message.reasoning:
            return False
        if not self._warned_dropped_reasoning:
            self._warned_dropped_reasoning = True
            logger.warning(
                "replies with reasoning before the last turn are context only, not trained: the chat template "
                "drops their reasoning (first: %s)",
                item.conversation.source,
            )
        return True

    def _assemble(self, item: _Turns, token_ids: Iterator[list[int]]) -> EncodedSample:
        """Join each turn's prompt and reply ids, and label the replies and the tokens that end them."""
        input_ids: list[int] = []
        labels: list[int] = []
        reply_starts: list[int] = []
        appended_end_of_turn = False
        for turn_index in item.turns:
            prompt_ids, reply_ids = next(token_ids), next(token_ids)
            if appended_end_of_turn and prompt_ids[:1] == [self.end_of_turn_id]:
                prompt_ids = prompt_ids[1:]  # already in place, supervised, as the previous reply's end
            input_ids += prompt_ids
            labels += [IGNORE_INDEX] * len(prompt_ids)
            reply_starts.append(len(input_ids))

            stops = [position for position, token in enumerate(reply_ids) if token in self.stop_ids]
            if stops:
                supervised_ids = reply_ids[: stops[-1] + 1]
                unsupervised_tail = reply_ids[stops[-1] + 1 :]
                appended_end_of_turn = False
            else:
                supervised_ids = [*reply_ids, self.end_of_turn_id]
                unsupervised_tail = []
                appended_end_of_turn = True
            trained = (self.train_on == "all_turns" or turn_index == item.turns[-1]) and not self._reasoning_dropped(
                item, turn_index
            )
            input_ids += supervised_ids + unsupervised_tail
            labels += (supervised_ids if trained else [IGNORE_INDEX] * len(supervised_ids)) + [IGNORE_INDEX] * len(
                unsupervised_tail
            )

        sample = EncodedSample(input_ids, labels, reply_starts, source=item.conversation.source, resized_images=item.resized_images)
        if item.image_inputs:
            sample.image_grid_thw = item.image_inputs["image_grid_thw"]
            sample.image_sources = reloadable_image_sources(item.conversation.images)
            if sample.image_sources is None:
                sample.pixel_values = item.image_inputs["pixel_values"]
        if hasattr(self.processor, "create_mm_token_type_ids"):
            sample.mm_token_type_ids = self.processor.create_mm_token_type_ids([input_ids])[0]
        return sample


@dataclass
class _Turns:
    """A conversation laid out for the template, with the indices of its assistant messages and its images."""

    conversation: Conversation
    messages: list[dict[str, Any]]
    turns: list[int]
    image_inputs: dict[str, torch.Tensor]
    image_counts: list[int]
    resized_images: int


@dataclass
class EncodingReport:
    """Encoded samples, the sources of dropped conversations by reason, and all encoded lengths."""

    samples: list[EncodedSample]
    dropped: dict[str, list[str]]
    lengths: dict[str, list[int]] = field(default_factory=dict)
    """Encoded length of every conversation, per dataset file, before any was dropped or trimmed."""
    trimmed: int = 0
    resized_images: int = 0
    seconds: float = 0.0
    """Wall time of encoding, or of loading the cached result."""
    from_cache: bool = False
    """True when the samples were read from the encoding cache. The counts are then those of the run that encoded them."""
    key: str | None = None
    """Hash of every input of encoding (see cache.encoding_key): data, image files, tokenizer, template, settings."""

    def log(self) -> None:
        for reason, sources in self.dropped.items():
            logger.warning("dropped %d example(s): %s (first: %s)", len(sources), reason, sources[0])
        when = " when they were encoded" if self.from_cache else ""
        if self.resized_images:
            logger.info(
                "%d image(s) were scaled%s to fit the image processor's pixel limits (data.min_pixels / data.max_pixels "
                "set them, else the processor's defaults apply)",
                self.resized_images, when,
            )
        if self.trimmed:
            logger.info("the oldest turns of %d example(s) were removed%s to fit data.max_length", self.trimmed, when)
        logger.info("%s %d sample(s)", "loaded" if self.from_cache else "encoded", len(self.samples))


def dataset_of(source: str) -> str:
    """Return the dataset file part of a `FILE, record N (line L)` source."""
    return source.split(", record ")[0]


def _without_oldest_turn(conversation: Conversation) -> Conversation | None:
    """Drop the oldest user/assistant pair after the system message; None when one turn is left."""
    messages = conversation.messages
    start = 1 if messages and messages[0].role == "system" else 0
    if len(messages) - start <= 2:
        return None
    return Conversation([*messages[:start], *messages[start + 2 :]], source=conversation.source)


@dataclass
class EncodingOutcome:
    """The result of data.on_invalid and data.on_overlength for one conversation."""

    sample: EncodedSample | None
    length: int | None = None
    """Encoded length before any trimming; None when the conversation could not be encoded."""
    dropped: str | None = None
    """Reason the conversation was dropped, or None when it was kept."""
    error: DataError | None = None
    """The error to raise (on_invalid or on_overlength is `error`)."""
    trimmed: bool = False
    conversation: Conversation | None = None
    """The conversation the sample encodes: the input, or what trim_history left of it."""

    def note(self, max_length: int) -> str | None:
        """Say what training does with this example when a policy changed it; None when it trains as given."""
        if self.error is not None:
            return f"training stops at this example: {self.error}"
        if self.sample is None:
            return f"training skips this example: {self.dropped}"
        if self.trimmed:
            return (
                f"data.on_overlength=trim_history: the oldest turns were removed to fit "
                f"data.max_length={max_length} ({self.length} tokens before, {len(self.sample)} now)"
            )
        return None


def encode_with_policy(
    encoder: ConversationEncoder, conversations: list[Conversation], settings: DataSettings
) -> list[EncodingOutcome]:
    """Encode conversations together and apply data.on_invalid and data.on_overlength to each."""
    results = encoder.encode_many(conversations)
    return [_apply_policy(encoder, conversation, result, settings) for conversation, result in zip(conversations, results)]


def _apply_policy(
    encoder: ConversationEncoder, conversation: Conversation, result: EncodedSample | DataError, settings: DataSettings
) -> EncodingOutcome:
    if isinstance(result, DataError):
        if settings.on_invalid == "error":
            return EncodingOutcome(None, error=result)
        return EncodingOutcome(None, dropped=result.reason)
    sample = result
    max_length = settings.max_length
    length = len(sample)
    if length <= max_length:
        return EncodingOutcome(sample, length, conversation=conversation)
    if settings.on_overlength == "error":
        error = DataError(
            f"{conversation.source}: the encoded sample has {length} tokens, more than "
            f"data.max_length={max_length}. Raise data.max_length, or set data.on_overlength to drop or trim_history",
            "too long",
        )
        return EncodingOutcome(None, length, error=error)
    if settings.on_overlength == "trim_history":
        encoded, shorter = conversation, _without_oldest_turn(conversation)
        while shorter is not None and len(sample) > max_length:
            encoded, sample = shorter, encoder.encode(shorter)
            shorter = _without_oldest_turn(shorter)
        if len(sample) <= max_length:
            return EncodingOutcome(sample, length, trimmed=True, conversation=encoded)
    return EncodingOutcome(None, length, dropped=overlength_reason(max_length))


def overlength_reason(max_length: int) -> str:
    """Return the reason recorded for an example dropped as too long."""
    return f"longer than data.max_length={max_length} tokens"


def add_outcome(report: EncodingReport, outcome: EncodingOutcome, source: str) -> None:
    """Count one outcome into the report; raises its error, if it has one."""
    if outcome.length is not None:
        report.lengths.setdefault(dataset_of(source), []).append(outcome.length)
    if outcome.error is not None:
        raise outcome.error
    if outcome.dropped is not None:
        report.dropped.setdefault(outcome.dropped, []).append(source)
        return
    report.trimmed += outcome.trimmed
    report.resized_images += outcome.sample.resized_images
    report.samples.append(outcome.sample)


def encode_conversations(
    encoder: ConversationEncoder, conversations: list[Conversation], settings: DataSettings, log: bool = True
) -> EncodingReport:
    """Encode all conversations in this process, applying data.on_invalid and data.on_overlength."""
    report = EncodingReport([], {})
    for start in range(0, len(conversations), ENCODE_BATCH_SIZE):
        batch = conversations[start : start + ENCODE_BATCH_SIZE]
        for conversation, outcome in zip(batch, encode_with_policy(encoder, batch, settings)):
            add_outcome(report, outcome, conversation.source)
    if log:
        report.log()
    return report


def conversation_for_generation(conversation: Conversation) -> Conversation:
    """Return the conversation without its trailing assistant replies, as a prompt to generate from."""
    messages = list(conversation.messages)
    while messages and messages[-1].role == "assistant":
        messages.pop()
    return Conversation(messages, source=conversation.source)


__all__ = [
    "IGNORE_INDEX",
    "ConversationEncoder",
    "EncodedSample",
    "EncodingOutcome",
    "EncodingReport",
    "add_outcome",
    "conversation_for_generation",
    "encode_conversations",
    "encode_with_policy",
]
