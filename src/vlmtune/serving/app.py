"""An OpenAI-compatible chat server for a base model plus adapter, or a merged model.

Endpoints: GET /v1/models and POST /v1/chat/completions (JSON or server-sent events).
Requests are served one at a time in arrival order; later ones wait instead of failing.
Errors use OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vlmtune.config import GenerationSettings
from vlmtune.data.conversation import ContentPart, Conversation, ImagePart, Message, TextPart
from vlmtune.encoding.images import load_image
from vlmtune.errors import VlmtuneError
from vlmtune.inference.generate import Generator, Reply

logger = logging.getLogger(__name__)


# An oversized body up to this many times max_request_bytes is read before the 413 response.
DRAIN_FACTOR = 4


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    allowed_image_prefixes: list[str] = field(default_factory=list)
    """http(s):// or file:// URL prefixes that image parts may use; data: URLs are always allowed."""
    max_request_bytes: int = 20 * 1024 * 1024
    max_tokens_limit: int = 4096
    default_max_tokens: int = 1024
    system_prompt: str | None = None
    """System message put first in requests that send none (`vlmtune serve` uses the adapter's training prompt)."""


class ImageURL(BaseModel):
    url: str


class Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    """text or image_url; checked in to_conversation, which names the accepted types."""
    text: str | None = None
    image_url: ImageURL | str | None = None
    """{"url": ...} as the OpenAI API sends it; a bare URL string is accepted too."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    """Send the token counts in a last chunk whose choices list is empty, as the OpenAI API does."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        # OpenAI's API takes `developer` messages as the system prompt, and chat templates know only `system`.
        return "system" if role == "developer" else role


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # An empty string would match at once and end every reply before it starts.
        if stop == "":
            raise ValueError("stop strings must not be empty")
        if isinstance(stop, list) and "" in stop:
            raise ValueError(f"stop strings must not be empty; stop[{stop.index('')}] is")
        return stop


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code


