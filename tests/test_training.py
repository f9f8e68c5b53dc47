"""A short real training run on the tiny model: loss, adapter reload, SwanLab folder, resume, stopping."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from conftest import new_file_mode, write_json
from vlmtune.config import GenerationSettings, ModelSettings, build_config
from vlmtune.errors import ConfigError, ModelError
from vlmtune.data import Conversation, Message, TextPart
from vlmtune.encoding import ChatCollator
from vlmtune.inference import Generator
from vlmtune.model.loading import load_adapter, load_model
from vlmtune.training.recipe import LoraRecipe

ANSWER = "好的喵~"
STEPS = 30


def training_tree(tiny_model_dir: Path, data_path: Path, output_dir: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(tiny_model_dir), "hub": "local", "device": "cpu"},
        "data": {"train": [str(data_path)], "system_prompt": "你是小橘。", "max_length": 128, "on_invalid": "skip"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": STEPS,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            "logging_steps": 5,
            "save_steps": 15,
            "seed": 7,
            **train,
        },
        "tracking": {"backend": "swanlab", "swanlab_mode": "offline", "project": "vlmtune-tests"},
        "evaluation": {"generate": False},  # covered by test_sampling.py
    }


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    rows = [{"instruction": f"第{i}个问题：今天做什么好呢？", "input": "", "output": ANSWER} for i in range(16)]
    rows[0]["history"] = [["你好", "你好喵~"]]
    rows.append({"instruction": "没有回答的例子", "input": ""})  # skipped, and counted in the manifest
    data_path = write_json(folder / "train.json", rows)
    config = build_config(training_tree(tiny_model_dir, data_path, folder / "out"))

    recipe = LoraRecipe(config)
    recipe.setup()
    batch = ChatCollator(pad_token_id=recipe.loaded.tokenizer.pad_token_id)(recipe.report.samples[:4])
    loss_before = batch_loss(recipe.loaded.model, batch)
    recipe.train()
    recipe.save()
    loss_after = batch_loss(recipe.loaded.model, batch)
    return {
        "recipe": recipe,
        "batch": batch,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "folder": folder,
        "data_path": data_path,
    }


def test_loss_drops_on_fixed_batch(run):
    assert run["loss_after"] < run["loss_before"] * 0.7


def test_floating_point_ops_match_transformers(run):
    """The trainer counts parameters once; its estimate must stay transformers' estimate."""
    trainer = run["recipe"].trainer
    inputs = {"input_ids": run["batch"]["input_ids"]}
    expected = 6 * inputs["input_ids"].numel() * trainer.model.num_parameters(exclude_embeddings=True)
    assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs) == expected
    assert run["recipe"].trainer.state.total_flos > 0


def test_text_data_batched_in_training_process(run):
    assert run["recipe"].trainer.args.dataloader_num_workers == 0  # train.dataloader_num_workers=auto, no images


def test_padded_batches_leave_out_attention_mask(run):
    recipe = run["recipe"]
    assert recipe.collator.padding_mask is False
    assert "attention_mask" not in recipe.collator(recipe.report.samples[:2])


def test_training_batch_skips_kv_cache(run):
    """A training forward pass must not fill a KV cache, a copy of every layer's keys and values."""
    recipe = run["recipe"]
    model = recipe.loaded.model
    batch = recipe.collator(recipe.report.samples[:2])
    batch.pop("labels")  # the model's own loss cannot read logits kept at supervised positions only
    model.train()
    outputs = model(**batch)
    assert outputs.past_key_values is None
    del batch["use_cache"]
    assert model(**batch).past_key_values is not None  # the model's config would build one


def test_output_folder_contents(run):
    output_dir = run["recipe"].output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "run_manifest.json",
                 "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (output_dir / name).is_file(), name
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: peft")
    assert "# LoRA adapter trained with vlmtune" in card
    assert "More Information Needed" not in card  # peft's empty template is replaced
    assert '- system prompt: "你是小橘。"' in card
    assert "- mean training loss of the last training session: " in card
    manifest_text = (output_dir / "run_manifest.json").read_text(encoding="utf-8")
    assert "你是小橘。" in manifest_text  # written unescaped
    manifest = json.loads(manifest_text)
    assert manifest["metrics"]["global_step"] == STEPS
    assert manifest["samples"] == 16
    assert manifest["skipped_invalid"] == {"missing field": 1}
    assert manifest["duplicates"] == 0
    # data.system_prompt filled every example, so all 16 share it.
    assert manifest["system_prompts"] == {"distinct": 1, "with": 16, "without": 0, "most_common": "你是小橘。", "most_common_count": 16}
    assert len(manifest["datasets"][0]["sha256"]) == 64
    assert manifest["versions"]["transformers"]


