"""Training and chat on images with the tiny GLM-4.1V: encoding, batches, vision LoRA, limits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, data_settings, write_json
from vlmtune.config import DatasetSpec, GenerationSettings, build_config
from vlmtune.data import Conversation, ImagePart, Message, TextPart
from vlmtune.data.loading import load_dataset_file
from vlmtune.encoding import ChatCollator, ConversationEncoder, encode_conversations
from vlmtune.errors import DataError
from vlmtune.inference import ChatSession, Generator
from vlmtune.training.recipe import LoraRecipe

IMAGE_DATA = REPO_ROOT / "data" / "persona_images" / "train.jsonl"
FIXTURE_IMAGES = Path(__file__).parent / "fixtures" / "images"


def image_conversation(*images: Path, text: str = "这是什么？", answer: str = "是图形喵~") -> Conversation:
    parts = [ImagePart(str(image)) for image in images]
    return Conversation(
        [Message("user", [*parts, TextPart(text)]), Message("assistant", [TextPart(answer)])], source="inline"
    )


def test_bundled_image_data_is_valid():
    conversations = load_dataset_file(DatasetSpec(path=str(IMAGE_DATA)))
    assert len(conversations) >= 30
    assert all(conversation.images for conversation in conversations)
    assert any(len(conversation.images) == 2 for conversation in conversations)


def test_mixed_batch_collates_vision_tensors(encoder):
    text_only = Conversation([Message("user", [TextPart("你好")]), Message("assistant", [TextPart("喵")])], source="t")
    one = image_conversation(FIXTURE_IMAGES / "orange.png")
    two = image_conversation(FIXTURE_IMAGES / "orange.png", FIXTURE_IMAGES / "blue.png")
    samples = [encoder.encode(c) for c in (text_only, one, two)]
    batch = ChatCollator(pad_token_id=encoder.tokenizer.pad_token_id, pixel_loader=encoder.pixel_values)(samples)
    assert batch["image_grid_thw"].shape == (3, 3)
    patches = int(batch["image_grid_thw"].prod(dim=1).sum())
    assert batch["pixel_values"].shape[0] == patches
    image_id = encoder.tokenizer.convert_tokens_to_ids("<|image|>")
    assert int((batch["input_ids"] == image_id).sum()) == patches // 4
    assert int((batch["mm_token_type_ids"] == 1).sum()) == patches // 4
    assert bool((batch["labels"][batch["input_ids"] == image_id] == -100).all())


def test_file_images_processed_when_batched(loaded, encoder):
    """Samples keep image paths, not pixels, and the collator gives the processor's pixels for those files."""
    from PIL import Image

    files = [FIXTURE_IMAGES / "orange.png", FIXTURE_IMAGES / "blue.png"]
    sample = encoder.encode(image_conversation(*files))
    assert sample.pixel_values is None
    assert sample.image_sources == [str(path.resolve()) for path in files]

    batch = ChatCollator(pad_token_id=encoder.tokenizer.pad_token_id, pixel_loader=encoder.pixel_values)([sample])
    expected = loaded.processor.image_processor(images=[Image.open(path).convert("RGB") for path in files], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
    with pytest.raises(ValueError, match="no pixel_loader"):
        ChatCollator(pad_token_id=encoder.tokenizer.pad_token_id)([sample])


def test_image_resized_after_encoding_is_an_error(encoder, tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (56, 56), "orange").save(path)
    sample = encoder.encode(image_conversation(path))
    Image.new("RGB", (112, 56), "orange").save(path)
    with pytest.raises(DataError, match=r"inline: an image changed size after the data was encoded \('.*photo.png'\)"):
        encoder.pixel_values(sample)


def test_worker_error_keeps_its_message(encoder, tmp_path):
    """A changed image found in a dataloader worker is reported with its message, not the worker's traceback."""
    from PIL import Image

    from vlmtune.encoding.collator import SampleDataset
    from vlmtune.errors import without_worker_traceback

    path = tmp_path / "photo.png"
    Image.new("RGB", (56, 56), "orange").save(path)
    sample = encoder.encode(image_conversation(path))
    Image.new("RGB", (112, 56), "orange").save(path)
    collator = ChatCollator(pad_token_id=encoder.tokenizer.pad_token_id, pixel_loader=encoder.pixel_values)
    loader = torch.utils.data.DataLoader(SampleDataset([sample]), batch_size=1, num_workers=1, collate_fn=collator)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # as torch raises it
    cleaned = without_worker_traceback(caught.value)
    assert isinstance(cleaned, DataError)
    assert str(cleaned) == str(pytest.raises(DataError, encoder.pixel_values, sample).value)
    assert without_worker_traceback(cleaned) is cleaned


def test_thin_image_rejected_with_its_record(encoder, tmp_path):
    from PIL import Image

    path = tmp_path / "thin.png"
    Image.new("RGB", (10, 3000), "orange").save(path)
    conversation = image_conversation(path)
    with pytest.raises(DataError, match=r"inline: the image processor rejects image '.*thin.png' of 10x3000 pixels: absolute aspect ratio"):
        encoder.encode(conversation)
    report = encode_conversations(encoder, [conversation], data_settings(on_invalid="skip"))
    assert report.samples == []
    assert report.dropped == {"invalid image": ["inline"]}
    # Chat, serve and predict render through the same check.
    generation_messages = Conversation(conversation.messages[:1], source="chat")
    with pytest.raises(DataError, match="chat: the image processor rejects image"):
        encoder.template_messages(generation_messages, with_images=True)


def test_oversized_and_folder_images_explained(tmp_path, monkeypatch):
    from PIL import Image

    from vlmtune.data.validate import check_local_images
    from vlmtune.encoding.images import load_image

    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100), "orange").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses images over twice this
    with pytest.raises(DataError, match=r"record 1: image '.*big.png' is too large to open: Image size \(10000 pixels\)"):
        load_image(str(path), "record 1")
    with pytest.raises(DataError, match=r"inline: image .*big.png is too large to open") as caught:
        check_local_images(image_conversation(path))
    assert caught.value.reason == "image too large"
    with pytest.raises(DataError, match=r"record 1: image path .* is a folder; name an image file in it"):
        load_image(str(tmp_path), "record 1")
    with pytest.raises(DataError, match=r"inline: image path .* is a folder"):
        check_local_images(image_conversation(tmp_path))


