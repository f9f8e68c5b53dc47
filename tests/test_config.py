"""Config loading: YAML plus overrides, every problem reported at once, paths resolved."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vlmtune.config import load_config, parse_override, save_config
from vlmtune.errors import ConfigError

MINIMAL = """
model:
  name_or_path: some/model
data:
  train: [train.json]
"""


def write(tmp_path, text: str):
    (tmp_path / "train.json").write_text("[]", encoding="utf-8")
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.model.hub == "auto"
    assert config.data.train[0].path == str(tmp_path / "train.json")
    assert config.tracking.backend == "swanlab"
    assert config.tracking.swanlab_mode == "offline"
    assert config.lora.target_modules == "auto"


def test_overrides_keep_types(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        ["train.learning_rate=2e-4", "train.gradient_checkpointing=true", "lora.target_modules=[q_proj, v_proj]"],
    )
    assert config.train.learning_rate == pytest.approx(2e-4)
    assert config.train.gradient_checkpointing is True
    assert config.lora.target_modules == ["q_proj", "v_proj"]


def test_all_problems_reported_at_once(tmp_path):
    text = MINIMAL + "train:\n  learning_rate: -1\n  per_device_train_batch_size: zero\n  epochs: 3\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), ["tracking.backend=wandb"])
    message = str(caught.value)
    assert "4 problem(s)" in message
    assert "train.learning_rate" in message
    assert "train.per_device_train_batch_size" in message
    assert "train.epochs (line 9): unknown key (did you mean num_train_epochs?); valid keys here: output_dir, num_train" in message
    assert "tracking.backend: Input should be" in message  # an override has no line
    assert "'wandb'" in message


def test_problems_name_their_line(tmp_path):
    text = MINIMAL + "  max_length: 12x\n  validation:\n    - path: train.json\n      formatt: alpaca\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert "data.max_length (line 6): Input should be a valid integer" in message
    assert "(line 9): unknown key" in message


def test_overridden_key_has_no_line(tmp_path):
    text = MINIMAL + "train:\n  learning_rate: 1e-4\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), ["train.learning_rate=-1"])
    assert "train.learning_rate: Input should be greater than 0 (got -1)" in str(caught.value)


def test_misspelt_key_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL), ["train.learning_rat=1e-4"])
    assert "train.learning_rat: unknown key (did you mean learning_rate?); valid keys here:" in str(caught.value)


def test_other_tools_key_names_get_ours(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL), ["lora.lora_rank=8", "data.cutoff_len=1024"])
    assert "lora.lora_rank: unknown key (did you mean r?)" in str(caught.value)
    assert "data.cutoff_len: unknown key (did you mean max_length?)" in str(caught.value)


def test_flat_llama_factory_config_gets_section_keys(tmp_path):
    text = (
        "model_name_or_path: m\nlora_rank: 8\nlearning_rate: 1.0e-4\nbf16: true\ntemplate: glm4v\n"
        "data:\n  train: [a.json]\ntrain:\n  max_length: 128\n  warmup_ratio: 0.1\ndataset: alpaca_zh_demo\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert "a flat file as LLaMA-Factory writes it is not read" in message
    assert "model_name_or_path (line 1): unknown key (did you mean model.name_or_path?)" in message
    assert "lora_rank (line 2): unknown key (did you mean lora.r?)" in message
    assert "learning_rate (line 3): unknown key (did you mean train.learning_rate?)" in message
    assert "bf16 (line 4): unknown key (set model.dtype: bfloat16 instead)" in message
    assert "template (line 5): unknown key (not needed: vlmtune renders with the model's own chat template)" in message
    assert "train.max_length (line 9): unknown key (did you mean data.max_length?)" in message
    assert "train.warmup_ratio (line 10): unknown key (did you mean warmup_steps? warmup_steps below 1 is a fraction" in message
    assert "dataset (line 11): unknown key (did you mean data.train?)" in message  # not the train section


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", "'all' is what LLaMA-Factory, ms-swift or PEFT call all Linear layers; write auto"),
        ("all-linear", "'all-linear' is what LLaMA-Factory, ms-swift or PEFT call all Linear layers; write auto"),
        ("q_proj", "for module names write a list: [q_proj]"),
        ("q_proj, v_proj", "for module names write a list: [q_proj, v_proj]"),
    ],
)
def test_target_string_other_tools_read_differently(tmp_path, value, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL), [f"lora.target_modules={value}"])
    assert expected in str(caught.value)


def test_target_regular_expression_and_list_accepted(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), [r"lora.target_modules=.*\.(q|v)_proj"]).lora.target_modules == r".*\.(q|v)_proj"
    assert load_config(write(tmp_path, MINIMAL), ["lora.target_modules=[q_proj, v_proj]"]).lora.target_modules == ["q_proj", "v_proj"]


def test_union_value_gets_one_message(tmp_path):
    text = MINIMAL + "train:\n  padding_free: maybe\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), ["lora.target_modules=[q_proj, 3]"])
    message = str(caught.value)
    assert "2 problem(s)" in message
    assert "train.padding_free (line 7): must be true or false, or auto (got 'maybe')" in message
    assert "lora.target_modules: must be a string, or a list of strings (got ['q_proj', 3])" in message
    assert "literal" not in message
    assert ".bool" not in message


def test_yaml_boolean_where_text_belongs(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + "  system_prompt: yes\n"))
    assert "data.system_prompt (line 6): Input should be a valid string (got True); YAML reads unquoted yes" in str(caught.value)


def test_full_width_colon_is_named(tmp_path):
    """A Chinese input method types '：', and YAML's own error points at the line after it."""
    text = MINIMAL + "  system_prompt: 你是小橘：一只猫\nlora:\n  r：16\n  alpha: 32\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert "line 8 has the full-width '：' (write ':'): r：16" in str(caught.value)

    # The only key of a section: YAML reads the line as text, and the section's error explains why.
    with pytest.raises(ConfigError, match="the full-width '：' in it reads as text, so write ':' after a key"):
        load_config(write(tmp_path, MINIMAL + "train:\n  max_steps： 20\n"))
    with pytest.raises(ConfigError, match="write '=' where the full-width '：' is"):
        parse_override("train.max_steps：20")


