"""The same code on models other than GLM-4.1V: tiny Qwen2.5-VL, text-only Qwen2.5 and GLM-4.5V.

Qwen's template closes every reply with its own stop token (`<|im_end|>`) and puts a line
break after it. Its module names differ from GLM's (`gate_proj`/`up_proj` instead of the
fused `gate_up_proj`). The text-only model loads through AutoModelForCausalLM with a
tokenizer as its processor. GLM-4.5V keeps its routed experts as fused tensors, which peft
adapts in place of Linear layers.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import PERSONA_DATA, encode_with_pixels, train_fixed_reply_adapter, write_json
from test_images import IMAGE_DATA
from test_serving import start_server
from vlmtune.cli.main import app
from vlmtune.config import DatasetSpec, GenerationSettings, ModelSettings
from vlmtune.data.conversation import Conversation, ImagePart, Message, TextPart
from vlmtune.data.loading import load_dataset_file
from vlmtune.encoding import ChatCollator, ConversationEncoder
from vlmtune.encoding.encode import IGNORE_INDEX
from vlmtune.encoding.inspect import check_sample
from vlmtune.errors import ConfigError, DataError, ModelError, TemplateError
from vlmtune.inference import Generator
from vlmtune.inference.export import export_merged
from vlmtune.inference.predict import predict
from vlmtune.model.loading import load_adapter, load_model
from vlmtune.model.lora import resolve_target_modules
from vlmtune.model.packing import PackedPositions
from vlmtune.model.tiny import build_tiny_glm4v_moe
from vlmtune.serving import ServerSettings
from vlmtune.model.tiny_qwen import QWEN_STOP_TOKENS, build_tiny_qwen2, build_tiny_qwen2_5_vl
from vlmtune.training.batch_checks import padding_free_difference

BUILDERS = {"qwen2.5-vl": build_tiny_qwen2_5_vl, "qwen2.5": build_tiny_qwen2}
REPLY = "好的喵~"
IMAGE = str(IMAGE_DATA.parent / "images" / "circle_00.png")


@pytest.fixture(scope="module", params=list(BUILDERS))
def model_dir(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "model", [PERSONA_DATA], seed=0)


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2.5-vl") / "model", [PERSONA_DATA], seed=0)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen2.5") / "model", [PERSONA_DATA], seed=0)


def load(folder):
    return load_model(ModelSettings(name_or_path=str(folder), hub="local", device="cpu"))


def message(role: str, text: str, images: tuple[str, ...] = ()) -> Message:
    return Message(role, [*(ImagePart(image) for image in images), TextPart(text)])


def data_url(path: str) -> str:
    with open(path, "rb") as image:
        return "data:image/png;base64," + base64.b64encode(image.read()).decode()


def token(loaded, text: str) -> int:
    return loaded.tokenizer.convert_tokens_to_ids(text)


def test_text_template_renders_like_qwen(text_dir):
    loaded = load(text_dir)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "喵~"}]
    rendered = loaded.tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n喵~<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "你是小橘。"}, messages[0]]
    assert loaded.tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\n你是小橘。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


def test_vision_template_renders_like_qwen2_5_vl(vl_dir):
    loaded = load(vl_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "图里是什么？"}]}]
    assert loaded.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>图里是什么？<|im_end|>\n<|im_start|>assistant\n"
    )
    assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert loaded.stop_token_ids == [token(loaded, name) for name in QWEN_STOP_TOKENS]


def test_each_reply_ends_on_supervised_im_end(model_dir):
    loaded = load(model_dir)
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    conversation = Conversation(
        [message("user", "你是谁？"), message("assistant", "我是小橘喵~"), message("user", "再说一遍"), message("assistant", REPLY)],
        source="two turns",
    )
    sample = encoder.encode(conversation)
    im_end, newline = token(loaded, "<|im_end|>"), loaded.tokenizer("\n", add_special_tokens=False)["input_ids"]

    assert encoder.layout == "none"
    assert encoder.end_of_turn_id == im_end
    assert check_sample(encoder, conversation, sample).ok
    for start in sample.reply_starts:
        end = sample.input_ids.index(im_end, start)
        assert sample.labels[start : end + 1] == sample.input_ids[start : end + 1]  # the reply and its <|im_end|>
        assert sample.input_ids[end + 1 : end + 1 + len(newline)] == newline
        assert all(label == IGNORE_INDEX for label in sample.labels[end + 1 : end + 1 + len(newline)])
    assert sample.labels[: sample.reply_starts[0]] == [IGNORE_INDEX] * sample.reply_starts[0]


# A ChatML template that renders reasoning the way Qwen3's does: in a think block before the answer.
REASONING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and message.get('reasoning_content') %}"
    "<think>\n{{ message['reasoning_content'] }}\n</think>\n\n{% endif %}"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_reasoning_content_template_trains_reasoning(text_dir, caplog):
    loaded = load(text_dir)
    loaded.tokenizer.chat_template = REASONING_TEMPLATE
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    reply = Message("assistant", [TextPart("2喵")], reasoning="一加一等于二。")
    conversation = Conversation([message("user", "1+1=?"), reply], source="reasoning")
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        sample = encoder.encode(conversation)
    supervised = [token_id for token_id, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]

    assert encoder.layout == "think"
    assert loaded.tokenizer.decode(supervised) == "<think>\n一加一等于二。\n</think>\n\n2喵<|im_end|>"
    assert check_sample(encoder, conversation, sample).ok
    assert "reasoning" not in caplog.text


def test_think_layout_reply_split_after_training(text_dir, tmp_path):
    loaded = load(text_dir)
    loaded.tokenizer.chat_template = REASONING_TEMPLATE
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (tmp_path / "model" / name).write_bytes((text_dir / name).read_bytes())
    rows = [{"messages": [{"role": "user", "content": f"第{i}个问题"},
                          {"role": "assistant", "content": REPLY, "reasoning_content": "想一想"}]} for i in range(8)]
    adapter = train_fixed_reply(tmp_path / "model", tmp_path, rows=rows)
    generator = Generator(load_adapter(load(tmp_path / "model"), str(adapter)), GenerationSettings(max_new_tokens=24))
    pieces = []
    reply = generator.stream(Conversation([message("user", "第3个问题")]), on_text=pieces.append)

    assert generator.layout == "think"
    assert reply.stopped
    assert reply.reasoning.strip() == "想一想"
    assert reply.answer == REPLY
    assert "".join(pieces) == REPLY  # the reasoning is not shown by default


def test_think_layout_needs_reasoning_template(text_dir):
    loaded = load(text_dir)
    with pytest.raises(TemplateError, match=r"reply layout think .* does not render an assistant message's reasoning_content"):
        ConversationEncoder(loaded.processor, loaded.stop_token_ids, thinking="think")


def test_unrendered_reasoning_is_warned(text_dir, caplog):
    loaded = load(text_dir)
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    inline = Conversation([message("user", "2+2=?"), message("assistant", "<think>二加二等于四。</think>4喵")], source="inline")
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        sample = encoder.encode(inline)
    supervised = [token_id for token_id, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]

    assert encoder.layout == "none"
    assert loaded.tokenizer.decode(supervised) == "4喵<|im_end|>"
    assert "replies with reasoning are trained on their answers only, because the chat template" in caplog.text
    assert "(first: inline). Set data.thinking: think_answer" in caplog.text


def test_lora_targets_the_language_model_only(model_dir):
    loaded = load(model_dir)
    targets = resolve_target_modules(loaded.model, "auto")
    leaves = {name.rsplit(".", 1)[1] for name in targets}

    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(targets) == 2 * 7  # two decoder layers
    assert not [name for name in targets if "visual" in name]
    if "qwen2.5-vl" in str(model_dir):
        with pytest.raises(ConfigError, match="vision tower"):
            resolve_target_modules(loaded.model, ["qkv"])


@pytest.mark.parametrize("setting, message", [("vision", "has no vision tower"), ("train_merger", "has no 'merger' module")])
def test_text_model_rejects_vision_lora(text_dir, setting, message):
    from vlmtune.config import LoraSettings
    from vlmtune.model.lora import apply_lora

    model = load(text_dir).model
    with pytest.raises(ConfigError, match=rf"lora.{setting}: true, but Qwen2ForCausalLM {message}"):
        apply_lora(model, LoraSettings(**{setting: True}))


def test_text_model_rejects_images(text_dir):
    generator = Generator(load(text_dir), GenerationSettings(max_new_tokens=4))
    with_image = Conversation([message("user", "图里是什么？", (IMAGE,)), message("assistant", REPLY)], source="data.jsonl, record 1")

    with pytest.raises(DataError, match=r"data.jsonl, record 1: 1 image\(s\) given, but the model is text-only") as error:
        generator.encoder.encode(with_image)
    assert error.value.reason == "images for a text-only model"  # how data.on_invalid=skip counts it
    with pytest.raises(DataError, match="text-only"):
        generator.prepare_inputs(Conversation([message("user", "图里是什么？", (IMAGE,))]))

    output = text_dir.parent / "predictions.jsonl"
    with pytest.raises(DataError, match="text-only"):
        predict(generator, [Conversation([message("user", "图里是什么？", (IMAGE,))], source="p.json, record 1")], output)
    assert not output.exists()  # no empty file left behind

    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "图里是什么？"}, {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}]}
    for url in start_server(generator, ServerSettings(model_name="text")):
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(request, timeout=60)
    error = json.loads(failure.value.read())["error"]
    assert failure.value.code == 400
    assert error["param"] == "messages[0].content[1]"
    assert "text-only" in error["message"]


def test_text_model_image_prompt_rejected_before_tracking(text_dir, tmp_path):
    """An evaluation prompt with an image fails in setup, before SwanLab writes a run folder."""
    from vlmtune.config import build_config
    from vlmtune.training.recipe import LoraRecipe

    rows = [{"instruction": f"第{i}个问题", "input": "", "output": REPLY} for i in range(4)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    tree = {
        "model": {"name_or_path": str(text_dir), "device": "cpu"},
        "data": {"train": [str(data)], "max_length": 128},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2},
        "tracking": {"backend": "swanlab"},
        "evaluation": {"prompts": ["你好", {"text": "图里是什么？", "images": [IMAGE]}]},
    }
    recipe = LoraRecipe(build_config(tree))
    with pytest.raises(DataError, match=r"evaluation.prompts\[1\]: 1 image\(s\) given, but the model is text-only"):
        recipe.setup()
    assert not (tmp_path / "out" / "swanlog").exists()


def train_fixed_reply(model_dir, folder, images: tuple[str, ...] = (), rows: list | None = None, **lora):
    """Train an adapter on one fixed reply in the messages layout, with images when given."""
    rows = rows or [
        {"messages": [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                                   {"type": "text", "text": f"第{i}个问题"}]},
                      {"role": "assistant", "content": REPLY}]}
        for i in range(8)
    ]
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return train_fixed_reply_adapter(model_dir, data, folder / "out", **lora)


def test_adapter_learns_reply_and_stop(model_dir, tmp_path):
    adapter = train_fixed_reply(model_dir, tmp_path)
    loaded = load_adapter(load(model_dir), str(adapter))
    generator = Generator(loaded, GenerationSettings(max_new_tokens=24))
    reply = generator.generate(Conversation([message("user", "第3个问题")]))

    assert reply.stopped
    assert reply.text == REPLY
    assert reply.generated_tokens < 24


@pytest.fixture(scope="module")
def vl_adapter(vl_dir, tmp_path_factory):
    return train_fixed_reply(vl_dir, tmp_path_factory.mktemp("vl-adapter"), images=(IMAGE,))


def test_image_conversation_trains_and_answers(vl_dir, vl_adapter):
    loaded = load_adapter(load(vl_dir), str(vl_adapter))
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    conversation = Conversation([message("user", "第3个问题", (IMAGE,)), message("assistant", REPLY)], source="image")
    sample = encoder.encode(conversation)
    image_tokens = sample.input_ids.count(token(loaded, "<|image_pad|>"))

    assert image_tokens == int(sample.image_grid_thw.prod()) // 4  # 2x2 patches merge into one token
    assert check_sample(encoder, conversation, sample).ok
    reply = Generator(loaded, GenerationSettings(max_new_tokens=24)).generate(
        Conversation([message("user", "第3个问题", (IMAGE,))])
    )
    assert reply.stopped
    assert reply.text == REPLY


def test_adapter_of_other_base_rejected(text_dir, vl_adapter, vl_dir):
    with pytest.raises(ModelError, match=rf"adapter {vl_adapter} does not fit the base model .*it was trained on {vl_dir}"):
        load_adapter(load(text_dir), str(vl_adapter))


def test_padding_free_rows_match_padded_batches(vl_dir):
    loaded = load(vl_dir)
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    conversations = load_dataset_file(DatasetSpec(path=str(PERSONA_DATA)))[:3] + load_dataset_file(DatasetSpec(path=str(IMAGE_DATA)))[:2]
    samples = encode_with_pixels(encoder, conversations)
    pad = loaded.tokenizer.pad_token_id
    padded = ChatCollator(pad_token_id=pad)
    packed = ChatCollator(pad_token_id=pad, positions=PackedPositions(loaded.model))

    assert packed(samples)["position_ids"].shape[0] == 4  # text positions, then Qwen's temporal/height/width
    assert padding_free_difference(loaded.model, padded, packed, samples) < 1e-4
    assert padding_free_difference(loaded.model, padded, packed, samples[3:]) < 1e-4  # the two image samples

    def plain_positions(input_ids, *_):
        return torch.arange(len(input_ids)).unsqueeze(0)  # Qwen2.5-VL also needs four rows to build the mask

    leaking = ChatCollator(pad_token_id=pad, positions=plain_positions)
    assert padding_free_difference(loaded.model, padded, leaking, samples) > 0.05

    loaded.model.train()
    losses = []
    for collator in (padded, packed):
        with torch.no_grad():
            losses.append(loaded.model(**collator(samples)).loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-5)


def test_server_answers_with_an_image(vl_dir, vl_adapter):
    generator = Generator(load_adapter(load(vl_dir), str(vl_adapter)), GenerationSettings(max_new_tokens=24))
    body = {"model": "qwen", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}, {"type": "text", "text": "第3个问题"}]}]}
    for url in start_server(generator, ServerSettings(model_name="qwen", max_tokens_limit=64)):
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    assert answer["choices"][0]["message"]["content"] == REPLY
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_merged_export_reloads(vl_dir, vl_adapter, tmp_path):
    check = export_merged(str(vl_adapter), str(tmp_path / "merged"), ModelSettings(name_or_path=str(vl_dir), device="cpu"))
    assert check.ok, check
    assert type(load(tmp_path / "merged").model).__name__ == "Qwen2_5_VLForConditionalGeneration"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_tiny_glm4v_moe(tmp_path_factory.mktemp("glm4.5v") / "model", [PERSONA_DATA], seed=0)


def test_moe_dropout_rejected_before_loading(moe_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vlmtune"), pytest.raises(ConfigError, match="set lora.dropout: 0") as error:
        train_fixed_reply(moe_dir, tmp_path, dropout=0.05)
    assert "gate_up_proj" in str(error.value)
    assert "Glm4vMoeForConditionalGeneration" in str(error.value)
    assert "vlmtune.model.loading" not in caplog.text  # the weights were never loaded


def test_moe_adapter_targets_and_learns(moe_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        adapter = train_fixed_reply(moe_dir, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    logged = caplog.text

    assert set(config["target_parameters"]) == {"gate_up_proj", "down_proj"}  # the fused routed experts
    assert "LoRA on 16 Linear layers of the language model: k_proj, o_proj, q_proj, v_proj" in logged
    assert "LoRA on 6 fused MoE expert tensors: down_proj, gate_up_proj" in logged
    # peft 0.21.2 drops the dense layer's and the shared experts' MLP Linear layers, and the log warns about it.
    assert "did not adapt 12 of the 28 Linear layers" in logged
    reply = Generator(load_adapter(load(moe_dir), str(adapter)), GenerationSettings(max_new_tokens=24)).generate(
        Conversation([message("user", "第3个问题")])
    )
    assert reply.stopped
    assert reply.answer == REPLY

    # peft doubles the rank of the fused gate_up tensor, which holds two projections. It then warns
    # that its own rank_pattern key was ignored, so the CLI hides that false warning.
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        gate_up = weights.get_tensor("base_model.model.model.language_model.layers.1.mlp.experts.base_layer.lora_A.weight")
    assert gate_up.shape[0] == 2 * 16 * 4  # twice lora.r, for each of the 4 experts
    chat = subprocess.run([str(Path(sys.executable).parent / "vlmtune"), "chat", "--adapter", str(adapter), "--message", "你好",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "keys did not match any targeted module" not in chat.stderr


def test_glm45v_reply_layout(moe_dir):
    """GLM-4.5V's tokenizer has GLM-4.1V's <answer> tags, but its template lays out replies itself."""
    loaded = load(moe_dir)
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    conversation = Conversation(
        [message("user", "你是谁？"), message("assistant", "我是小橘"),
         message("user", "再说一遍", images=(IMAGE,)), Message("assistant", [TextPart(REPLY)], reasoning="还是小橘")],
        source="two turns",
    )
    sample = encoder.encode(conversation)
    supervised = [loaded.tokenizer.decode(sample.input_ids[start:end]) for start, end in supervised_spans(sample)]

    assert encoder.layout == "think"
    assert check_sample(encoder, conversation, sample).ok
    # A reply without reasoning gets the template's empty think block; no reply gets answer tags.
    assert supervised == ["\n<think></think>\n我是小橘<|user|>", f"\n<think>还是小橘</think>\n{REPLY}<|user|>"]


def supervised_spans(sample) -> list[tuple[int, int]]:
    """The [start, end) ranges of consecutive supervised labels."""
    spans, start = [], None
    for index, label in enumerate([*sample.labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, index))
            start = None
    return spans


@pytest.mark.parametrize("architecture, model_class", [("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration"),
                                                      ("qwen2.5", "Qwen2ForCausalLM"),
                                                      ("glm4.5v", "Glm4vMoeForConditionalGeneration")])
def test_tiny_model_command_architectures(tmp_path, architecture, model_class):
    corpus = write_json(tmp_path / "corpus.json", [{"text": "你好喵"}])
    result = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "model"), "--architecture", architecture, "--corpus", str(corpus)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "model" / "config.json").read_text())["architectures"] == [model_class]