def test_very_large_image_logged_with_its_record(tmp_path, monkeypatch, caplog):
    """Pillow's size warning, which names no example, becomes one log line that does."""
    import logging
    import warnings

    from PIL import Image

    from vlmtune.encoding.images import load_image

    path = tmp_path / "large.png"
    Image.new("RGB", (40, 40), "orange").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: over the warning limit, under the error
    with warnings.catch_warnings(record=True) as raised, caplog.at_level(logging.WARNING, logger="vlmtune"):
        warnings.simplefilter("always")
        for _ in range(2):
            assert load_image(str(path), "record 7").size == (40, 40)
    assert not [warning for warning in raised if issubclass(warning.category, Image.DecompressionBombWarning)]
    lines = [record.message for record in caplog.records if "megapixels, more than Pillow's warning limit" in record.message]
    assert len(lines) == 1  # once, though every batch opens the image again
    assert lines[0].startswith("record 7: image '")


def test_data_url_images_reloaded_decoded_kept(encoder):
    """A data: URL is decoded again when batched, like a file; an image that arrived decoded keeps its pixels."""
    import base64

    from vlmtune.encoding.images import load_image

    data_url = "data:image/png;base64," + base64.b64encode((FIXTURE_IMAGES / "orange.png").read_bytes()).decode()

    def conversation(part: ImagePart) -> Conversation:
        return Conversation([Message("user", [part, TextPart("这是什么？")]), Message("assistant", [TextPart("橙色喵~")])], source="inline")

    from_url = encoder.encode(conversation(ImagePart(data_url)))
    assert from_url.image_sources == [data_url]
    assert from_url.pixel_values is None
    decoded = encoder.encode(conversation(ImagePart("upload.png", decoded=load_image(data_url))))
    assert decoded.image_sources is None
    assert decoded.pixel_values is not None
    assert encoder.pixel_values(decoded) is decoded.pixel_values
    assert torch.equal(encoder.pixel_values(from_url), decoded.pixel_values)


def test_overlong_image_conversation_dropped_at_preprocessing(encoder):
    conversation = image_conversation(FIXTURE_IMAGES / "orange.png", FIXTURE_IMAGES / "blue.png")
    length = len(encoder.encode(conversation))
    report = encode_conversations(encoder, [conversation], data_settings(max_length=length - 1))
    assert report.samples == []
    assert list(report.dropped.values()) == [["inline"]]