def error_response(
    status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    """Return an error in the OpenAI API's shape; `code` is a string such as "context_length_exceeded", or null."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# Names pydantic adds to an error's location for the member of a union that failed, and what
# each union field accepts, so that an error names the request's own fields.
UNION_MEMBERS = {"str", "list[Part]", "list[str]", "ImageURL"}
UNION_EXPECTED = {
    "content": "a string or a list of content parts",
    "image_url": "{'url': URL} or a URL string",
    "stop": "a string or a list of strings",
}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str | None, str]:
    """Return (param, message) for a request that failed validation, named like messages[0].content."""
    # Of a union's failed members, the one that matched deepest is most likely the one the client meant.
    error = max(errors, key=lambda item: len(item["loc"]))
    location = [part for part in error["loc"] if part != "body"]
    fields = [part for part in location if part not in UNION_MEMBERS]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in fields).lstrip(".") or None
    if location and location[-1] in UNION_MEMBERS and fields and fields[-1] in UNION_EXPECTED:
        return param, f"{param}: expected {UNION_EXPECTED[fields[-1]]}, got {repr(error.get('input'))[:80]}"
    # pydantic starts the messages of validators written as code with "Value error, ".
    return param, f"{param or 'body'}: {error['msg'].removeprefix('Value error, ')}"


def _image_params(request: ChatRequest) -> list[str]:
    """Return the param of each image part in request order, which is the order of Conversation.images."""
    return [
        f"messages[{number}].content[{index}]"
        for number, message in enumerate(request.messages)
        if not isinstance(message.content, str)
        for index, part in enumerate(message.content)
        if part.type == "image_url"
    ]


def _image_part(url: str, settings: ServerSettings, param: str) -> ImagePart:
    if url.startswith("data:"):
        return ImagePart(url)
    if ".." in unquote(urlsplit(url).path).split("/"):
        # A ".." segment would climb out of an allowed prefix such as file:///srv/images/.
        raise APIError(400, f"image URL {url[:80]!r} is not allowed: its path contains a '..' segment", param)
    if any(url.startswith(prefix) for prefix in settings.allowed_image_prefixes):
        return ImagePart(url)
    raise APIError(
        400,
        f"image URL {url[:80]!r} is not allowed: send the image as a data: URL, or start the server with "
        "--allow-image-url PREFIX for trusted http(s):// or file:// locations",
        param,
    )


def to_conversation(request: ChatRequest, settings: ServerSettings) -> Conversation:
    messages = []
    for number, message in enumerate(request.messages):
        if isinstance(message.content, str):
            parts: list[ContentPart] = [TextPart(message.content)]
        else:
            parts = []
            for index, part in enumerate(message.content):
                param = f"messages[{number}].content[{index}]"
                if part.type == "text":
                    if part.text is None:
                        raise APIError(400, "a text part needs 'text'", param)
                    parts.append(TextPart(part.text))
                elif part.type != "image_url":
                    raise APIError(
                        400,
                        f"content part type {part.type!r} is not supported: send {{'type': 'text', 'text': ...}} or "
                        "{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}",
                        f"{param}.type",
                    )
                elif part.image_url is None:
                    raise APIError(400, "an image_url part needs 'image_url': {'url': ...}", param)
                else:
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    parts.append(_image_part(url, settings, param))
        if message.role != "user" and any(isinstance(part, ImagePart) for part in parts):
            raise APIError(400, f"images are accepted in user messages only, not {message.role}", f"messages[{number}]")
        messages.append(Message(message.role, parts))
    if messages[-1].role != "user":
        raise APIError(400, "the last message must come from the user", f"messages[{len(messages) - 1}]")
    if settings.system_prompt and messages[0].role != "system":
        messages.insert(0, Message("system", [TextPart(settings.system_prompt)]))
    return Conversation(messages, source="request")


def _with_decoded_images(conversation: Conversation, params: list[str]) -> Conversation:
    """Open each image once, so a bad one is reported by its param, and keep it for encoding.

    `params` names the image parts in the order of `conversation.images`.
    """
    image_params = iter(params)
    messages = []
    for message in conversation.messages:
        content: list[ContentPart] = []
        for part in message.content:
            if isinstance(part, ImagePart):
                param = next(image_params)
                try:
                    part = ImagePart(part.source, decoded=load_image(part.source, "image_url"))
                except VlmtuneError as error:
                    raise APIError(400, str(error), param) from None
            content.append(part)
        messages.append(Message(message.role, content, message.reasoning))
    return Conversation(messages, conversation.source, conversation.metadata)


def _generation_settings(request: ChatRequest, settings: ServerSettings, base: GenerationSettings) -> GenerationSettings:
    default = min(settings.default_max_tokens, settings.max_tokens_limit)
    requested = request.max_completion_tokens or request.max_tokens or default
    if requested > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens {requested} is above this server's limit of {settings.max_tokens_limit}", "max_tokens")
    temperature = base.temperature if request.temperature is None else request.temperature
    do_sample = base.do_sample if request.temperature is None else request.temperature > 0
    return base.model_copy(
        update={
            "max_new_tokens": requested,
            "do_sample": do_sample,
            "temperature": temperature if temperature > 0 else base.temperature,
            "top_p": base.top_p if request.top_p is None else request.top_p,
            "show_thinking": False,
        }
    )


def _fit_context(generator: Generator, prompt_tokens: int, requested: int | None) -> Generator:
    """Check that the prompt and max_tokens fit the model's context; a default max_tokens shrinks to fit."""
    limit = generator.context_length
    if limit is None:
        return generator
    room = limit - prompt_tokens
    if room <= 0:
        raise APIError(
            400,
            f"the messages have {prompt_tokens} tokens, and this model's maximum context length is {limit} tokens: "
            "shorten the messages",
            "messages",
            code="context_length_exceeded",
        )
    if generator.settings.max_new_tokens <= room:
        return generator
    if requested is not None:
        raise APIError(
            400,
            f"max_tokens {requested} and the messages' {prompt_tokens} tokens exceed this model's maximum context "
            f"length of {limit} tokens: lower max_tokens to {room} or less, or shorten the messages",
            "max_tokens",
            code="context_length_exceeded",
        )
    return generator.with_settings(generator.settings.model_copy(update={"max_new_tokens": room}))


def _cut_at_stop(answer: str, stops: list[str]) -> tuple[str, bool]:
    positions = [answer.find(stop) for stop in stops if stop and stop in answer]
    return (answer[: min(positions)], True) if positions else (answer, False)


def _streamable_answer(answer: str, stops: list[str]) -> str:
    """Return the answer so far cut at a stop string, without a trailing piece that may begin one."""
    answer, stopped = _cut_at_stop(answer, stops)
    if stopped:
        return answer
    for start in range(max(0, len(answer) - max((len(stop) for stop in stops), default=0)), len(answer)):
        if any(stop.startswith(answer[start:]) for stop in stops if stop):
            return answer[:start]
    return answer


GENERATION_THREAD = "vlmtune-generate"
"""Name prefix of the threads that run the server's generations."""


def create_app(generator: Generator, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="vlmtune OpenAI-compatible server")
    # One generation at a time. The worker thread releases the lock when it ends, so a request that goes
    # away while its generation runs does not let the next one start beside it.
    lock = asyncio.Lock()
    started_at = int(time.time())

    async def start_generation(work: Callable[[], Reply], request_id: str) -> asyncio.Future:
        """Wait for the lock, then run `work` in a thread that releases the lock when it ends; return its result's future."""
        loop = asyncio.get_running_loop()
        await lock.acquire()
        future = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():  # the awaiting request was cancelled
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def run() -> None:
            result, error = None, None
            try:
                result = work()
            except Exception as caught:  # handed to the awaiting request
                error = caught
            finally:
                loop.call_soon_threadsafe(settle, result, error)
                loop.call_soon_threadsafe(lock.release)

        try:
            threading.Thread(target=run, name=f"{GENERATION_THREAD}-{request_id}", daemon=True).start()
        except BaseException:
            lock.release()
            raise
        return future

    async def generate_unless_disconnected(
        request: Request, work: Callable[[], Reply], cancel: threading.Event
    ) -> Reply | None:
        """Run `work` as a generation and return its reply, or None when the client disconnects first.

        A request whose client leaves while it waits for its turn never starts a generation. When the
        client leaves during the generation, `cancel` stops it after the current token.
        """
        request_id = request.state.request_id
        started = time.perf_counter()
        generating = asyncio.Event()

        async def generation() -> Reply:
            result = await start_generation(work, request_id)
            generating.set()
            return await result

        running = asyncio.ensure_future(generation())
        disconnect = asyncio.ensure_future(_client_disconnect(request))
        try:
            await asyncio.wait({running, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if running.done():
            return running.result()
        cancel.set()
        running.cancel()
        if generating.is_set():
            logger.info(
                "request %s: the client disconnected after %.2f s; stopping its generation", request_id,
                time.perf_counter() - started,
            )
        else:
            logger.info("request %s: the client disconnected while waiting for its turn", request_id)
        return None

    @app.middleware("http")
    async def limit_and_authorize(request: Request, call_next):
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        request.state.request_id = request_id
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            # Read (and drop) a body up to a few times the limit first. Responding while the client
            # is still sending resets the connection, so the client would never see the 413.
            if int(length) <= DRAIN_FACTOR * settings.max_request_bytes:
                async for _ in request.stream():
                    pass
            logger.info("request %s rejected: body of %s bytes is over the limit", request_id, length)
            return error_response(413, f"request body of {length} bytes exceeds the limit of {settings.max_request_bytes} bytes")
        if length is None and request.method == "POST":
            # A chunked body has no Content-Length, so the limit is checked while reading it.
            body = bytearray()
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > DRAIN_FACTOR * settings.max_request_bytes:
                    break
            if len(body) > settings.max_request_bytes:
                logger.info("request %s rejected: chunked body of over %d bytes", request_id, settings.max_request_bytes)
                return error_response(
                    413, f"request body exceeds the limit of {settings.max_request_bytes} bytes (read {len(body)} bytes)"
                )
            # What Request.body() caches; Starlette hands it to the route in place of the consumed stream.
            request._body = bytes(body)
        if settings.api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {settings.api_key}":
                logger.info("request %s rejected: missing or wrong API key", request_id)
                return error_response(
                    401, "missing or invalid API key: send 'Authorization: Bearer KEY'", kind="authentication_error",
                    code="invalid_api_key",
                )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            message, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        elif tuple(first["loc"]) == ("body",):
            message, param = "the request body must be a JSON object, sent with 'Content-Type: application/json'", None
        else:
            param, message = _validation_message(error.errors())
        logger.info("request %s rejected (400): %s", request.state.request_id, message)
        return error_response(400, message, param)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        logger.info("request %s rejected (%d): %s", request.state.request_id, error.status, error.message)
        return error_response(error.status, error.message, error.param, error.kind, error.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code == 400 and error.detail == "There was an error parsing the body":
            # FastAPI's reply to a body it cannot decode, such as JSON in GBK instead of UTF-8.
            message = f"{request.method} {request.url.path}: the request body could not be read: send JSON encoded as UTF-8"
            logger.info("request %s rejected (400): %s", getattr(request.state, "request_id", "-"), message)
        return error_response(error.status_code, message, kind=kind)

    model_entry = {"id": settings.model_name, "object": "model", "created": started_at, "owned_by": "vlmtune"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_entry]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if model_id != settings.model_name:
            raise APIError(
                404, f"model {model_id!r} not found: this server serves {settings.model_name!r}", "model",
                kind="not_found_error", code="model_not_found",
            )
        return model_entry

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """Return 200 while the server runs, without an API key (for load balancers and scripts)."""
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model is not None and body.model != settings.model_name:
            raise APIError(
                404, f"model {body.model!r} not found: this server serves {settings.model_name!r} (see GET /v1/models)",
                "model", kind="not_found_error", code="model_not_found",
            )
        conversation = to_conversation(body, settings)
        if conversation.images and not generator.encoder.accepts_images:
            raise APIError(400, f"this server's model {settings.model_name!r} is text-only and takes no images", _image_params(body)[0])
        # Decoding (and downloading an allowed http(s) image) runs off the event loop, so other requests go on.
        conversation = await asyncio.to_thread(_with_decoded_images, conversation, _image_params(body))

        request_generator = generator.with_settings(_generation_settings(body, settings, generator.settings))
        try:
            inputs = await asyncio.to_thread(request_generator.prepare_inputs, conversation)
        except VlmtuneError as error:  # the chat template rejects the messages (roles out of order, say)
            raise APIError(400, str(error), "messages") from None
        prompt_tokens = inputs["input_ids"].shape[1]
        request_generator = _fit_context(request_generator, prompt_tokens, body.max_completion_tokens or body.max_tokens)
        if body.n != 1:
            raise APIError(400, f"n: only one choice per request is supported, got {body.n}; send the request again for more", "n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        request_id = request.state.request_id
        if body.stream:
            stream = _stream(request_generator, conversation, inputs, stops, body, request_id)
            return StreamingResponse(stream, media_type="text/event-stream")

        started = time.perf_counter()
        cancel = threading.Event()
        work = functools.partial(_generate, request_id, request_generator, conversation, inputs, stops, body.seed, cancel)
        try:
            reply = await generate_unless_disconnected(request, work, cancel)
        except VlmtuneError as error:
            raise APIError(400, str(error)) from None
        if reply is None:
            # The client is gone, so this reply is never read. Proxies such as nginx log 499 for a
            # request closed by its client.
            return error_response(499, "the client closed the connection before the reply was ready")

        answer, stopped_by_string = _cut_at_stop(reply.answer, stops)
        finish = "stop" if reply.stopped or stopped_by_string else "length"
        _log_request(request_id, reply, finish, started)
        message = {"role": "assistant", "content": answer}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": _usage(reply),
        }

    async def _stream(
        request_generator: Generator,
        conversation: Conversation,
        inputs: dict[str, torch.Tensor],
        stops: list[str],
        body: ChatRequest,
        request_id: str,
    ):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        started = time.perf_counter()
        created = int(time.time())

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            payload = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": settings.model_name,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return event([{"index": 0, "delta": delta, "finish_reason": finish}])

        def usage_chunk(usage: dict[str, int]) -> str:
            return event([], usage=usage)

        sent = {"reasoning": "", "answer": ""}

        def deltas(reasoning: str, answer: str) -> dict[str, str]:
            """Return what extends the text sent so far. Both parts only grow, so earlier text is never revised."""
            found = {}
            if reasoning.startswith(sent["reasoning"]) and len(reasoning) > len(sent["reasoning"]):
                found["reasoning_content"] = reasoning[len(sent["reasoning"]) :]
                sent["reasoning"] = reasoning
            if answer.startswith(sent["answer"]) and len(answer) > len(sent["answer"]):
                found["content"] = answer[len(sent["answer"]) :]
                sent["answer"] = answer
            return found

        def on_parts(reasoning: str, answer: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("parts", reasoning, answer))

        def run() -> Reply:
            try:
                reply = _generate(request_id, request_generator, conversation, inputs, stops, body.seed, cancel, on_parts)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", reply, None))
                return reply
            except Exception as error:  # reported to the client as a final error event
                loop.call_soon_threadsafe(queue.put_nowait, ("error", error, None))
                raise

        cancel = threading.Event()
        finished = False
        try:
            generation = await start_generation(run, request_id)
        except asyncio.CancelledError:
            logger.info("request %s: the client disconnected while waiting for its turn", request_id)
            raise
        # The error, if any, reaches the client through the queue.
        generation.add_done_callback(lambda future: future.exception() if not future.cancelled() else None)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, first, second = await queue.get()
                if kind == "parts":
                    found = deltas(first, _streamable_answer(second, stops))
                    if found:
                        yield chunk(found)
                elif kind == "done":
                    reply: Reply = first
                    answer, stopped_by_string = _cut_at_stop(reply.answer, stops)
                    # The rest of the reply, so the pieces add up to the non-streamed reply.
                    found = deltas(reply.reasoning, answer)
                    if found:
                        yield chunk(found)
                    if (sent["reasoning"], sent["answer"]) != (reply.reasoning, answer):
                        logger.warning("request %s: the streamed reply differs from the finished reply", request_id)
                    finish = "stop" if reply.stopped or stopped_by_string else "length"
                    _log_request(request_id, reply, finish, started)
                    yield chunk({}, finish)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield usage_chunk(_usage(reply))
                    break
                else:
                    logger.error("request %s failed while streaming: %s", request_id, first)
                    error = {"error": {"message": str(first), "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n"
                    break
            finished = True
        finally:
            if not finished:
                # The client went away: stop generating after the current token.
                cancel.set()
                logger.info(
                    "request %s: the client disconnected after %.2f s; stopping its generation", request_id,
                    time.perf_counter() - started,
                )
        yield "data: [DONE]\n\n"

    return app


async def _client_disconnect(request: Request) -> None:
    """Return when the client closes the connection.

    Call it once the request body has been read: then the server's next message is the
    disconnect, sent when the client goes away (or once the response is complete).
    `request.is_disconnected()` does not work here: it only checks for a message that is
    already waiting, and behind the `http` middleware none is.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _generate(
    request_id: str,
    generator: Generator,
    conversation: Conversation,
    inputs: dict[str, torch.Tensor],
    stops: list[str],
    seed: int | None,
    cancel: threading.Event,
    on_parts=None,
) -> Reply:
    """Generate the reply to one request, streamed through `on_parts` if given. `cancel` stops it after the current token."""
    if seed is not None:
        torch.manual_seed(seed)
    if on_parts is None:
        reply = generator.generate(conversation, stop_strings=stops or None, inputs=inputs, cancel=cancel)
    else:
        reply = generator.stream(
            conversation, on_parts=on_parts, stop_strings=stops or None, inputs=inputs, cancel=cancel
        )
    if cancel.is_set():
        logger.info("request %s: generation stopped after %d tokens", request_id, reply.generated_tokens)
    return reply


def _usage(reply: Reply) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.generated_tokens,
        "total_tokens": reply.prompt_tokens + reply.generated_tokens,
    }


def _log_request(request_id: str, reply: Reply, finish: str, started: float) -> None:
    logger.info(
        "request %s: %d prompt tokens, %d completion tokens, finish %s, %.2f s",
        request_id, reply.prompt_tokens, reply.generated_tokens, finish, time.perf_counter() - started,
    )