def test_adapter_reload_gives_identical_logits(run, tiny_model_dir):
    recipe = run["recipe"]
    trained = recipe.loaded.model.eval()
    reloaded = load_adapter(load_model(ModelSettings(name_or_path=str(tiny_model_dir), device="cpu")), str(recipe.output_dir))
    batch = {key: value for key, value in run["batch"].items() if key != "labels"}
    with torch.no_grad():
        expected = trained(**batch).logits
        actual = reloaded.model(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def read_swanlab_records(run_folder: Path):
    """Every record of a SwanLab run file, parsed (SwanLab 0.10's own reader and protobuf types)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    [run_file] = run_folder.glob("*.swanlab")
    reader = DataStoreReader()
    reader.open(run_file)
    records = []
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        records.append(record)
    reader.close()
    return records


def read_swanlab_scalars(run_folder: Path) -> dict[str, list[tuple[int, float]]]:
    scalars: dict[str, list[tuple[int, float]]] = {}
    for record in read_swanlab_records(run_folder):
        if record.HasField("scalar"):
            scalars.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
    return scalars


def test_swanlab_run_folder_has_metrics(run):
    folder = run["recipe"].tracking.run_folder()
    assert folder is not None and folder.parent == run["recipe"].output_dir / "swanlog"
    scalars = read_swanlab_scalars(folder)
    for key in ("train/loss", "train/learning_rate", "train/grad_norm"):
        assert len(scalars.get(key, [])) == STEPS // 5, key
    losses = [value for _, value in scalars["train/loss"]]
    assert losses[-1] < losses[0]
    config_text = (folder / "files" / "config.yaml").read_text(encoding="utf-8")
    assert "vlmtune" in config_text
    assert "max_length" in config_text


def test_trained_adapter_stops_on_stop_token(run):
    recipe = run["recipe"]
    generator = Generator(recipe.loaded, GenerationSettings(max_new_tokens=40))
    conversation = Conversation(
        [Message("system", [TextPart("你是小橘。")]), Message("user", [TextPart("第3个问题：今天做什么好呢？")])]
    )
    reply = generator.generate(conversation)
    assert reply.stopped, reply
    assert reply.generated_tokens < 40
    assert reply.answer == ANSWER


def test_rerun_into_used_folder_needs_a_choice(run, tiny_model_dir):
    tree = training_tree(tiny_model_dir, run["data_path"], run["recipe"].output_dir)
    tree["tracking"] = {"backend": "none"}
    with pytest.raises(ConfigError, match=r"contains an earlier run \(checkpoint-15, checkpoint-30, adapter_model.safetensors, \.\.\.\)\. Pass --resume"):
        LoraRecipe(build_config(tree)).setup()
    with pytest.raises(ConfigError, match=r"checkpoint-30 is already at step 30, and train.max_steps is 30"):
        LoraRecipe(build_config(tree), resume=True).setup()


def test_saved_weights_get_umask_mode(run):
    # safetensors creates its files with mode 0600; others, such as a server's account, must read the adapter.
    output = run["recipe"].output_dir
    weights = [output / "adapter_model.safetensors", *output.glob("checkpoint-*/adapter_model.safetensors")]
    assert len(weights) == 3
    for path in weights:
        assert path.stat().st_mode & 0o777 == new_file_mode(), path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("file", "is a file, not a folder; choose a folder path"),
        ("under_file", "cannot write there (Not a directory); choose a folder you can write to"),
        ("model", "is a model folder (it has config.json and model.safetensors), and the run would write its adapter"),
    ],
)
def test_unusable_output_dir_rejected_before_loading(tiny_model_dir, tmp_path, caplog, case, expected):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    output = {"file": tmp_path / "notes.txt", "under_file": tmp_path / "notes.txt" / "run", "model": tiny_model_dir}[case]
    data = write_json(tmp_path / "train.json", [{"instruction": "你好", "output": "喵"}])
    with caplog.at_level(logging.INFO, logger="vlmtune"), pytest.raises(ConfigError) as caught:
        LoraRecipe(build_config(training_tree(tiny_model_dir, data, output))).setup()
    assert str(caught.value).startswith(f"train.output_dir {output}")
    assert expected in str(caught.value)
    assert "read 1 examples" not in caplog.text  # nothing was loaded
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"


def _two_step_run(tiny_model_dir, data_path, output_dir) -> tuple[dict, LoraRecipe]:
    """Train two steps into output_dir, saving a checkpoint at each; return the settings tree and the recipe."""
    tree = training_tree(tiny_model_dir, data_path, output_dir, max_steps=2, save_steps=1)
    tree["tracking"] = {"backend": "none"}
    recipe = LoraRecipe(build_config(tree))
    recipe.setup()
    recipe.train()
    return tree, recipe


def test_finished_run_without_checkpoints_kept(tiny_model_dir, tmp_path, run):
    """A run whose checkpoints were deleted to save space is still a run: it is not trained over unasked."""
    tree, first = _two_step_run(tiny_model_dir, run["data_path"], tmp_path / "out")
    first.save()
    for checkpoint in (tmp_path / "out").glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    adapter = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"contains an earlier run \(adapter_model.safetensors, .*\) that saved no checkpoint") as caught:
        LoraRecipe(build_config(tree)).setup()
    assert "--resume" not in str(caught.value)  # nothing to resume from
    assert f"start a new run in another train.output_dir with lora.init_from={tmp_path / 'out'}" in str(caught.value)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == adapter

    run_files = ("adapter_model.safetensors", "run_manifest.json", "progress.jsonl", "config.yaml")
    for name in run_files:
        assert (tmp_path / "out" / name).exists(), name
    (tmp_path / "out" / "notes.txt").write_text("mine", encoding="utf-8")
    replaced = LoraRecipe(build_config(tree), overwrite=True)
    replaced.setup()
    for name in run_files[:3]:  # config.yaml is written again by the new run's setup
        assert not (tmp_path / "out" / name).exists(), name
    assert (tmp_path / "out" / "notes.txt").is_file()  # not a file of the run


def test_output_folder_keeps_user_files(tiny_model_dir, tmp_path, run):
    """Only checkpoint-N folders and a run that trained count as an earlier run; a README.md is not replaced unasked."""
    out = tmp_path / "out"
    (out / "checkpoint-notes").mkdir(parents=True)
    (out / "checkpoint-notes" / "important.txt").write_text("mine", encoding="utf-8")
    (out / "README.md").write_text("# my notes", encoding="utf-8")
    (out / "config.yaml").write_text("from a run that failed to start", encoding="utf-8")
    (out / "progress.jsonl").write_text('{"event": "train_begin", "step": 0, "max_steps": 2}\n', encoding="utf-8")
    tree = training_tree(tiny_model_dir, run["data_path"], out, max_steps=2)
    tree["tracking"] = {"backend": "none"}

    with pytest.raises(ConfigError, match=r"contains README.md, which saving the adapter replaces with its model card"):
        LoraRecipe(build_config(tree)).setup()
    (out / "README.md").unlink()
    LoraRecipe(build_config(tree)).setup()

    assert (out / "checkpoint-notes" / "important.txt").read_text(encoding="utf-8") == "mine"
    assert not (out / "progress.jsonl").exists()  # the failed run's progress file is not appended to


def test_swanlab_experiment_named_after_folder(tmp_path, monkeypatch):
    from vlmtune.config import TrackingSettings
    from vlmtune.training.tracking import make_tracking

    (tmp_path / "my-run").mkdir()
    monkeypatch.chdir(tmp_path / "my-run")
    tracking = make_tracking(TrackingSettings(), ".", {})
    [callback] = tracking.callbacks
    assert callback._init_kwargs["experiment_name"] == "my-run"  # not "", which SwanLab rejects


def test_overwrite_replaces_earlier_checkpoints(tiny_model_dir, tmp_path, run):
    tree, _ = _two_step_run(tiny_model_dir, run["data_path"], tmp_path / "out")
    tree["train"]["max_steps"] = 1
    second = LoraRecipe(build_config(tree), overwrite=True)
    second.setup()
    second.train()
    assert sorted(path.name for path in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]


def test_resume_continues_step_count(run, tiny_model_dir, caplog):
    recipe = run["recipe"]
    tree = training_tree(tiny_model_dir, run["data_path"], recipe.output_dir, max_steps=STEPS + 10)
    tree["tracking"] = {"backend": "none"}
    resumed = LoraRecipe(build_config(tree), resume=True)
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        resumed.setup()
    assert "encodes differently" not in caplog.text  # the same data, encoded the same way
    resumed.train()
    assert resumed.metrics["global_step"] == STEPS + 10
    state = json.loads((recipe.output_dir / f"checkpoint-{STEPS + 10}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS + 10


def test_resume_checks_saved_settings(tiny_model_dir, tmp_path, caplog):
    rows = [{"instruction": f"问题{i}", "input": "", "output": ANSWER} for i in range(8)]
    data_path = write_json(tmp_path / "train.json", rows)
    tree = training_tree(tiny_model_dir, data_path, tmp_path / "out", max_steps=-1, num_train_epochs=1, save_steps=1)
    tree["tracking"] = {"backend": "none"}
    first = LoraRecipe(build_config(tree))  # one epoch: 8 examples in batches of 4
    first.setup()
    first.train()
    first.save()

    with pytest.raises(ConfigError, match=r"--resume: the run in .*out finished \(step 2 of 2\), so there is nothing to continue"):
        LoraRecipe(build_config(tree), resume=True).setup()

    tree["train"]["num_train_epochs"] = 2
    other_rank = {**tree, "lora": {**tree["lora"], "r": 4}}
    with pytest.raises(ConfigError, match=r"other LoRA or quantization settings \(lora.r: 16 then, 4 now\)"):
        LoraRecipe(build_config(other_rank), resume=True).setup()

    # The checkpoint's optimizer and scheduler state would keep the old learning rate.
    other_rate = {**tree, "train": {**tree["train"], "learning_rate": 1e-3}}
    with pytest.raises(ConfigError, match=r"--resume: train.learning_rate: 0.005 then, 0.001 now, but a resumed run keeps") as caught:
        LoraRecipe(build_config(other_rate), resume=True).setup()
    # The way on that the message names: a new run that starts from this run's weights.
    assert f"start a new run (another train.output_dir) from this run's weights with lora.init_from={tmp_path / 'out'}" in str(caught.value)

    # The manifest of the first session recorded another version of the data file.
    manifest_path = tmp_path / "out" / "run_manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["datasets"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")

    tree["data"]["max_length"] = 256
    tree["train"]["save_steps"] = 2
    resumed = LoraRecipe(build_config(tree), resume=True)
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        resumed.setup()
    assert f"data file(s) changed since the run last saved ({data_path})" in caplog.text
    assert "the new values apply from here on" in caplog.text
    assert "data.max_length: 128 then, 256 now" in caplog.text
    assert "--resume: the training data encodes differently from when the run last saved" in caplog.text
    assert "train.num_train_epochs: 1.0 then, 2.0 now" in caplog.text
    assert "(a new train.num_train_epochs changes the total steps, so the learning-rate schedule" in caplog.text
    resumed.train()
    assert resumed.metrics["global_step"] == 4
    # Saved every 2 steps now, not every step as the checkpoint's trainer_state.json recorded.
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    assert not (tmp_path / "out" / "checkpoint-3").exists()


def test_resume_with_fewer_steps_rejected(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"问题{i}", "input": "", "output": ANSWER} for i in range(8)]
    data_path = write_json(tmp_path / "train.json", rows)
    tree = training_tree(tiny_model_dir, data_path, tmp_path / "out", max_steps=3, save_steps=3)
    tree["tracking"] = {"backend": "none"}
    first = LoraRecipe(build_config(tree))
    first.setup()
    first.train()
    first.save()
    saved_config = (tmp_path / "out" / "config.yaml").read_text(encoding="utf-8")
    manifest = (tmp_path / "out" / "run_manifest.json").read_text(encoding="utf-8")

    # The max_steps override left out: one epoch of 8 examples in batches of 4 is 2 steps.
    tree["train"].update(max_steps=-1, num_train_epochs=1)
    resumed = LoraRecipe(build_config(tree), resume=True)
    resumed.setup()
    with pytest.raises(ConfigError, match=r"checkpoint-3 is at step 3, and these settings train for 2 steps"):
        resumed.train()
    assert (tmp_path / "out" / "config.yaml").read_text(encoding="utf-8") == saved_config
    assert (tmp_path / "out" / "run_manifest.json").read_text(encoding="utf-8") == manifest


def test_failed_model_load_leaves_no_folder(tmp_path):
    data_path = write_json(tmp_path / "train.json", [{"instruction": "你好", "input": "", "output": ANSWER}])
    tree = training_tree(tmp_path / "no-such-model", data_path, tmp_path / "out")
    with pytest.raises(ModelError, match="no-such-model"):
        LoraRecipe(build_config(tree)).setup()
    assert not (tmp_path / "out").exists()


def test_validation_loss_logged(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"问题{i}", "input": "", "output": ANSWER} for i in range(12)]
    data_path = write_json(tmp_path / "train.json", rows)
    tree = training_tree(tiny_model_dir, data_path, tmp_path / "out", max_steps=4, eval_steps=2)
    tree["data"]["val_size"] = 0.25
    recipe = LoraRecipe(build_config(tree))
    recipe.setup()
    recipe.train()
    assert len(recipe.validation_samples) == 3
    assert len(recipe.report.samples) == 9
    eval_losses = [entry["eval_loss"] for entry in recipe.trainer.state.log_history if "eval_loss" in entry]
    assert len(eval_losses) == 2
    scalars = read_swanlab_scalars(recipe.tracking.run_folder())
    assert [step for step, _ in scalars["eval/loss"]] == [2, 4]


def dataloader_padding(recipe: LoraRecipe) -> float:
    """Padding share of the batches the Trainer's own dataloader yields for one epoch."""
    recipe.trainer.data_collator = replace(recipe.collator, padding_mask=True)  # to count real tokens
    real = computed = 0
    for batch in recipe.trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum())
        computed += batch["attention_mask"].numel()
    return 1 - real / computed


