"""Encoding through datasets.map with a keyed cache: same samples, cache hits, new keys on change."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.ipc
import pytest
import torch
from filelock import FileLock

from conftest import PERSONA_DATA, data_settings
from vlmtune.config import DatasetSpec
from vlmtune.data import Conversation, ImagePart, Message, TextPart
from vlmtune.data.loading import load_dataset_file
from vlmtune.encoding import ConversationEncoder, encode_conversations
from vlmtune.encoding.cache import encode_dataset, encoding_key
from vlmtune.encoding.images import load_image
from vlmtune.errors import ConfigError, DataError
from test_images import FIXTURE_IMAGES, IMAGE_DATA, image_conversation


@pytest.fixture(scope="module")
def mixed_conversations() -> list[Conversation]:
    text = load_dataset_file(DatasetSpec(path=str(PERSONA_DATA)))[:40]
    images = load_dataset_file(DatasetSpec(path=str(IMAGE_DATA)))[:6]
    return text + images


def with_decoded_images(conversation: Conversation) -> Conversation:
    def decoded(part):
        return ImagePart(part.source, decoded=load_image(part.source)) if isinstance(part, ImagePart) else part

    messages = [Message(message.role, [decoded(part) for part in message.content]) for message in conversation.messages]
    return Conversation(messages, source=conversation.source)


def ids(values) -> list[int] | None:
    """A sample's token sequence as a list: encoding makes lists, the encoded table NumPy arrays."""
    return None if values is None else [int(value) for value in values]


