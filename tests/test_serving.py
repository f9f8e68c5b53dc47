"""The OpenAI-compatible server on 127.0.0.1, called with the official openai client and raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn
from PIL import Image

from vlmtune.config import GenerationSettings, ModelSettings
from vlmtune.inference import Generator
from vlmtune.model.loading import load_adapter, load_model
from vlmtune.serving import ServerSettings, create_app
from vlmtune.serving.app import APIError, ChatRequest, to_conversation

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e .[test]")
API_KEY = "test-key"
PROMPT = "第3个问题"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, trained_adapter):
    loaded = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(trained_adapter))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=64))
    settings = ServerSettings(model_name="persona", api_key=API_KEY, max_request_bytes=200_000, max_tokens_limit=256)
    yield from start_server(generator, settings)


def start_server(generator: Generator, settings: ServerSettings):
    """Serve the app on a free port of 127.0.0.1 in a thread; yield its base URL, then stop it."""
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(create_app(generator, settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started, "server did not start within 30 s"
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base_client(tiny_model_dir):
    """A client of the base model alone, whose random weights reply with text outside the think/answer layout."""
    loaded = load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=24))
    for url in start_server(generator, ServerSettings(model_name="base", max_tokens_limit=64)):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(server: str, body: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{server}/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def png_data_url(size: tuple[int, int] = (64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (240, 150, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_models_endpoint(client):
    models = client.models.list().data
    assert [model.id for model in models] == ["persona"]
    assert models[0].created > 1_700_000_000  # the server's start time, a Unix timestamp


def test_model_retrieve_and_health(client, server):
    assert client.models.retrieve("persona").id == "persona"
    with pytest.raises(openai.NotFoundError, match="model 'other' not found"):
        client.models.retrieve("other")
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:  # no API key needed
        assert json.loads(response.read()) == {"status": "ok"}
    with urllib.request.urlopen(urllib.request.Request(f"{server}/health", method="HEAD"), timeout=10) as response:
        assert response.status == 200


def test_chat_completion_stops_and_splits_reasoning(client):
    response = client.chat.completions.create(model="persona", messages=[{"role": "user", "content": PROMPT}])
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == "好的喵~"
    assert "<answer>" not in choice.message.content
    assert "<think>" not in choice.message.content
    assert response.usage.completion_tokens < 64
    assert response.usage.prompt_tokens > 0


def test_streaming_matches_non_streaming(client):
    stream = client.chat.completions.create(model="persona", messages=[{"role": "user", "content": PROMPT}], stream=True)
    chunks = list(stream)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == "好的喵~"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"


@pytest.mark.parametrize("prompt", ["你好", "给我讲一个关于猫的长故事"])
def test_streamed_plain_reply_matches(base_client, prompt):
    messages = [{"role": "user", "content": prompt}]
    whole = base_client.chat.completions.create(model="base", messages=messages).choices[0].message
    chunks = list(base_client.chat.completions.create(model="base", messages=messages, stream=True))
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert whole.content  # text outside the layout is the answer
    assert content == whole.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_image_as_data_url(client):
    response = client.chat.completions.create(
        model="persona",
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url()}},
            {"type": "text", "text": "这是什么颜色？"},
        ]}],
        max_tokens=16,
    )
    text_only = client.chat.completions.create(
        model="persona", messages=[{"role": "user", "content": [{"type": "text", "text": "这是什么颜色？"}]}], max_tokens=1
    )
    # A 64x48 image is scaled up to 56x56: 4x4 patches, merged 2x2 into 4 image tokens, plus begin and end markers.
    assert response.usage.prompt_tokens - text_only.usage.prompt_tokens == 6
    assert response.choices[0].finish_reason in ("stop", "length")


def test_each_image_decoded_once(client, monkeypatch):
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    image = {"type": "image_url", "image_url": {"url": png_data_url()}}
    messages = [{"role": "user", "content": [image, image, {"type": "text", "text": "这两张是什么颜色？"}]}]
    response = client.chat.completions.create(model="persona", messages=messages, max_tokens=4)
    assert len(opened) == 2
    text_only = client.chat.completions.create(
        model="persona", messages=[{"role": "user", "content": messages[0]["content"][2:]}], max_tokens=1
    )
    # Both images reached the model: 6 prompt tokens each, as in test_image_as_data_url.
    assert response.usage.prompt_tokens - text_only.usage.prompt_tokens == 12

    opened.clear()
    chunks = list(client.chat.completions.create(model="persona", messages=messages, max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(opened) == 2


def test_max_tokens_cut_reports_length(client):
    response = client.chat.completions.create(
        model="persona", messages=[{"role": "user", "content": "第3个问题"}], max_tokens=2
    )
    # A training prompt: the trained layout alone needs more than two tokens, so the reply is cut.
    assert response.usage.completion_tokens == 2
    assert response.choices[0].finish_reason == "length"


def test_stop_string_ignores_layout_tags(client):
    # "think" occurs in the <think> tag the reply starts with; only the answer is searched.
    response = client.chat.completions.create(model="persona", messages=[{"role": "user", "content": PROMPT}], stop=["think"])
    assert response.choices[0].message.content == "好的喵~"
    assert response.choices[0].finish_reason == "stop"


def test_unknown_path_and_invalid_json(server):
    request = urllib.request.Request(f"{server}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    payload = json.loads(caught.value.read())
    assert caught.value.code == 404
    assert payload["error"]["type"] == "not_found_error"
    code, payload = post(server, b'{"messages": [')
    assert code == 400
    assert payload["error"]["message"].startswith("the request body is not valid JSON")
    assert payload["error"]["param"] is None
    gbk = json.dumps({"messages": [{"role": "user", "content": "你好"}]}, ensure_ascii=False).encode("gbk")
    code, payload = post(server, gbk)
    assert code == 400
    assert payload["error"]["message"].endswith("the request body could not be read: send JSON encoded as UTF-8")


def test_stop_string_cuts_the_answer(client):
    response = client.chat.completions.create(model="persona", messages=[{"role": "user", "content": PROMPT}], stop=["喵"])
    assert response.choices[0].message.content == "好的"
    assert response.choices[0].finish_reason == "stop"
    # Generation ends at the stop string: "~", "</answer>" and the stop token are not generated.
    full = client.chat.completions.create(model="persona", messages=[{"role": "user", "content": PROMPT}])
    assert full.choices[0].message.content == "好的喵~"
    assert response.usage.completion_tokens < full.usage.completion_tokens
    streamed = list(
        client.chat.completions.create(
            model="persona", messages=[{"role": "user", "content": PROMPT}], stop=["喵"], stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == "好的"
    assert streamed[-1].usage.completion_tokens == response.usage.completion_tokens


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "persona"}, 400, "messages"),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, None),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
         400, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
         400, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
         400, None),
        ({"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}]}, 400, "messages[0].content[0].type"),
        # An aspect ratio that GLM-4.1V's image processor rejects.
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url((10, 3000))}}]}]},
         400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, payload = post(server, json.dumps(body).encode())
    assert code == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert payload["error"]["param"] == param


def test_unknown_part_type_explained(server):
    body = {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "?"}]}]}
    code, payload = post(server, json.dumps(body).encode())
    assert code == 400
    assert payload["error"]["message"].startswith("content part type 'image' is not supported: send {'type': 'text'")
    assert "'image_url': {'url': 'data:image/png;base64,...'}" in payload["error"]["message"]


def test_oversized_body_rejected(server):
    body = json.dumps({"messages": [{"role": "user", "content": "喵" * 50_000}]}).encode()  # about 300 kB, 1.5x the limit
    code, payload = post(server, body)
    assert code == 413
    assert "exceeds the limit" in payload["error"]["message"]


def host_and_port(url: str) -> tuple[str, int]:
    """Split a server URL of start_server into host and port, for raw HTTP connections."""
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def post_chunked(server: str, body: bytes) -> tuple[int, dict]:
    """POST the body with Transfer-Encoding: chunked, so the request has no Content-Length."""
    import http.client

    host, port = host_and_port(server)
    connection = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    pieces = (body[start : start + 65536] for start in range(0, len(body), 65536))
    connection.request("POST", "/v1/chat/completions", pieces, headers, encode_chunked=True)
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def test_chunked_body_limited(server):
    code, payload = post_chunked(server, json.dumps({"messages": [{"role": "user", "content": "喵" * 50_000}]}).encode())
    assert code == 413
    assert "request body exceeds the limit of 200000 bytes" in payload["error"]["message"]

    code, payload = post_chunked(server, json.dumps({"messages": [{"role": "user", "content": PROMPT}]}).encode())
    assert code == 200, payload
    assert payload["choices"][0]["message"]["content"] == "好的喵~"


def test_api_key_enforced(server):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    for key in (None, "wrong"):
        code, payload = post(server, body, key=key)
        assert code == 401
        assert payload["error"]["type"] == "authentication_error"


def test_concurrent_requests_are_queued(client):
    results: list[str] = []

    def ask() -> None:
        response = client.chat.completions.create(model="persona", messages=[{"role": "user", "content": PROMPT}])
        results.append(response.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == ["好的喵~"] * 3


def test_unknown_model_is_not_found(server):
    code, payload = post(server, json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert code == 404
    assert payload["error"]["type"] == "not_found_error"
    assert payload["error"]["param"] == "model"
    assert "'persona'" in payload["error"]["message"]


def test_default_system_prompt_only_without_one():
    settings = ServerSettings(model_name="persona", system_prompt="你是小橘。")
    plain = to_conversation(ChatRequest(messages=[{"role": "user", "content": "你好"}]), settings)
    assert [message.role for message in plain.messages] == ["system", "user"]
    assert plain.messages[0].text == "你是小橘。"
    own = to_conversation(
        ChatRequest(messages=[{"role": "system", "content": "你是沐雪。"}, {"role": "user", "content": "你好"}]), settings
    )
    assert [message.text for message in own.messages] == ["你是沐雪。", "你好"]
    developer = to_conversation(
        ChatRequest(messages=[{"role": "developer", "content": "你是沐雪。"}, {"role": "user", "content": "你好"}]), settings
    )
    assert [message.role for message in developer.messages] == ["system", "user"]  # OpenAI's newer name for it
    assert [message.text for message in developer.messages] == ["你是沐雪。", "你好"]


def test_image_url_cannot_leave_allowed_prefix(tmp_path):
    settings = ServerSettings(model_name="persona", allowed_image_prefixes=[f"file://{tmp_path}/images/"])
    allowed = f"file://{tmp_path}/images/cat.png"
    request = ChatRequest(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": allowed}}]}])
    assert [image.source for image in to_conversation(request, settings).messages[0].images] == [allowed]
    for url in [f"file://{tmp_path}/images/../secret.png", f"file://{tmp_path}/images/%2e%2e/secret.png"]:
        request = ChatRequest(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
        with pytest.raises(APIError) as caught:
            to_conversation(request, settings)
        assert caught.value.status == 400
        assert "contains a '..' segment" in caught.value.message
        assert caught.value.param == "messages[0].content[0]"


def test_context_length_checked(tiny_model_dir):
    loaded = load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"))
    loaded.model.config.get_text_config().max_position_embeddings = 120
    generator = Generator(loaded, GenerationSettings(max_new_tokens=64))
    short = {"messages": [{"role": "user", "content": "你好"}]}
    prompt = to_conversation(ChatRequest(**short), ServerSettings(model_name="m"))
    prompt_tokens = generator.prepare_inputs(prompt)["input_ids"].shape[1]
    long_text = "喵" * 400
    for url in start_server(generator, ServerSettings(model_name="m", max_tokens_limit=256)):
        code, payload = post(url, json.dumps({"messages": [{"role": "user", "content": long_text}]}).encode())
        assert code == 400
        assert payload["error"]["code"] == "context_length_exceeded"
        assert payload["error"]["param"] == "messages"
        assert "maximum context length is 120 tokens" in payload["error"]["message"]

        code, payload = post(url, json.dumps({**short, "max_tokens": 200}).encode())
        assert code == 400
        assert payload["error"]["param"] == "max_tokens"
        assert f"lower max_tokens to {120 - prompt_tokens} or less" in payload["error"]["message"]

        code, payload = post(url, json.dumps({**short, "max_tokens": 120 - prompt_tokens}).encode())
        assert code == 200, payload
        # Without max_tokens, the server's default of 256 shrinks to what the context has left.
        code, payload = post(url, json.dumps({**short, "temperature": 0}).encode())
        assert code == 200, payload
        assert payload["usage"]["total_tokens"] <= 120


def test_request_errors_name_fields(server):
    cases = [
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected a string or a list of content parts, got 5"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
         "messages[0].content[0].image_url", "expected {'url': URL} or a URL string, got 5"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop", "expected a string or a list of strings"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["喵", ""]}, "stop", "stop: stop strings must not be empty; stop[1] is"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ""}, "stop", "stop: stop strings must not be empty"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "Input should be 'system', 'developer', 'user' or 'assistant'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}]},
         "messages[0].content[0]", "image"),
    ]
    for body, param, message in cases:
        code, payload = post(server, json.dumps(body).encode())
        assert code == 400, body
        assert payload["error"]["param"] == param, payload
        assert message in payload["error"]["message"], payload
        assert payload["error"]["code"] is None


def test_body_without_json_content_type(server):
    request = urllib.request.Request(
        f"{server}/v1/chat/completions", data=b"messages=hi", headers={"Authorization": f"Bearer {API_KEY}"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    payload = json.loads(caught.value.read())
    assert caught.value.code == 400
    assert "sent with 'Content-Type: application/json'" in payload["error"]["message"]


@pytest.fixture(scope="module")
def long_server(tiny_model_dir):
    """The base model, whose random weights rarely stop, with room for long replies."""
    loaded = load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu"))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=3000))
    yield from start_server(generator, ServerSettings(model_name="base", max_tokens_limit=3000))


def generation_threads() -> list[threading.Thread]:
    from vlmtune.serving.app import GENERATION_THREAD

    return [thread for thread in threading.enumerate() if thread.name.startswith(GENERATION_THREAD)]


def generations_end_within(seconds: float) -> bool:
    """Wait up to `seconds` for the server's generation threads to end; return whether they did."""
    deadline = time.time() + seconds
    while generation_threads() and time.time() < deadline:
        time.sleep(0.05)
    return not generation_threads()