def test_dataset_entry_of_wrong_shape(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train.1 \(line 5\): must be a dataset path or a mapping with a path key \(got 5\)"):
        load_config(write(tmp_path, MINIMAL.replace("[train.json]", "[train.json, 5]")))


def test_missing_required_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"model: Field required"):
        load_config(write(tmp_path, "data:\n  train: [a.json]\n"))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        parse_override("train.learning_rate")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_dataset_path_relative_to_config(tmp_path, monkeypatch):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.data.train[0].path == str(tmp_path / "train.json")
    # A path that climbs out of the config's folder is shown without the "..".
    (tmp_path / "configs").mkdir()
    config_file = write(tmp_path / "configs", MINIMAL.replace("train.json", "../train.json"))
    monkeypatch.chdir(tmp_path.parent)
    assert load_config(config_file).data.train[0].path == str(tmp_path / "train.json")


def test_saved_config_loads_from_any_folder(tmp_path, monkeypatch):
    """A run's config.yaml names its inputs by absolute path, so it loads from outside the folder training ran in."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.json").write_text("[]", encoding="utf-8")
    (work / "model").mkdir()
    (work / "run.yaml").write_text(MINIMAL.replace("some/model", "model").replace("train.json", "data/train.json"), encoding="utf-8")
    monkeypatch.chdir(work)
    config = load_config("run.yaml")
    assert config.data.train[0].path == "data/train.json"  # as found from the working folder
    save_config(config, tmp_path / "saved.yaml")

    monkeypatch.chdir(tmp_path)
    saved = load_config(tmp_path / "saved.yaml")
    assert saved.data.train[0].path == str(work / "data" / "train.json")
    assert saved.model.name_or_path == str(work / "model")


def test_hub_id_saved_unchanged(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    save_config(config, tmp_path / "saved.yaml")
    assert "name_or_path: some/model" in (tmp_path / "saved.yaml").read_text(encoding="utf-8")


def test_missing_dataset_says_where_it_looked(tmp_path):
    path = write(tmp_path, MINIMAL.replace("train.json", "nowhere.json"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith("data.train[0].path: dataset not found: nowhere.json (looked in the working folder")
    assert f"next to the config file, in {tmp_path.resolve()}" in message


def test_cross_section_rule_message(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL), ["quantization.bits=4", "lora.train_merger=true"])
    assert "  - quantization.bits=4 with lora.train_merger: true is not supported" in str(caught.value)
    assert "Value error" not in str(caught.value)


@pytest.mark.parametrize("name", ["我的项目", "my project", "x" * 101, ""])
def test_swanlab_project_name_checked(tmp_path, name):
    """SwanLab accepts only ASCII letters, digits and _ - + . in a project name, and raises deep in a run otherwise."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL), [f"tracking.project={name}"])
    assert f"tracking.project {name!r} is not a valid SwanLab project name" in str(caught.value)