def test_group_by_length_cuts_padding(tiny_model_dir, tmp_path):
    from conftest import PERSONA_DATA

    measured = {}
    logged = {}
    for grouped in (True, False):
        tree = training_tree(tiny_model_dir, PERSONA_DATA, tmp_path / f"out-{grouped}", group_by_length=grouped)
        tree["train"]["per_device_train_batch_size"] = 8
        tree["data"]["max_samples"] = 160
        tree["data"]["max_length"] = 512
        recipe = LoraRecipe(build_config(tree))
        recipe.setup()
        measured[grouped] = dataloader_padding(recipe)
        logged[grouped] = recipe.padding_share
    # On this data: about 18% padding grouped by length against about 45% in random order.
    assert measured[True] < 0.5 * measured[False]
    assert logged[True] < 0.5 * logged[False]
    assert abs(logged[False] - measured[False]) < 0.05


@pytest.mark.slow
def test_resumed_report_keeps_base_column(tiny_model_dir, tmp_path, caplog):
    rows = [{"instruction": f"第{i}个问题", "input": "", "output": ANSWER} for i in range(8)]
    data_path = write_json(tmp_path / "train.json", rows)
    tree = training_tree(tiny_model_dir, data_path, tmp_path / "out", max_steps=4, save_steps=2, eval_steps=2)
    tree["tracking"] = {"backend": "swanlab", "swanlab_mode": "offline", "project": "vlmtune-tests"}
    tree["evaluation"] = {"generate": True, "num_data_prompts": 2, "max_new_tokens": 8}
    first = LoraRecipe(build_config(tree))
    first.setup()
    first.train()
    base_replies = [sample["answer"] for sample in first.evaluation_runs()[0].samples]

    saved = json.loads((tmp_path / "out" / "samples_base.json").read_text(encoding="utf-8"))
    assert [sample["answer"] for sample in saved["samples"]] == base_replies

    tree["train"]["max_steps"] = 6
    resumed = LoraRecipe(build_config(tree), resume=True)
    resumed.setup()
    with caplog.at_level(logging.INFO, logger="vlmtune.training.sampling"):
        resumed.train()
    resumed.save()
    assert "resumed run: the base model's replies come from" in caplog.text  # not generated again
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text(encoding="utf-8"))
    assert [run["label"] for run in report] == ["base", "step 6"]
    assert [sample["answer"] for sample in report[0]["samples"]] == base_replies
    assert report[0]["metrics"] == saved["metrics"]
    # The manifest names both sessions' SwanLab folders, and states whose mean train_loss is.
    manifest = json.loads((tmp_path / "out" / "run_manifest.json").read_text(encoding="utf-8"))
    assert len(manifest["tracking_runs"]) == 2
    assert manifest["tracking_run"] == manifest["tracking_runs"][-1]
    assert manifest["metrics_note"] == "train_loss is transformers' mean over the last training session only"

    # Other generation settings make the saved replies stale, so the resumed run generates them again.
    caplog.clear()
    tree["train"]["max_steps"] = 8
    tree["evaluation"]["max_new_tokens"] = 6
    again = LoraRecipe(build_config(tree), resume=True)
    again.setup()
    with caplog.at_level(logging.INFO, logger="vlmtune.training.sampling"):
        again.train()
    assert "generating again" in caplog.text
    assert again.evaluation_runs()[0].label == "base"