def log_shows(caplog, text: str, seconds: float) -> bool:
    """Wait up to `seconds` for `text` to appear in the captured log; return whether it did."""
    deadline = time.time() + seconds
    while text not in caplog.text and time.time() < deadline:
        time.sleep(0.05)
    return text in caplog.text


def test_disconnected_stream_stops_generation(long_server, caplog):
    import http.client

    host, port = host_and_port(long_server)
    connection = http.client.HTTPConnection(host, port, timeout=60)
    body = {"stream": True, "max_tokens": 3000, "messages": [{"role": "user", "content": "讲个故事"}]}
    with caplog.at_level("INFO", logger="vlmtune.serving.app"):
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        for _ in range(5):  # a few chunks, then the client goes away
            assert response.readline()
        assert generation_threads(), "the generation runs while the client reads"
        connection.close()

        # The next request waits for the lock, which the abandoned generation holds until it stops.
        status, reply = post(long_server, json.dumps({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).encode(), key=None)
        assert status == 200
        assert reply["usage"]["completion_tokens"] <= 4
        assert generations_end_within(5), "a generation kept running after its client disconnected"
    assert "the client disconnected" in caplog.text
    [stopped] = re.findall(r"generation stopped after (\d+) tokens", caplog.text)
    assert int(stopped) < 3000


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_queued_request_of_gone_client(long_server, caplog, stream):
    import http.client

    host, port = host_and_port(long_server)
    first_body = json.dumps({"stream": True, "max_tokens": 3000, "messages": [{"role": "user", "content": "讲个故事"}]})
    queued_body = json.dumps({"stream": stream, "max_tokens": 3000, "messages": [{"role": "user", "content": "第二个故事"}]})
    first, queued = (http.client.HTTPConnection(host, port, timeout=60) for _ in range(2))
    with caplog.at_level("INFO", logger="vlmtune.serving.app"):
        first.request("POST", "/v1/chat/completions", first_body, {"Content-Type": "application/json"})
        assert first.getresponse().readline()  # the first request has the generation lock
        queued.request("POST", "/v1/chat/completions", queued_body, {"Content-Type": "application/json"})
        time.sleep(0.5)  # the second request waits for its turn
        queued.close()
        assert log_shows(caplog, "the client disconnected while waiting for its turn", 10)
        first.close()
        # The first generation must end here, so that the next test's log contains only its own.
        assert generations_end_within(10)
    # Only the first request generated, so there is one stop line, for it, and no finished reply.
    assert len(re.findall(r"generation stopped after \d+ tokens", caplog.text)) == 1
    assert "completion tokens" not in caplog.text


def test_disconnected_request_stops_generation(long_server, caplog):
    import http.client

    host, port = host_and_port(long_server)
    connection = http.client.HTTPConnection(host, port, timeout=60)
    body = {"max_tokens": 3000, "messages": [{"role": "user", "content": "讲个故事"}]}
    with caplog.at_level("INFO", logger="vlmtune.serving.app"):
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        deadline = time.time() + 10
        while not generation_threads() and time.time() < deadline:
            time.sleep(0.02)
        assert generation_threads(), "the generation did not start"
        connection.close()  # without reading the reply
        assert generations_end_within(10), "a generation kept running after its client disconnected"
    assert "the client disconnected after" in caplog.text
    [stopped] = re.findall(r"generation stopped after (\d+) tokens", caplog.text)
    assert int(stopped) < 3000
