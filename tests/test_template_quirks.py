"""Chat templates that differ from GLM's and Qwen's in ways real models do.

The model is a tiny text-only Llama with a template in the style of Gemma 2. Replies end
with `<end_of_turn>`, which the model folder's generation_config leaves out (it names only
`<eos>`). A system message raises an error, and roles must alternate.
A second template moves the system message into the last user message, as Mistral's does.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import PERSONA_DATA, train_fixed_reply_adapter
from test_serving import start_server
from vlmtune.config import GenerationSettings, ModelSettings
from vlmtune.data.conversation import Conversation, Message, TextPart
from vlmtune.encoding import ConversationEncoder
from vlmtune.encoding.encode import IGNORE_INDEX
from vlmtune.encoding.inspect import check_sample
from vlmtune.errors import DataError
from vlmtune.inference import Generator
from vlmtune.inference.export import export_merged
from vlmtune.model.loading import load_adapter, load_model, load_processor_and_stop_ids
from vlmtune.model.tiny import TEXT_INITIALIZER_RANGE, build_tokenizer, write_checkpoint
from vlmtune.serving import ServerSettings

GEMMA_STYLE_TEMPLATE = (
    "{{- '<bos>' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
    "{{- '<start_of_turn>' ~ ('model' if message.role == 'assistant' else message.role) ~ '\\n' ~ message.content | trim"
    " ~ '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
# The system message goes in front of the last user message, as in Mistral's v0.3 template.
LAST_USER_SYSTEM_TEMPLATE = (
    "{%- set system = messages[0].content if messages[0].role == 'system' else '' -%}"
    "{%- set chat = messages[1:] if system else messages -%}"
    "{%- set last_user = namespace(index=-1) -%}"
    "{%- for message in chat -%}{%- if message.role == 'user' -%}{%- set last_user.index = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<bos>' -}}"
    "{%- for message in chat -%}"
    "{%- if message.role == 'user' -%}"
    "{{- '[INST] ' ~ (system ~ '\\n\\n' if system and loop.index0 == last_user.index else '') ~ message.content ~ ' [/INST]' -}}"
    "{%- else -%}{{- message.content ~ '<eos>' -}}{%- endif -%}"
    "{%- endfor -%}"
)
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
REPLY = "好的喵~"


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    tokenizer = build_tokenizer([PERSONA_DATA], SPECIAL_TOKENS, eos_token="<eos>", pad_token="<pad>")
    tokenizer.chat_template = GEMMA_STYLE_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=TEXT_INITIALIZER_RANGE,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gemma-style") / "model"
    return write_checkpoint(folder, LlamaForCausalLM(config), tokenizer, ["<eos>"], "Gemma-style Llama", 1)


def load(folder):
    return load_model(ModelSettings(name_or_path=str(folder), hub="local", device="cpu"))


def text(role: str, content: str) -> Message:
    return Message(role, [TextPart(content)])


def two_turns_with_system() -> Conversation:
    return Conversation(
        [text("system", "你是小橘"), text("user", "你是谁？"), text("assistant", "我是小橘"),
         text("user", "再说一遍"), text("assistant", REPLY)],
        source="two turns",
    )


def token(tokenizer, name: str) -> int:
    return tokenizer.convert_tokens_to_ids(name)


def test_reply_end_of_template_is_a_stop_token(gemma_dir, caplog):
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        processor, stop_ids = load_processor_and_stop_ids(ModelSettings(name_or_path=str(gemma_dir), hub="local"))
    assert stop_ids == [token(processor, "<eos>"), token(processor, "<end_of_turn>")]
    assert "the chat template ends replies with <end_of_turn>" in caplog.text


def test_system_prompt_goes_into_the_first_user_message(gemma_dir, caplog):
    loaded = load(gemma_dir)
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
        conversation = two_turns_with_system()
        sample = encoder.encode(conversation)
    rendered = loaded.tokenizer.decode(sample.input_ids)
    end_of_turn = token(loaded.tokenizer, "<end_of_turn>")

    assert "System role not supported" in caplog.text
    assert rendered.startswith("<bos><start_of_turn>user\n你是小橘\n\n你是谁？<end_of_turn>\n<start_of_turn>model\n")
    assert check_sample(encoder, conversation, sample).ok
    for start in sample.reply_starts:
        end = sample.input_ids.index(end_of_turn, start)
        assert sample.labels[start : end + 1] == sample.input_ids[start : end + 1]  # the reply and its <end_of_turn>
        assert sample.labels[end + 1] == IGNORE_INDEX  # the line break after it
    assert token(loaded.tokenizer, "<eos>") not in sample.input_ids  # nothing that inference would not render


def test_several_system_messages_are_folded_once(gemma_dir, caplog):
    """serve turns a `developer` message into a system message, so a request can bring two."""
    loaded = load(gemma_dir)
    conversation = Conversation([text("system", "甲"), text("system", "乙"), text("user", "你好"), text("assistant", REPLY)])
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        for _ in range(2):  # as each sample generation does
            sample = ConversationEncoder(loaded.processor, loaded.stop_token_ids).encode(conversation)
    assert loaded.tokenizer.decode(sample.input_ids).startswith("<bos><start_of_turn>user\n甲\n\n乙\n\n你好<end_of_turn>")
    assert caplog.text.count("no usable system role") <= 1  # logged once per process


def test_conversation_the_template_rejects_is_named(gemma_dir):
    loaded = load(gemma_dir)
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    good = Conversation([text("user", "你好"), text("assistant", REPLY)], source="data.json, record 1 (line 2)")
    two_users = Conversation(
        [text("user", "你好"), text("user", "在吗"), text("assistant", REPLY)], source="data.json, record 2 (line 5)"
    )
    results = encoder.encode_many([good, two_users, good])

    assert [type(result).__name__ for result in results] == ["EncodedSample", "DataError", "EncodedSample"]
    assert str(results[1]).startswith("data.json, record 2 (line 5): the chat template rejects this conversation")
    assert "Conversation roles must alternate" in str(results[1])
    generator = Generator(loaded, GenerationSettings(max_new_tokens=4))
    with pytest.raises(DataError, match="record 2 .*roles must alternate"):
        generator.prepare_inputs(two_users)
    with pytest.raises(DataError, match="record 2 .*roles must alternate"):
        generator.generate_batch([good, two_users])


def test_system_message_moved_by_the_template_is_folded(gemma_dir):
    loaded = load(gemma_dir)
    loaded.tokenizer.chat_template = LAST_USER_SYSTEM_TEMPLATE
    encoder = ConversationEncoder(loaded.processor, loaded.stop_token_ids)
    conversation = two_turns_with_system()
    sample = encoder.encode(conversation)

    assert encoder.system_role_problem == "it moves the system message after the first user message"
    assert loaded.tokenizer.decode(sample.input_ids).startswith("<bos>[INST] 你是小橘\n\n你是谁？ [/INST]我是小橘<eos>")
    assert check_sample(encoder, conversation, sample).ok


def test_adapter_stops_and_serves(gemma_dir, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "你是小橘"}, {"role": "user", "content": f"第{i}个问题"},
                          {"role": "assistant", "content": REPLY}]} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    adapter = train_fixed_reply_adapter(gemma_dir, data, tmp_path / "out")
    generator = Generator(load_adapter(load(gemma_dir), str(adapter)), GenerationSettings(max_new_tokens=24))

    reply = generator.generate(Conversation([text("system", "你是小橘"), text("user", "第3个问题")]))
    assert reply.stopped
    assert reply.answer == REPLY
    # A text-only model's tokenizer pads prompts of different lengths in one batch.
    batch = generator.generate_batch([Conversation([text("user", "第3个问题")]),
                                      Conversation([text("user", "第5个问题，" * 6)])])
    assert batch[0].answer == REPLY
    assert len(batch) == 2

    def post(messages):
        body = json.dumps({"model": "gemma", "messages": messages}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    for url in start_server(generator, ServerSettings(model_name="gemma", max_tokens_limit=64)):
        status, answer = post([{"role": "system", "content": "你是小橘"}, {"role": "user", "content": "第3个问题"}])
        assert status == 200
        assert answer["choices"][0]["message"]["content"] == REPLY
        assert answer["choices"][0]["finish_reason"] == "stop"
        status, error = post([{"role": "user", "content": "你好"}, {"role": "user", "content": "在吗"}])
        assert status == 400
        assert error["error"]["param"] == "messages"
        assert "Conversation roles must alternate" in error["error"]["message"]

    # The merged model's generation_config lists <end_of_turn>, so tools other than vlmtune stop there too.
    check = export_merged(str(adapter), str(tmp_path / "merged"), ModelSettings(name_or_path=str(gemma_dir), device="cpu"))
    assert check.ok, check
    saved = json.loads((tmp_path / "merged" / "generation_config.json").read_text(encoding="utf-8"))
    tokenizer = generator.tokenizer
    assert saved["eos_token_id"] == [token(tokenizer, "<eos>"), token(tokenizer, "<end_of_turn>")]
