"""Reading Alpaca JSON and JSONL files into conversations, and the errors for bad records."""

from __future__ import annotations

import json

import pytest

from conftest import PERSONA_DATA, write_json
from vlmtune.config import DatasetSpec, DataSettings
from vlmtune.data import load_conversations, load_dataset_file
from vlmtune.data.records import read_records
from vlmtune.errors import DataError


def texts(conversation) -> list[tuple[str, str]]:
    return [(message.role, message.text) for message in conversation.messages]


def test_alpaca_with_system_history_and_input(tmp_path):
    path = write_json(
        tmp_path / "a.json",
        [
            {
                "instruction": "翻译成英文",
                "input": "早上好",
                "output": "Good morning 喵~",
                "system": "你是小橘。",
                "history": [["你好", "你好喵~"]],
            }
        ],
    )
    [conversation] = load_dataset_file(DatasetSpec(path=str(path)))
    assert texts(conversation) == [
        ("system", "你是小橘。"),
        ("user", "你好"),
        ("assistant", "你好喵~"),
        ("user", "翻译成英文\n早上好"),
        ("assistant", "Good morning 喵~"),
    ]
    assert conversation.source == f"{path}, record 1 (line 2)"


def test_default_system_prompt_only_when_missing(tmp_path):
    path = write_json(
        tmp_path / "a.json",
        [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": "a2", "system": "own"}],
    )
    first, second = load_conversations(DataSettings(train=[str(path)], system_prompt="default"))
    assert texts(first)[0] == ("system", "default")
    assert texts(second)[0] == ("system", "own")


def test_jsonl_and_bom_accepted(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"instruction": f"q{i}", "output": "喵"}, ensure_ascii=False) for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(lines).encode("utf-8"))
    conversations = load_dataset_file(DatasetSpec(path=str(path)))
    assert [c.messages[0].text for c in conversations] == ["q0", "q1", "q2"]
    assert conversations[2].source.endswith("record 3 (line 5)")


def test_jsonl_holding_json_array(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps([{"instruction": "q", "output": "喵"}] * 3, ensure_ascii=False, indent=1), encoding="utf-8")
    with pytest.raises(DataError, match=r"a.jsonl: a .jsonl dataset .* one JSON array of 3 examples; rename it to .json"):
        load_dataset_file(DatasetSpec(path=str(path)))


