"""Every dataset layout and file type, read from fixture files into conversations."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import write_json
from vlmtune.config import DatasetSpec, DataSettings
from vlmtune.data.loading import detect_layout, load_data, load_dataset_file
from vlmtune.data.records import Record
from vlmtune.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUTS = FIXTURES / "layouts"
IMAGES = FIXTURES / "images"


def shape(conversation) -> list[tuple]:
    """(role, text, image file names, reasoning) per message."""
    return [
        (message.role, message.text, [Path(image.source).name for image in message.images], message.reasoning)
        for message in conversation.messages
    ]


def read(name: str, **spec) -> list:
    return load_dataset_file(DatasetSpec(path=str(LAYOUTS / name), **spec))


def test_alpaca_json():
    [conversation] = read("alpaca.json")
    assert shape(conversation) == [
        ("system", "你是小橘。", [], None),
        ("user", "你好", [], None),
        ("assistant", "你好喵~", [], None),
        ("user", "翻译成英文\n早上好", [], None),
        ("assistant", "Good morning 喵~", [], None),
    ]


def test_sharegpt_with_image_placeholders():
    [conversation] = read("sharegpt.jsonl")
    assert shape(conversation) == [
        ("system", "你是小橘。", [], None),
        ("user", "这是什么颜色？", ["orange.png"], None),
        ("assistant", "橙色喵~", [], None),
        ("user", "那这个呢？", ["blue.png"], None),
        ("assistant", "蓝色喵~", [], None),
    ]
    # Image paths are resolved against the data file's folder.
    assert Path(conversation.images[0].source).resolve() == (IMAGES / "orange.png").resolve()
    assert conversation.messages[3].content[1].source.endswith("blue.png")


def test_messages_parts_placeholders_and_reasoning():
    parts, placeholders, typed = read("messages.jsonl")
    assert shape(parts) == [
        ("user", "描述一下", ["orange.png"], None),
        ("assistant", "一块橙色喵~", [], "图片是纯橙色。"),
    ]
    assert shape(placeholders) == [
        ("system", "你是小橘。", [], None),
        ("user", "和哪个更亮？", ["orange.png", "blue.png"], None),
        ("assistant", "橙色的更亮喵", [], None),
    ]
    assert shape(typed)[0] == ("user", "颜色？", ["blue.png"], None)
    assert shape(typed)[1] == ("assistant", "蓝色喵", [], None)


def test_query_response():
    first, second = read("query_response.jsonl")
    assert shape(first) == [("user", "1+1等于几？", [], None), ("assistant", "等于2喵~", [], None)]
    assert [message.role for message in second.messages] == ["user", "assistant", "user", "assistant"]


def test_csv_with_json_history():
    first, second = read("alpaca.csv")
    assert shape(first)[1] == ("assistant", "你好喵~\n第二行", [], None)
    assert first.source.endswith("alpaca.csv, record 1 (line 2)")
    assert second.source.endswith("alpaca.csv, record 2 (line 4)")  # the quoted newline spans two lines
    assert [message.text for message in second.messages] == ["你好", "你好喵~", "再见", "再见喵~"]


def test_column_mapping():
    [conversation] = read("renamed_columns.jsonl", columns={"instruction": "question", "output": "answer"})
    assert shape(conversation) == [("user", "你是谁？", [], None), ("assistant", "我是小橘喵~", [], None)]


def test_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}喵"} for i in range(4)]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "data.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    from_parquet = load_dataset_file(DatasetSpec(path=str(tmp_path / "data.parquet")))
    from_disk = load_dataset_file(DatasetSpec(path=str(tmp_path / "saved")))
    assert [shape(c) for c in from_parquet] == [shape(c) for c in from_disk]
    assert shape(from_parquet[3])[1] == ("assistant", "回答3喵", [], None)
    assert from_parquet[2].source.endswith("data.parquet, record 3 (row index 2)")


def test_folder_of_files(tmp_path, caplog):
    write_json(tmp_path / "a.json", [{"instruction": "a", "output": "1"}])
    (tmp_path / "b.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "b"}, {"from": "gpt", "value": "2"}]}), encoding="utf-8")
    write_json(tmp_path / "C.JSON", [{"instruction": "c", "output": "3"}])  # as Windows tools often name files
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    write_json(tmp_path / "sub" / "d.json", [{"instruction": "d", "output": "4"}])
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        conversations = load_dataset_file(DatasetSpec(path=str(tmp_path)))
    assert [c.messages[0].text for c in conversations] == ["c", "a", "b"]
    assert f"{tmp_path}: reading 3 dataset file(s); not reading notes.txt, sub/ (not .json" in caplog.text
    assert "subfolders are not searched" in caplog.text


@pytest.mark.parametrize(
    "data, layout",
    [
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "q", "output": "a"}, "alpaca"),
        ({"query": "q", "response": "a"}, "query_response"),
    ],
)
def test_layout_detection(data, layout):
    assert detect_layout(Record(data, Path("x.json"), 0, 1)) == layout


def test_forced_layout_overrides_detection(tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": "q", "query": "ignored", "output": "a"}])
    [conversation] = load_dataset_file(DatasetSpec(path=str(path), layout="alpaca"))
    assert conversation.messages[0].text == "q"


def test_record_in_another_layout_names_both(tmp_path):
    rows = [{"instruction": "q", "output": "a"}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path = write_json(tmp_path / "mixed.json", rows)
    with pytest.raises(DataError) as caught:
        load_dataset_file(DatasetSpec(path=str(path)))
    assert "mixed.json, record 2 (line " in str(caught.value)
    assert "this record looks like the messages layout, but the file's layout is alpaca, detected from its first record" in str(caught.value)


def test_mixing_three_datasets_with_ratios(tmp_path):
    def dataset(name: str, count: int) -> str:
        rows = [{"instruction": f"{name}{i}", "output": "a"} for i in range(count)]
        return str(write_json(tmp_path / f"{name}.json", rows))

    settings = DataSettings(
        train=[
            {"path": dataset("a", 10), "ratio": 0.5},
            {"path": dataset("b", 4), "ratio": 2.0},
            {"path": dataset("c", 6), "ratio": 1.5},
        ],
        seed=3,
    )
    train = load_data(settings).train
    by_dataset = {name: [c for c in train if c.messages[0].text.startswith(name)] for name in "abc"}
    assert len(by_dataset["a"]) == 5
    assert len(by_dataset["b"]) == 8
    assert len(by_dataset["c"]) == 9
    assert len({c.messages[0].text for c in by_dataset["a"]}) == 5  # sampled without repeats
    again = load_data(settings).train
    assert [c.source for c in again] == [c.source for c in train]  # same seed, same sample


def test_validation_split_by_fraction_and_file(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(20)]
    path = str(write_json(tmp_path / "train.json", rows))
    held_out = load_data(DataSettings(train=[path], val_size=0.25))
    assert len(held_out.train) == 15
    assert len(held_out.validation) == 5
    assert not {c.source for c in held_out.train} & {c.source for c in held_out.validation}
    val_path = str(write_json(tmp_path / "val.json", rows[:3]))
    separate = load_data(DataSettings(train=[path], validation=[val_path]))
    assert len(separate.train) == 20
    assert len(separate.validation) == 3


def test_validation_split_holds_out_all_copies(tmp_path):
    """An example repeated by ratio > 1 is held out with every copy, so no validation example is trained on."""
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(10)]
    path = str(write_json(tmp_path / "train.json", rows))
    data = load_data(DataSettings(train=[{"path": path, "ratio": 2.0}], val_size=0.2, seed=1))
    held_out_sources = {c.source for c in data.validation}
    assert len(held_out_sources) == len(data.validation) == 2  # two distinct examples
    assert not held_out_sources & {c.source for c in data.train}
    assert len(data.train) == 16  # the other 8 examples, twice each


def test_validation_split_leaving_nothing_is_an_error(tmp_path):
    path = str(write_json(tmp_path / "one.json", [{"instruction": "q", "output": "a"}]))
    with pytest.raises(DataError, match=r"data.val_size=0.05 holds out 1 of the 1 training example\(s\).*data.val_size: 0"):
        load_data(DataSettings(train=[path], val_size=0.05))


def test_chinese_round_trip_through_loading(tmp_path):
    text = "「小橘」说：喵~ 🐟 ü"
    path = write_json(tmp_path / "a.json", [{"instruction": text, "output": text}])
    [conversation] = load_dataset_file(DatasetSpec(path=str(path)))
    assert conversation.messages[0].text == text
    assert conversation.messages[1].text == text