def test_max_pixels_scales_images_and_counts_them(loaded, tiny_model_dir):
    from vlmtune.model.loading import load_processor

    processor = load_processor(str(tiny_model_dir))
    small = ConversationEncoder(processor, loaded.stop_token_ids, max_pixels=28 * 28 * 4, min_pixels=28 * 28)
    big_image = image_conversation(REPO_ROOT / "data" / "images" / "orange_cat.png")  # 224 x 224
    report = encode_conversations(small, [big_image], data_settings())
    [sample] = report.samples
    assert int(sample.image_grid_thw.prod()) // 4 <= 4
    assert report.resized_images == 1
    assert sample.resized_images == 1


def test_resized_count_ignores_rounding(loaded, tiny_model_dir, tmp_path):
    """Rounding to whole merged patches is not scaling; scaling down within GLM's two-frame budget is."""
    from PIL import Image

    from vlmtune.model.loading import load_processor

    processor = load_processor(str(tiny_model_dir))
    # GLM-4.1V counts both frames of an image against max_pixels: 140x112 rounded is 2 x 15,680 pixels.
    encoder = ConversationEncoder(processor, loaded.stop_token_ids, max_pixels=20000, min_pixels=28 * 28)
    sizes = {"rounded.png": (48, 48), "scaled.png": (150, 120)}
    for name, size in sizes.items():
        Image.new("RGB", size, "orange").save(tmp_path / name)
    counts = {name: encoder.encode(image_conversation(tmp_path / name)).resized_images for name in sizes}
    assert counts == {"rounded.png": 0, "scaled.png": 1}


def test_resized_count_survives_cache(loaded, tiny_model_dir, tmp_path, caplog):
    from vlmtune.encoding.cache import encode_dataset
    from vlmtune.model.loading import load_processor

    processor = load_processor(str(tiny_model_dir))
    # Two frames of 56x56, the 64x48 fixture rounded, fit; the 224x224 photo is scaled down.
    small = ConversationEncoder(processor, loaded.stop_token_ids, max_pixels=2 * 56 * 56, min_pixels=28 * 28)
    conversations = [image_conversation(REPO_ROOT / "data" / "images" / "orange_cat.png"), image_conversation(FIXTURE_IMAGES / "orange.png")]
    settings = data_settings(cache_dir=str(tmp_path))
    first = encode_dataset(small, conversations, settings)
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        second = encode_dataset(small, conversations, settings)
    assert second.from_cache
    assert first.resized_images == second.resized_images == 1
    assert "1 image(s) were scaled when they were encoded to fit the image processor's pixel limits" in caplog.text
    assert [sample.resized_images for sample in second.samples] == [1, 0]