def assert_same_samples(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert (ids(a.input_ids), ids(a.labels), a.reply_starts, a.source) == (ids(b.input_ids), ids(b.labels), b.reply_starts, b.source)
        assert ids(a.mm_token_type_ids) == ids(b.mm_token_type_ids)
        assert a.image_sources == b.image_sources
        assert (a.pixel_values is None) == (b.pixel_values is None)
        if a.pixel_values is not None:
            assert torch.equal(a.pixel_values, b.pixel_values)
        assert (a.image_grid_thw is None) == (b.image_grid_thw is None)
        if a.image_grid_thw is not None:
            assert torch.equal(a.image_grid_thw, b.image_grid_thw)


def test_cache_matches_direct_then_hits(
    encoder, mixed_conversations, tmp_path, caplog
):
    settings = data_settings(cache_dir=str(tmp_path), max_length=256)
    direct = encode_conversations(encoder, mixed_conversations, settings)
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        first = encode_dataset(encoder, mixed_conversations, settings)
    assert "cache hit" not in caplog.text
    assert "no cached encoding of these inputs" in caplog.text
    assert_same_samples(direct.samples, first.samples)
    # Token sequences are views of the table's int32 buffers, not lists of Python ints (about 40 bytes a token).
    tokens = first.samples[0].input_ids
    assert isinstance(tokens, np.ndarray)
    assert tokens.dtype == np.int32
    assert tokens.base is not None
    assert first.dropped == direct.dropped
    assert first.lengths == direct.lengths
    assert any(sample.image_sources for sample in first.samples)
    assert all(sample.pixel_values is None for sample in first.samples)  # local files are processed when batched
    assert len(list(tmp_path.glob("*.arrow"))) == 1
    assert not list(tmp_path.glob("*.partial-*"))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        second = encode_dataset(encoder, mixed_conversations, settings)
    assert "cache hit" in caplog.text
    assert f"loaded {len(second.samples)} sample(s)" in caplog.text
    assert f"encoded {len(second.samples)} sample(s)" not in caplog.text  # nothing was encoded again
    assert_same_samples(direct.samples, second.samples)
    assert second.dropped == direct.dropped
    assert second.lengths == direct.lengths


def test_image_rows_across_record_batches(encoder, mixed_conversations, tmp_path):
    """Pixel values are stored as float arrays in several record batches and read back unchanged."""
    from vlmtune.encoding.cache import IMAGE_WRITER_BATCH_SIZE

    text = mixed_conversations[:40]
    # Images that arrive decoded have no source to open again later, so their pixel values are stored.
    images = [with_decoded_images(conversation) for conversation in mixed_conversations[40:]]
    # Text and image conversations alternate, so that images land in every record batch.
    conversations = [conversation for pair in zip(text, images * 7) for conversation in pair]
    assert len(conversations) > 2 * IMAGE_WRITER_BATCH_SIZE
    settings = data_settings(cache_dir=str(tmp_path), max_length=256)
    direct = encode_conversations(encoder, conversations, settings)
    first = encode_dataset(encoder, conversations, settings)
    [table_path] = tmp_path.glob("*.arrow")
    with pyarrow.OSFile(str(table_path)) as source:
        assert pyarrow.ipc.open_file(source).num_record_batches > 2
    second = encode_dataset(encoder, conversations, settings)
    assert second.from_cache
    assert sum(sample.pixel_values is not None for sample in second.samples) == len(conversations) // 2
    assert_same_samples(direct.samples, first.samples)
    assert_same_samples(direct.samples, second.samples)
    assert all(sample.pixel_values.is_contiguous() for sample in second.samples if sample.pixel_values is not None)
    second.samples[1].pixel_values.add_(1)  # a writable tensor of its own, not a view of the Arrow buffer


def test_batched_encoding_matches_one_at_a_time(encoder, mixed_conversations, tmp_path):
    """Two template calls and one tokenizer call for many conversations give each one's own encoding."""
    text = lambda value: [TextPart(value)]  # noqa: E731
    multi_turn = Conversation(
        [
            Message("system", text("你是小橘。")),
            Message("user", text("你好")),
            Message("assistant", text("你好喵~")),
            Message("user", text("你是谁？")),
            Message("assistant", text("我是小橘喵！")),
        ],
        source="multi-turn",
    )
    no_reply = Conversation([Message("user", text("还在吗？"))], source="no-reply")
    missing_image = Conversation(
        [Message("user", [ImagePart(str(tmp_path / "gone.png")), TextPart("这是什么？")]), Message("assistant", text("猫"))],
        source="missing-image",
    )
    conversations = [*mixed_conversations[:3], no_reply, multi_turn, missing_image, *mixed_conversations[-3:]]

    together = encoder.encode_many(conversations)

    assert len(together) == len(conversations)
    for conversation, result in zip(conversations, together):
        if conversation.source in ("no-reply", "missing-image"):
            assert isinstance(result, DataError)
            assert conversation.source in str(result)
            continue
        assert_same_samples([result], [encoder.encode(conversation)])
    assert len(together[4].reply_starts) == 2


def test_cache_hit_renders_nothing(loaded, encoder, mixed_conversations, tmp_path):
    settings = data_settings(cache_dir=str(tmp_path))
    encode_dataset(encoder, mixed_conversations, settings)
    fresh = ConversationEncoder.from_settings(loaded.processor, loaded.stop_token_ids, settings)
    hit = encode_dataset(fresh, mixed_conversations, settings)
    assert len(hit.samples) == len(mixed_conversations)
    assert "end_of_turn_id" not in vars(fresh)  # the template was never rendered


def test_two_processes_encode_the_same_samples(encoder, mixed_conversations, tmp_path):
    one = encode_dataset(encoder, mixed_conversations, data_settings(cache=False, cache_dir=str(tmp_path)))
    two = encode_dataset(encoder, mixed_conversations, data_settings(cache=False, cache_dir=str(tmp_path), num_proc=2))
    assert_same_samples(one.samples, two.samples)
    assert list(tmp_path.iterdir()) == []  # cache=False writes nothing


def test_concurrent_encodes_wait_for_first(encoder, mixed_conversations, tmp_path, caplog):
    """Two encodes of the same inputs at once: one encodes, the other waits and reads its table."""
    settings = data_settings(cache_dir=str(tmp_path))
    path = tmp_path / f"{encoding_key(encoder, mixed_conversations, settings)}.arrow"
    reports = []
    other_process = FileLock(f"{path}.lock")
    other_process.acquire()  # both threads start while another process holds the lock
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        threads = [
            threading.Thread(target=lambda: reports.append(encode_dataset(encoder, mixed_conversations, settings)))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while caplog.text.count("another process is encoding the same inputs") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not reports
        other_process.release()
        for thread in threads:
            thread.join(timeout=120)
    assert caplog.text.count("another process is encoding the same inputs") == 2
    assert sorted(report.from_cache for report in reports) == [False, True]
    assert caplog.text.count("no cached encoding of these inputs") == 1
    assert_same_samples(reports[0].samples, reports[1].samples)


def test_unwritable_cache_folder_is_a_config_error(encoder, mixed_conversations, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("", encoding="utf-8")
    settings = data_settings(cache_dir=str(blocker / "cache"))
    with pytest.raises(ConfigError, match="encoding cache folder .*not-a-folder/cache is not writable.*data.cache=false"):
        encode_dataset(encoder, mixed_conversations[:2], settings)


def test_key_changes_with_every_input(loaded, encoder, tmp_path):
    image = tmp_path / "cat.png"
    shutil.copy(FIXTURE_IMAGES / "orange.png", image)
    conversations = [image_conversation(image)]
    settings = data_settings()
    key = encoding_key(encoder, conversations, settings)
    assert encoding_key(encoder, conversations, settings) == key

    assert encoding_key(encoder, conversations, data_settings(max_length=100)) != key
    assert encoding_key(encoder, conversations, data_settings(thinking="none")) != key
    assert encoding_key(encoder, [image_conversation(image, answer="不是喵")], settings) != key
    no_think = ConversationEncoder(loaded.processor, loaded.stop_token_ids, thinking="none")
    assert encoding_key(no_think, conversations, settings) != key

    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert encoding_key(encoder, conversations, settings) != key


def test_key_changes_with_the_chat_template(loaded, encoder):
    conversations = [Conversation([Message("user", [TextPart("你好")]), Message("assistant", [TextPart("喵")])])]
    settings = data_settings()
    key = encoding_key(encoder, conversations, settings)
    processor = loaded.processor
    original = processor.chat_template
    try:
        processor.chat_template = original.replace("<|assistant|>", "<|assistant|> ", 1)
        assert encoding_key(encoder, conversations, settings) != key
    finally:
        processor.chat_template = original


def test_invalid_examples_are_reported_from_cache_too(encoder, tmp_path):
    good = Conversation([Message("user", [TextPart("你好")]), Message("assistant", [TextPart("喵")])], source="a.json, record 0")
    missing = Conversation(
        [Message("user", [ImagePart(str(tmp_path / "gone.png")), TextPart("?")]), Message("assistant", [TextPart("喵")])],
        source="a.json, record 1",
    )
    settings = data_settings(cache_dir=str(tmp_path / "cache"), on_invalid="skip")
    for _ in range(2):  # encoded, then loaded from the cache
        report = encode_dataset(encoder, [good, missing], settings)
        assert len(report.samples) == 1
        assert report.dropped == {"missing image": ["a.json, record 1"]}

    strict = data_settings(cache_dir=str(tmp_path / "cache"), on_invalid="error")
    for _ in range(2):
        with pytest.raises(DataError, match=r"a.json, record 1: image not found: .*gone.png"):
            encode_dataset(encoder, [good, missing], strict)


def test_source_digest_changes_with_code(tmp_path):
    from vlmtune.encoding import cache

    package = Path(cache.__file__).parent
    before, after = tmp_path / "before", tmp_path / "after"
    shutil.copytree(package, before)
    shutil.copytree(package, after)
    encode_file = after / "encode.py"
    encode_file.write_text(encode_file.read_text() + "\n# a changed encoder\n")
    assert cache.source_digest(before) == cache.source_digest(package)
    assert cache.source_digest(after) != cache.source_digest(package)