def test_swanlab_project_name_accepted(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["tracking.project=persona-cat_v1.2+b"]).tracking.project == "persona-cat_v1.2+b"
    # TensorBoard and no tracking do not use the project name.
    for backend in ("tensorboard", "none"):
        config = load_config(write(tmp_path, MINIMAL), ["tracking.project=小橘项目", f"tracking.backend={backend}"])
        assert config.tracking.project == "小橘项目"


def test_saved_config_round_trips_chinese(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["data.system_prompt=你是小橘。"])
    out = tmp_path / "saved.yaml"
    save_config(config, out)
    assert "你是小橘。" in out.read_text(encoding="utf-8")
    assert load_config(out).data.system_prompt == "你是小橘。"


def test_model_folder_relative_to_config(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    text = MINIMAL.replace("some/model", "models/tiny")
    config_file = write(tmp_path, text)
    monkeypatch.chdir(tmp_path.parent)
    assert load_config(config_file).model.name_or_path == str(tmp_path / "models" / "tiny")
    hub_id = load_config(write(tmp_path, MINIMAL)).model.name_or_path
    assert hub_id == "some/model"  # nothing of that name next to the config: still a hub id


def test_prompt_images_relative_to_config(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat.png").write_bytes(b"not read here")
    text = MINIMAL + "evaluation:\n  prompts:\n    - 你好\n    - {text: 这是什么？, images: [img/cat.png, 'data:image/png;base64,AAAA']}\n"
    config_file = write(tmp_path, text)
    monkeypatch.chdir(tmp_path.parent)
    images = load_config(config_file).evaluation.prompts[1].images
    assert images == [str(tmp_path / "img" / "cat.png"), "data:image/png;base64,AAAA"]


def test_missing_prompt_image_named(tmp_path):
    text = MINIMAL + "evaluation:\n  prompts:\n    - {text: 这是什么？, images: [img/none.png]}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert message.startswith("evaluation.prompts[0].images[0]: image not found: img/none.png (looked in the working")
    assert f"next to the config file, in {tmp_path.resolve()}" in message


def test_same_name_in_working_folder_warned(tmp_path, monkeypatch, caplog):
    (tmp_path / "configs").mkdir()
    config_file = write(tmp_path / "configs", MINIMAL)  # train.json next to the config
    (tmp_path / "train.json").write_text("[]", encoding="utf-8")  # and another in the working folder
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        config = load_config(config_file)
    assert config.data.train[0].path == "train.json"
    assert "data.train[0].path: train.json exists in the working folder and next to the config file" in caplog.text


@pytest.mark.parametrize("name", ["demo.yaml", "glm4v_9b_persona.yaml"])
def test_bundled_config_from_any_folder(name, tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    config = load_config(repo / "configs" / name)
    for spec in config.data.train:
        assert Path(spec.path).is_file(), spec.path
        assert ".." not in Path(spec.path).parts
    for prompt in config.evaluation.prompts:
        assert all(Path(image).is_file() for image in prompt.images)


def test_config_folder_named(tmp_path):
    write(tmp_path, MINIMAL)
    [config] = tmp_path.glob("*.yaml")
    with pytest.raises(ConfigError, match=rf"^config {tmp_path} is a folder; pass a YAML file in it, e\.g\. {config}$"):
        load_config(tmp_path)


def test_missing_hub_id_shaped_dataset_gets_hub_hint(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "model: {name_or_path: m}\ndata:\n  train: [AI-ModelScope/alpaca-gpt4-data-zh]\n"))
    assert "data.train[0].path: dataset not found: AI-ModelScope/alpaca-gpt4-data-zh" in str(caught.value)
    assert str(caught.value).endswith("; for a dataset on a hub, write modelscope:namespace/name or huggingface:namespace/name")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "model: {name_or_path: m}\ndata:\n  train: [data/missing.json]\n"))
    assert "modelscope:" not in str(caught.value)  # a file path, not an id
