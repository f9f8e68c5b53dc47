"""Bad data: one fixture file per kind, each with its exact error, and skipping with a report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import data_settings
from vlmtune.config import DatasetSpec, DataSettings
from vlmtune.data.loading import load_data, load_dataset_file
from vlmtune.encoding import encode_conversations
from vlmtune.errors import DataError

INVALID = Path(__file__).parent / "fixtures" / "invalid"
IMAGES = Path(__file__).parent / "fixtures" / "images"
SKIP_HINT = " (set data.on_invalid: skip to skip such examples)"

# file -> (reason, message after "{path}"); {images} stands for the fixture image folder as written in the file.
CASES = {
    "malformed.jsonl": ("malformed JSON", ", line 2, column 22: malformed JSON (Expecting ',' delimiter)" + SKIP_HINT),
    "malformed_array.json": (
        "malformed JSON",
        ", line 3, column 34: malformed JSON (Expecting value) in record 2; fix it "
        "(a .json array cannot be read past a broken record)",
    ),
    "missing_field.jsonl": (
        "missing field",
        ", record 1 (line 1): field 'output' is missing (the example has ['instruction']); add it or remove the "
        "example. If a column of another name holds it, map it in the data.train entry: columns: {{output: COLUMN}}"
        + SKIP_HINT,
    ),
    "empty_field.jsonl": ("empty field", ", record 1 (line 1): field 'output' is empty; fill it in or remove the example" + SKIP_HINT),
    "wrong_type_number.jsonl": ("wrong type", ", record 1 (line 1): field 'instruction' must be a string, got int 42" + SKIP_HINT),
    "wrong_type_null.jsonl": ("wrong type", ", record 1 (line 1): field 'output' is null; it must be a string" + SKIP_HINT),
    "wrong_type_list.jsonl": ("wrong type", ", record 1 (line 1): field 'output' must be a string, got list ['a', 'b']" + SKIP_HINT),
    "empty_conversation.jsonl": ("empty conversation", ", record 1 (line 1): the conversation is empty" + SKIP_HINT),
    "roles_out_of_order.jsonl": (
        "roles out of order",
        ", record 1 (line 1): the roles are user, user, assistant, so message 2 (counting from 1) is 'user' where "
        "'assistant' was expected; turns must alternate user, assistant, ... after an optional first system message"
        + SKIP_HINT,
    ),
    "ends_with_user.jsonl": (
        "no final assistant reply",
        ", record 1 (line 1): the conversation ends with a user message; it must end with the assistant reply "
        "to train on" + SKIP_HINT,
    ),
    "missing_image.jsonl": (
        "missing image",
        ", record 1 (line 1): field 'images[0]': image not found: {images}/nowhere.png (a relative path is read "
        "from the data file's folder); fix the path or remove the image from the example" + SKIP_HINT,
    ),
    "corrupt_image.jsonl": ("corrupt image", ", record 1 (line 1): corrupt or unreadable image {images}/corrupt.png: "),
    "placeholder_mismatch.jsonl": (
        "placeholder/image count mismatch",
        ", record 1 (line 1): field 'instruction' has more <image> placeholders than the 1 image(s) in 'images'; "
        "the counts must be equal: add the missing images or remove the extra <image>" + SKIP_HINT,
    ),
    "unused_image.jsonl": (
        "placeholder/image count mismatch",
        ", record 1 (line 1): the text has 0 <image> placeholder(s) but 'images' lists 1 image(s); "
        "the counts must be equal: put one <image> in the text where each image goes, or remove the extra images"
        + SKIP_HINT,
    ),
    "not_utf8.jsonl": ("invalid UTF-8", ", line 2: not valid UTF-8 (byte 17 of the line); re-save the file as UTF-8" + SKIP_HINT),
    "empty.json": ("empty file", ": the file is empty"),
    "messages_null_content.jsonl": (
        "wrong type",
        ", record 1 (line 1): field 'messages[1].content' is null; give the message's text as a string or a list of "
        "content parts, or remove the message" + SKIP_HINT,
    ),
    "messages_missing_content.jsonl": (
        "missing field",
        ", record 1 (line 1): field 'messages[1].content' is missing; give the message's text as a string or a list "
        "of content parts, or remove the message" + SKIP_HINT,
    ),
    "csv_extra_field.csv": (
        "malformed CSV",
        ', line 2: the row has 3 fields but the header has 2 (instruction, output); put double quotes around a field '
        'that contains a comma ("a, b")' + SKIP_HINT,
    ),
    "csv_missing_field.csv": (
        "malformed CSV",
        ", line 3: the row has 1 field but the header has 2 (instruction, output); add the missing fields, empty "
        "ones as two commas in a row" + SKIP_HINT,
    ),
    "tool_turn.jsonl": (
        "unsupported role",
        ", record 1 (line 1): field 'conversations[1].from' is 'function_call'; tool turns are not supported yet, "
        "remove them or the example" + SKIP_HINT,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_invalid_file_exact_error(name):
    reason, expected = CASES[name]
    path = INVALID / name
    with pytest.raises(DataError) as caught:
        load_dataset_file(DatasetSpec(path=str(path)))
    expected_text = str(path) + expected.format(images=str(INVALID / ".." / "images"))
    if name == "corrupt_image.jsonl":  # PIL's own wording follows the prefix
        assert str(caught.value).startswith(expected_text)
    else:
        assert str(caught.value) == expected_text
    assert caught.value.reason == reason


def test_byte_order_mark_accepted():
    [conversation] = load_dataset_file(DatasetSpec(path=str(INVALID / "with_bom.jsonl")))
    assert conversation.messages[0].text == "你好"


def test_skip_counts_reasons_and_lines(caplog):
    settings = DataSettings(train=[str(INVALID / "mixed_good_and_bad.jsonl")], on_invalid="skip")
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        loaded = load_data(settings)
    assert [c.messages[0].text for c in loaded.train] == ["q1", "q3"]
    assert "read 2 examples from " in caplog.text
    assert "(layout: alpaca), skipped 3 invalid (listed below)" in caplog.text
    assert loaded.report.skipped_count == 3
    missing = loaded.report.skipped["missing field"]
    assert [location.rsplit(", ", 1)[1] for location in missing] == ["record 2 (line 2)", "record 5 (line 5)"]
    assert len(loaded.report.skipped["wrong type"]) == 1
    assert "skipped 3 invalid example(s)" in caplog.text
    assert "missing field" in caplog.text
    assert "record 2 (line 2): field 'output' is missing (the example has" in caplog.text


def test_skip_malformed_and_non_utf8_lines():
    for name in ("malformed.jsonl", "not_utf8.jsonl"):
        loaded = load_data(DataSettings(train=[str(INVALID / name)], on_invalid="skip"))
        assert len(loaded.train) == 1, name
        assert loaded.report.skipped_count == 1, name


def test_duplicates_reported_and_removed_on_request(caplog):
    path = str(INVALID / "duplicates.jsonl")
    kept = load_data(DataSettings(train=[path]))
    assert len(kept.train) == 3
    assert len(kept.report.duplicates) == 1
    assert kept.report.duplicates[0].endswith("record 3 (line 3)")
    assert kept.report.originals[kept.report.duplicates[0]].endswith("record 1 (line 1)")
    assert "1 duplicated example(s), kept; set data.dedup: true to remove them" in caplog.text
    assert f"{path}, record 3 (line 3) repeats {path}, record 1 (line 1)" in caplog.text
    caplog.clear()
    removed = load_data(DataSettings(train=[path], dedup=True))
    assert len(removed.train) == 2
    assert "1 duplicated example(s), removed (data.dedup=true)" in caplog.text


def test_duplicates_across_files_and_validation(tmp_path, caplog):
    from conftest import write_json

    first = write_json(tmp_path / "first.json", [{"instruction": "一", "output": "喵"}, {"instruction": "二", "output": "喵喵"}])
    second = write_json(tmp_path / "second.json", [{"instruction": "二", "output": "喵喵"}, {"instruction": "三", "output": "喵"}])
    validation_file = write_json(tmp_path / "validation.json", [{"instruction": "一", "output": "喵"}, {"instruction": "四", "output": "喵"}])

    without_dedup = load_data(DataSettings(train=[str(first), str(second)], validation=[str(validation_file)]))
    assert len(without_dedup.train) == 4
    assert without_dedup.report.duplicates == [f"{second}, record 1 (line 2)"]
    assert without_dedup.report.originals[f"{second}, record 1 (line 2)"] == f"{first}, record 2 (line 6)"
    assert without_dedup.report.validation_overlap == [f"{validation_file}, record 1 (line 2)"]
    assert len(without_dedup.validation) == 2
    assert "1 validation example(s) repeat a training example" in caplog.text
    assert f"{validation_file}, record 1 (line 2) repeats {first}, record 1 (line 2)" in caplog.text

    with_dedup = load_data(DataSettings(train=[str(first), str(second)], validation=[str(validation_file)], dedup=True))
    assert len(with_dedup.train) == 3
    assert [conversation.source for conversation in with_dedup.validation] == [f"{validation_file}, record 2 (line 6)"]

    # A ratio above 1 repeats a file on purpose: its copies are no duplicates.
    repeated = load_data(DataSettings(train=[{"path": str(first), "ratio": 2.0}]))
    assert len(repeated.train) == 4
    assert repeated.report.duplicates == []


def test_nothing_valid_left_is_an_error():
    with pytest.raises(DataError, match="no valid training example was read"):
        load_data(DataSettings(train=[str(INVALID / "missing_field.jsonl")], on_invalid="skip"))


def test_encoding_failure_skipped_before_training(encoder, tmp_path):
    from vlmtune.data import Conversation, ImagePart, Message, TextPart

    good = Conversation([Message("user", [TextPart("q")]), Message("assistant", [TextPart("a")])], source="good")
    bad = Conversation(
        [Message("user", [ImagePart(str(tmp_path / "deleted.png")), TextPart("q")]), Message("assistant", [TextPart("a")])],
        source="bad",
    )
    report = encode_conversations(encoder, [good, bad], data_settings(on_invalid="skip"))
    assert len(report.samples) == 1
    assert report.dropped == {"missing image": ["bad"]}
    with pytest.raises(DataError, match="image not found"):
        encode_conversations(encoder, [good, bad], data_settings())


@pytest.mark.parametrize(
    "text, problem",
    [
        ('[\n {"instruction": "一", "output": "喵"},\n]', "line 2: extra comma"),
        ('[\n {"instruction": "一", "output": "喵"}\n {"instruction": "二", "output": "喵"}\n]', "line 2: missing comma between records"),
    ],
    ids=["trailing comma", "missing comma"],
)
def test_lenient_json_commas_warned(tmp_path, caplog, text, problem):
    """Records past a comma that strict JSON rejects are read, with a warning naming the line."""
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        conversations = load_dataset_file(DatasetSpec(path=str(path)))
    assert len(conversations) == text.count("instruction")
    assert f"{path}, {problem}" in caplog.text
    assert "other JSON readers reject the file" in caplog.text


def test_strict_json_not_warned(tmp_path, caplog):
    path = tmp_path / "data.json"
    path.write_text('[{"instruction": "一", "output": "喵"}, {"instruction": "二", "output": "喵"}]', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        assert len(load_dataset_file(DatasetSpec(path=str(path)))) == 2
    assert "comma" not in caplog.text