def test_json_array_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n\n {"instruction": "c", "output": ""}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"a.json, record 2 \(line 4\): field 'output' is empty"):
        load_dataset_file(DatasetSpec(path=str(path)))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"instruction": "q"}, r"record 1 \(line 1\): field 'output' is missing"),
        ({"instruction": 3, "output": "a"}, r"field 'instruction' must be a string, got int 3"),
        ({"instruction": "q", "output": None}, r"field 'output' is null; it must be a string"),
        ({"instruction": "q", "output": ["a"]}, r"field 'output' must be a string, got list"),
        ({"instruction": "q", "output": "a", "history": "x"}, r"field 'history' must be a list, got str"),
        ({"instruction": "q", "output": "a", "history": [["only user"]]}, r"field 'history\[0\]' must be a pair"),
        ({"instruction": "q", "output": "a", "history": [["u", ""]]}, r"field 'history\[0\]' must be a pair"),
        ({"instruction": "q", "output": "a", "system": 5}, r"field 'system' must be a string"),
    ],
)
def test_bad_alpaca_fields(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_dataset_file(DatasetSpec(path=str(path)))


def test_malformed_json_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q" "output": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, column 21: malformed JSON"):
        read_records(path)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "q", "output": "a"}\n{"instruction": "\xff", "output": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid UTF-8"):
        read_records(path)


def test_empty_missing_and_unsupported_files(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="the file is empty"):
        read_records(empty)
    with pytest.raises(DataError, match="dataset file not found"):
        read_records(tmp_path / "missing.json")
    other = tmp_path / "data.txt"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        read_records(other)


def test_unknown_layout_lists_keys(tmp_path):
    path = write_json(tmp_path / "a.json", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"cannot tell the dataset layout from the keys \['completion', 'prompt'\]") as caught:
        load_dataset_file(DatasetSpec(path=str(path)))
    assert "columns: {instruction: question, output: answer}" in str(caught.value)
    assert "data.on_invalid" not in str(caught.value)  # skipping would skip every example of the file


def test_prompt_file_errors_without_config_hint(tmp_path):
    path = write_json(tmp_path / "a.json", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError) as caught:
        load_dataset_file(DatasetSpec(path=str(path)), prompts_only=True)
    message = str(caught.value)
    assert "cannot tell the dataset layout from the keys ['completion', 'prompt']" in message
    assert "data.train" not in message
    assert "columns: {" not in message
    assert "A --data file is read with its keys as they are" in message
    assert message.endswith("so rename the keys in the file")


def test_configured_column_missing_from_keys(tmp_path):
    path = write_json(tmp_path / "a.json", [{"question": "问", "output": "答"}])
    with pytest.raises(DataError) as caught:
        load_dataset_file(DatasetSpec(path=str(path), layout="alpaca", columns={"instruction": "questoin"}))
    message = str(caught.value)
    assert "column 'questoin', which the config's columns maps instruction to, is missing" in message
    assert "from the example's keys ['output', 'question']" in message
    assert "fix the column name in the data.train entry's columns" in message
    assert "COLUMN" not in message
    with pytest.raises(DataError) as caught:
        load_dataset_file(DatasetSpec(path=str(path), columns={"instruction": "questoin"}))  # layout detected
    assert "from the keys ['output', 'question'] (the config's columns names ['questoin'], missing from these keys)" in str(caught.value)


def test_renamed_columns_fix_unknown_layout(tmp_path):
    path = write_json(tmp_path / "a.json", [{"prompt": "问", "completion": "答"}])
    [conversation] = load_dataset_file(DatasetSpec(path=str(path), columns={"instruction": "prompt", "output": "completion"}))
    assert [message.text for message in conversation.messages] == ["问", "答"]


def test_errors_name_the_file_columns(tmp_path):
    renamed = write_json(tmp_path / "a.json", [{"prompt": "问", "completion": " "}])
    with pytest.raises(DataError, match=r"field 'completion' is empty"):
        load_dataset_file(DatasetSpec(path=str(renamed), columns={"instruction": "prompt", "output": "completion"}))
    query_only = write_json(tmp_path / "b.json", [{"query": "你好"}])
    with pytest.raises(DataError) as caught:
        load_dataset_file(DatasetSpec(path=str(query_only)))
    assert "field 'response' is missing (the example has ['query'])" in str(caught.value)
    assert "columns: {output: COLUMN}" in str(caught.value)  # the hint names the layout's field
    sharegpt = write_json(tmp_path / "c.json", [{"dialog": [{"from": "robot", "value": "hi"}]}])
    with pytest.raises(DataError, match=r"field 'dialog\[0\].from' is 'robot'"):
        load_dataset_file(DatasetSpec(path=str(sharegpt), layout="sharegpt", columns={"conversations": "dialog"}))


def test_empty_array_and_non_object_examples(tmp_path):
    empty = write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match=r"empty.json: the file has no examples"):
        load_dataset_file(DatasetSpec(path=str(empty)))
    numbers = write_json(tmp_path / "numbers.json", [1, 2])
    with pytest.raises(DataError, match=r"record 1 \(line 2\): an example must be a JSON object, got int 1"):
        load_dataset_file(DatasetSpec(path=str(numbers)))


def test_max_samples(tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": f"q{i}", "output": "a"} for i in range(5)])
    assert len(load_conversations(DataSettings(train=[str(path)], max_samples=2))) == 2


def test_bundled_persona_data():
    if not PERSONA_DATA.is_file():
        pytest.fail(f"bundled dataset missing: {PERSONA_DATA}")
    conversations = load_dataset_file(DatasetSpec(path=str(PERSONA_DATA)))
    assert len(conversations) >= 300
    rows = json.loads(PERSONA_DATA.read_text(encoding="utf-8"))
    assert sum(1 for row in rows if row.get("system")) >= 40
    assert sum(1 for row in rows if row.get("history")) >= 40
    assert any(len(c.messages) > 3 for c in conversations)


def test_sharegpt_two_system_prompts_rejected(tmp_path):
    turns = [{"from": "system", "value": "对话里的系统提示"}, {"from": "human", "value": "你好"}, {"from": "gpt", "value": "喵"}]
    path = write_json(tmp_path / "two.json", [{"system": "字段里的系统提示", "conversations": turns}])
    with pytest.raises(DataError) as caught:
        load_dataset_file(DatasetSpec(path=str(path)))
    assert caught.value.reason == "two system prompts"
    assert "record 1 (line 2): the example has two system prompts, field 'system' ('字段里的系统提示')" in str(caught.value)
    assert "field 'conversations[0]' ('对话里的系统提示'); keep one" in str(caught.value)

    # The same prompt in both places is one prompt.
    same = write_json(tmp_path / "same.json", [{"system": "对话里的系统提示", "conversations": turns}])
    [conversation] = load_dataset_file(DatasetSpec(path=str(same)))
    assert [message.role for message in conversation.messages] == ["system", "user", "assistant"]


def test_blank_message_numbered_from_one():
    from vlmtune.data.conversation import Conversation, Message, TextPart
    from vlmtune.data.validate import check_conversation

    conversation = Conversation([Message("user", [TextPart("你好")]), Message("assistant", [TextPart("  ")])], source="chat")
    with pytest.raises(DataError) as caught:
        check_conversation(conversation)
    assert str(caught.value) == "chat: message 2 (counting from 1, assistant) is empty; fill it in or remove the example"