def test_video_rejected_with_clear_message(tmp_path):
    path = write_json(
        tmp_path / "video.json",
        [{"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}, {"role": "assistant", "content": "a"}]}],
    )
    with pytest.raises(DataError, match=r"contains a video; videos are not supported for training yet; extract frames") as caught:
        load_dataset_file(DatasetSpec(path=str(path)))
    assert caught.value.reason == "unsupported video"
    placeholder = write_json(tmp_path / "p.json", [{"instruction": "<video>看", "output": "a", "videos": ["c.mp4"]}])
    with pytest.raises(DataError, match="field 'videos' contains a video"):
        load_dataset_file(DatasetSpec(path=str(placeholder)))


def test_chat_history_keeps_both_images(loaded):
    generator = Generator(loaded, GenerationSettings(max_new_tokens=2))
    session = ChatSession(generator)
    session.ask("第一张", [str(FIXTURE_IMAGES / "orange.png")])
    session.history.append(Message("user", [ImagePart(str(FIXTURE_IMAGES / "blue.png")), TextPart("第二张呢？")]))
    inputs = generator.prepare_inputs(session.conversation())
    tokenizer = loaded.tokenizer
    begin = tokenizer.convert_tokens_to_ids("<|begin_of_image|>")
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    assert int((inputs["input_ids"] == begin).sum()) == 2
    assert inputs["image_grid_thw"].shape[0] == 2
    assert int((inputs["input_ids"] == image_id).sum()) == int(inputs["image_grid_thw"].prod(dim=1).sum()) // 4


def test_chat_places_images_at_placeholders():
    from vlmtune.inference.chat import message_content

    orange, blue = str(FIXTURE_IMAGES / "orange.png"), str(FIXTURE_IMAGES / "blue.png")
    assert message_content("比较<image>和<image>", [orange, blue]) == [
        TextPart("比较"), ImagePart(orange), TextPart("和"), ImagePart(blue)
    ]
    assert message_content("这是什么？", [orange]) == [ImagePart(orange), TextPart("这是什么？")]
    assert message_content("<image>是什么", []) == [TextPart("<image>是什么")]  # no image attached: plain text
    with pytest.raises(DataError, match=r"^the message has 2 <image> placeholder\(s\) but 1 image\(s\) are attached"):
        message_content("<image><image>", [orange])


def train_on_images(tiny_model_dir, folder: Path, **lora) -> LoraRecipe:
    text_rows = [{"instruction": f"问题{i}", "input": "", "output": "好的喵~"} for i in range(6)]
    tree = {
        "model": {"name_or_path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": [str(write_json(folder / "text.json", text_rows)), str(IMAGE_DATA)], "max_samples": 16, "max_length": 256},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **lora},
        "train": {"output_dir": str(folder / "out"), "max_steps": 8, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "warmup_steps": 0, "save_steps": 100},
        "tracking": {"backend": "none"},
        "evaluation": {"generate": False},
    }
    recipe = LoraRecipe(build_config(tree))
    recipe.setup()
    return recipe


def loss_on(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_training_on_mixed_batches_lowers_loss(tiny_model_dir, tmp_path):
    recipe = train_on_images(tiny_model_dir, tmp_path)
    mixed = recipe.report.samples[4:8]
    assert [sample.image_grid_thw is not None for sample in mixed] == [False, False, True, True]
    batch = ChatCollator(pad_token_id=recipe.loaded.tokenizer.pad_token_id, pixel_loader=recipe.encoder.pixel_values)(mixed)
    before = loss_on(recipe.loaded.model, batch)
    # train.dataloader_num_workers=auto starts workers for image files on a GPU only, so that on CPU
    # they take no cores from training.
    assert recipe.trainer.args.dataloader_num_workers == 0
    recipe.train()
    assert loss_on(recipe.loaded.model, batch) < before


def vision_state(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_parameters() if ".visual." in name}


@pytest.mark.parametrize("vision", [False, True])
def test_vision_weights_change_only_with_vision_lora(tiny_model_dir, tmp_path, vision):
    recipe = train_on_images(tiny_model_dir, tmp_path, vision=vision)
    before = vision_state(recipe.loaded.model)
    recipe.train()
    after = vision_state(recipe.loaded.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    if vision:
        assert changed
        assert all("lora_" in name for name in changed)
    else:
        assert changed == []
        assert not any("lora_" in name for name in before)


def test_image_error_names_whole_path(tmp_path):
    from vlmtune.encoding.images import load_image
    from vlmtune.errors import DataError

    folder = tmp_path / ("a-long-folder-name-" * 5)
    folder.mkdir()
    fake = folder / "fake.png"
    fake.write_text("not a picture", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_image(str(fake))
    assert f"cannot load image {str(fake)!r}: not a recognised image format" in str(caught.value)
    with pytest.raises(DataError) as caught:
        load_image("data:image/png;base64," + "A" * 200)
    assert "data:image/png;base64,AAAA" in str(caught.value)
    assert "A" * 100 not in str(caught.value)  # a data: URL is cut to its start


def test_data_url_payload_checked():
    import base64
    import io

    from PIL import Image

    from vlmtune.encoding.images import load_image
    from vlmtune.errors import DataError

    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (240, 150, 40)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    wrapped = "\n".join(encoded[start : start + 76] for start in range(0, len(encoded), 76))  # as MIME encoders write it
    assert load_image("data:image/png;base64," + wrapped).size == (8, 6)
    with pytest.raises(DataError, match=r"the data: URL's payload is not valid base64"):
        load_image("data:image/png;base64,@@@!!")
    with pytest.raises(DataError, match=r"the data: URL is not base64-encoded; send data:image/png;base64,PAYLOAD"):
        load_image("data:image/png," + encoded)


def test_pixel_limit_against_processor_limit(loaded, tiny_model_dir):
    from vlmtune.errors import DataError
    from vlmtune.model.loading import load_processor

    processor = load_processor(str(tiny_model_dir))
    largest = processor.image_processor.size["longest_edge"]
    with pytest.raises(DataError) as caught:
        ConversationEncoder(processor, loaded.stop_token_ids, min_pixels=largest + 1)
    message = str(caught.value)
    assert f"the smallest image area ({largest + 1} pixels, data.min_pixels) is larger than the largest ({largest} pixels, the processor limit)" in message
    ConversationEncoder(processor, loaded.stop_token_ids, min_pixels=largest + 1, max_pixels=largest + 1)  # both set: fine