def test_swanlab_local_run_shows_in_dashboard(tiny_model_dir, tmp_path):
    """A run in SwanLab's local mode opens in `swanlab watch` on 127.0.0.1, without an account."""
    import subprocess
    import sys
    import time
    import urllib.request

    from test_serving import free_port

    rows = [{"instruction": f"问题{i}", "input": "", "output": ANSWER} for i in range(8)]
    tree = training_tree(tiny_model_dir, write_json(tmp_path / "train.json", rows), tmp_path / "out", max_steps=2)
    tree["tracking"] = {"backend": "swanlab", "swanlab_mode": "local", "experiment_name": "本地运行"}
    recipe = LoraRecipe(build_config(tree))
    recipe.setup()
    recipe.train()
    recipe.save()
    hint = recipe.tracking.describe()
    assert f"view it in the browser: swanlab watch {tmp_path / 'out' / 'swanlog'}" in hint

    port = free_port()
    swanlab = str(Path(sys.executable).parent / "swanlab")
    watch = subprocess.Popen([swanlab, "watch", "--host", "127.0.0.1", "--port", str(port), str(tmp_path / "out" / "swanlog")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, project = time.time() + 60, None
        while project is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/project", timeout=5) as response:
                    project = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
    finally:
        watch.terminate()
        watch.wait(timeout=30)
    assert project is not None, "swanlab watch did not answer within 60 s"
    assert [experiment["name"] for experiment in project["data"]["experiments"]] == ["本地运行"]


def test_resume_names_split_changes(tiny_model_dir, tmp_path, caplog):
    from vlmtune.config import save_config
    from vlmtune.training.run_folder import RunFolder

    config = build_config(training_tree(tiny_model_dir, tmp_path / "train.json", tmp_path / "out"))
    save_config(config, tmp_path / "config.yaml")
    changed = build_config({**training_tree(tiny_model_dir, tmp_path / "train.json", tmp_path / "out"),
                            "data": {**config.data.model_dump(), "val_size": 0.1}})
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        RunFolder(tmp_path, changed, True, False, True)._check_resumed_settings(tmp_path / "checkpoint-1")
    assert "data.val_size: 0.0 then, 0.1 now" in caplog.text
    assert "(data.val_size also move examples between the training and validation splits)" in caplog.text
    assert "learning-rate schedule" not in caplog.text


def test_resumed_swanlab_run_lists_every_folder(tmp_path):
    """Each training session of a resumed run writes its own SwanLab run folder, and all are needed."""
    import os

    from vlmtune.training.tracking import Tracking

    for number, name in enumerate(["run-20261205_120000-a", "run-20261205_130000-b"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1_000_000 + number, 1_000_000 + number))
    hint = Tracking("swanlab", tmp_path).describe()
    assert f"swanlab sync {tmp_path / 'run-20261205_120000-a'}; swanlab sync {tmp_path / 'run-20261205_130000-b'}" in hint


def test_swanlab_hint_follows_the_mode(tmp_path):
    from vlmtune.training.tracking import Tracking

    (tmp_path / "run-1").mkdir()
    local = Tracking("swanlab", tmp_path, swanlab_mode="local").describe()
    assert f"view it in the browser: swanlab watch {tmp_path}" in local
    assert "swanlab sync" not in local
    assert "tracking.swanlab_mode=local" not in local
    cloud = Tracking("swanlab", tmp_path, swanlab_mode="cloud").describe()
    assert "uploaded as it trained" in cloud
    assert "swanlab sync" not in cloud


def test_swanlab_cloud_without_login_fails_before_loading(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Without an API key and a terminal, SwanLab's cloud mode would fail only once training starts."""
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "swanlab-home"))  # no saved login
    monkeypatch.chdir(tmp_path)
    tree = training_tree(tiny_model_dir, write_json(tmp_path / "train.json", [{"instruction": "问", "output": ANSWER}]),
                         tmp_path / "out")
    tree["tracking"] = {"backend": "swanlab", "swanlab_mode": "cloud"}
    with caplog.at_level(logging.INFO, logger="vlmtune"), pytest.raises(ConfigError, match="run `swanlab login` first"):
        LoraRecipe(build_config(tree)).setup()
    assert "vlmtune.model.loading" not in caplog.text  # the weights were never loaded


def test_tensorboard_gets_final_sample_generation(tiny_model_dir, tmp_path):
    """transformers closes its TensorBoard writer at train end, before the last sample generation is logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [{"instruction": f"问题{i}", "input": "", "output": ANSWER} for i in range(8)]
    tree = training_tree(tiny_model_dir, write_json(tmp_path / "train.json", rows), tmp_path / "out", max_steps=2, eval_steps=100)
    tree["tracking"] = {"backend": "tensorboard"}
    tree["evaluation"] = {"prompts": ["你好"], "num_data_prompts": 0, "max_new_tokens": 4}
    recipe = LoraRecipe(build_config(tree))
    recipe.setup()
    recipe.train()
    recipe.save()
    steps = set()
    for events in (tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "samples/stop_rate" in accumulator.Tags()["scalars"]:
            steps |= {event.step for event in accumulator.Scalars("samples/stop_rate")}
    assert steps == {0, 2}  # the base model, and the adapter at the last step


def init_from_tree(tiny_model_dir: Path, tmp_path: Path, adapter: Path, **lora) -> dict:
    rows = [{"instruction": f"第{i}个问题", "input": "", "output": "好的喵~"} for i in range(4)]
    return {
        "model": {"name_or_path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": [str(write_json(tmp_path / "train.json", rows))], "max_length": 128},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "init_from": str(adapter), **lora},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 4,
                  "learning_rate": 1e-6, "warmup_steps": 0, "save_steps": 100},
        "tracking": {"backend": "none"},
        "evaluation": {"max_new_tokens": 8, "num_data_prompts": 1},
    }


def test_init_from_starts_at_saved_weights(tiny_model_dir, trained_adapter, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    recipe = LoraRecipe(build_config(init_from_tree(tiny_model_dir, tmp_path, trained_adapter)))
    recipe.setup()
    saved = load_file(str(trained_adapter / "adapter_model.safetensors"))
    state = get_peft_model_state_dict(recipe.loaded.model)
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[key], saved[key]) for key in saved)
    recipe.train()
    base, after = recipe.sampling.runs[0], recipe.sampling.runs[-1]
    # The base column is the base model with the adapter switched off; the run goes on from the saved replies.
    assert base.label == "base"
    assert base.samples[0]["answer"] != "好的喵~"
    assert after.samples[0]["answer"] == "好的喵~"


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"r": 8, "alpha": 16}, "was trained with other LoRA settings (lora.r: 16 in the adapter, 8 here; lora.alpha: 32"),
        ({"target_modules": ["q_proj", "v_proj"]}, "adapts other modules than this lora section: only the adapter has"),
    ],
    ids=["rank", "targets"],
)
def test_init_from_mismatch_named(tiny_model_dir, trained_adapter, tmp_path, lora, message):
    recipe = LoraRecipe(build_config(init_from_tree(tiny_model_dir, tmp_path, trained_adapter, **lora)))
    with pytest.raises(ConfigError) as caught:
        recipe.setup()
    assert f"lora.init_from: {trained_adapter}" in str(caught.value)
    assert message in str(caught.value)


def test_init_from_with_pissa_rejected(tiny_model_dir, trained_adapter, tmp_path):
    with pytest.raises(ConfigError, match="lora.init='pissa' has nothing to initialise"):
        build_config(init_from_tree(tiny_model_dir, tmp_path, trained_adapter, init="pissa"))
