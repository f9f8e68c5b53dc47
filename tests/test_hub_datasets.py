"""Datasets on ModelScope or the Hugging Face Hub: config forms, file choice, errors and the run manifest.

The hubs cannot be reached from tests, so their download functions are replaced by one that
copies a local folder, as the hub clients do into their caches.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import write_json
from vlmtune.config import DatasetSpec, build_config, load_config, portable_config_dict
from vlmtune.data import hub
from vlmtune.data.loading import load_data
from vlmtune.errors import ConfigError, DataError
from vlmtune.training.run_folder import dataset_hashes

DATASET_ID = "himzhzx/muice-dataset-train.catgirl"
ROWS = [{"instruction": "你是谁？", "input": "", "output": "我是小橘喵~"}, {"instruction": "早上好", "input": "", "output": "早喵~"}]


class FakeHub:
    """A hub that serves dataset repositories from local folders and records each download."""

    def __init__(self, root: Path):
        self.root = root
        self.repositories: dict[str, Path] = {}
        self.calls: list[tuple[str, str | None, list[str] | None]] = []

    def add(self, dataset_id: str, files: dict[str, list[dict]]) -> None:
        folder = self.root / "repositories" / dataset_id
        for name, rows in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            write_json(folder / name, rows)
        (folder / "README.md").write_text("# dataset card\n", encoding="utf-8")
        self.repositories[dataset_id] = folder

    def download(self, dataset_id: str, revision: str | None, patterns: list[str] | None) -> str:
        self.calls.append((dataset_id, revision, patterns))
        if dataset_id not in self.repositories:
            raise FileNotFoundError(f"404 Client Error: repository {dataset_id} not found")
        source = self.repositories[dataset_id]
        target = self.root / "cache" / dataset_id
        for path in source.rglob("*"):
            name = path.relative_to(source).as_posix()
            if path.is_file() and (patterns is None or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / name)
        target.mkdir(parents=True, exist_ok=True)
        return str(target)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    for name in hub.DOWNLOADERS:
        monkeypatch.setitem(hub.DOWNLOADERS, name, fake.download)
    hub.download_dataset.cache_clear()
    yield fake
    hub.download_dataset.cache_clear()


def data_config(*train, **data) -> dict:
    return {"model": {"name_or_path": "unused"}, "data": {"train": list(train), **data}}


def test_prefix_sets_hub():
    config = build_config(data_config(f"modelscope:{DATASET_ID}", {"path": "huggingface:tatsu-lab/alpaca", "files": ["*.json"]}))
    modelscope, huggingface = config.data.train
    assert (modelscope.hub, modelscope.path, modelscope.label) == ("modelscope", DATASET_ID, f"modelscope:{DATASET_ID}")
    assert (huggingface.hub, huggingface.path, huggingface.files) == ("huggingface", "tatsu-lab/alpaca", ["*.json"])


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"path": "data/train.json", "files": ["*.json"]}, "files and revision apply to hub datasets only"),
        ({"path": "data/train.json", "revision": "v1"}, "files and revision apply to hub datasets only"),
        ({"path": "a/b/c", "hub": "modelscope"}, "modelscope dataset id 'a/b/c' is not of the form namespace/name"),
        ("huggingface:alpaca", "huggingface dataset id 'alpaca' is not of the form namespace/name"),
        ("huggingface: trial persona/x", "huggingface dataset id 'trial persona/x' is not of the form namespace/name"),
        ({"path": "modelscope:a/b", "hub": "huggingface"}, "path 'modelscope:a/b' names modelscope, but hub is huggingface"),
        ({"path": "modelscope:a/b/train.json", "files": ["x.json"]}, "names a file of the repository and files is set too"),
    ],
)
def test_bad_hub_entries_rejected(entry, message):
    with pytest.raises(ConfigError, match=message):
        build_config(data_config(entry))


def test_single_file_repository_loads(fake_hub):
    fake_hub.add(DATASET_ID, {"muice-dataset-train.catgirl.json": ROWS, "configuration.json": {"framework": "pytorch"}})
    config = build_config(data_config(f"modelscope:{DATASET_ID}"))
    data = load_data(config.data)
    assert [conversation.messages[-1].text for conversation in data.train] == ["我是小橘喵~", "早喵~"]
    assert fake_hub.calls == [(DATASET_ID, None, None)]


def test_several_files_need_a_choice(fake_hub):
    fake_hub.add(DATASET_ID, {"data/train.json": ROWS, "data/test.json": ROWS[:1]})
    with pytest.raises(DataError) as error:
        load_data(build_config(data_config(f"modelscope:{DATASET_ID}")).data)
    assert f"dataset modelscope:{DATASET_ID}: the repository has 2 dataset files (data/test.json, data/train.json)" in str(error.value)
    assert f"choose one by naming it after the id, e.g. modelscope:{DATASET_ID}/data/train.json" in str(error.value)

    # The file named after the id, as the web UI's dataset field and predict --data take it.
    data = load_data(build_config(data_config(f"modelscope:{DATASET_ID}/data/train.json")).data)
    assert len(data.train) == 2
    assert fake_hub.calls[-1] == (DATASET_ID, None, ["data/train.json"])

    entry = {"path": DATASET_ID, "hub": "huggingface", "files": ["data/train*"], "revision": "v1"}
    data = load_data(build_config(data_config(entry)).data)
    assert len(data.train) == 2
    assert fake_hub.calls[-1] == (DATASET_ID, "v1", ["data/train*"])


def test_unmatched_files_listed(fake_hub):
    fake_hub.add(DATASET_ID, {"train.json": ROWS})
    entry = {"path": f"modelscope:{DATASET_ID}", "files": ["nothing/*.jsonl"]}
    with pytest.raises(DataError, match=r"no \.json, \.jsonl, \.csv, \.parquet file matches files \['nothing/\*\.jsonl'\]"):
        load_data(build_config(data_config(entry)).data)


def test_failed_download_named(fake_hub):
    with pytest.raises(DataError) as error:
        load_data(build_config(data_config("modelscope:someone/missing")).data)
    message = str(error.value)
    assert "dataset modelscope:someone/missing: download failed: 404 Client Error" in message
    assert "give their local path" in message


def test_config_file_keeps_hub_ids(fake_hub, tmp_path):
    fake_hub.add(DATASET_ID, {"train.json": ROWS})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data_config(f"modelscope:{DATASET_ID}")), encoding="utf-8")
    config = load_config(path)  # the id is no local path, and loading does not look for one
    assert config.data.train[0].path == DATASET_ID
    saved = portable_config_dict(config)["data"]["train"][0]
    assert (saved["path"], saved["hub"]) == (DATASET_ID, "modelscope")
    [record] = dataset_hashes(config)
    assert (record["dataset"], record["revision"]) == (f"modelscope:{DATASET_ID}", None)
    assert record["path"].endswith("train.json")
    assert len(record["sha256"]) == 64


def test_model_prefix_sets_hub():
    config = build_config({"model": {"name_or_path": "modelscope:ZhipuAI/GLM-4.1V-9B-Thinking"}, "data": {"train": ["x.json"]}})
    assert (config.model.name_or_path, config.model.hub) == ("ZhipuAI/GLM-4.1V-9B-Thinking", "modelscope")
    with pytest.raises(ConfigError, match="names huggingface, but hub is local"):
        build_config({"model": {"name_or_path": "huggingface:a/b", "hub": "local"}, "data": {"train": ["x.json"]}})


def test_hub_typos_get_hints(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: unused}\ndata:\n  train:\n    - modelscope:\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'modelscope:' names a hub but no dataset id; write modelscope:namespace/name"):
        load_config(path)
    path.write_text("model: {name_or_path: unused}\ndata: {train: [ms:a/b]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="dataset not found: ms:a/b .*; for a dataset on a hub, write modelscope:namespace/name"):
        load_config(path)


def test_local_entry_unchanged(tmp_path):
    path = write_json(tmp_path / "train.json", ROWS)
    spec = DatasetSpec(path=str(path))
    assert (spec.hub, spec.label) == ("local", str(path))
    assert hub.spec_files(spec) == [path]


def test_training_reads_hub_dataset(fake_hub, tiny_model_dir, tmp_path):
    import json

    from vlmtune.training.recipe import LoraRecipe

    fake_hub.add(DATASET_ID, {"train.json": ROWS * 4})
    tree = data_config(f"modelscope:{DATASET_ID}", max_length=128)
    tree["model"] = {"name_or_path": str(tiny_model_dir), "hub": "local", "device": "cpu"}
    tree["train"] = {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 100}
    tree["tracking"] = {"backend": "none"}
    tree["evaluation"] = {"generate": False}
    recipe = LoraRecipe(build_config(tree))
    recipe.setup()
    recipe.train()
    recipe.save()
    assert len(recipe.report.samples) == 8
    manifest = json.loads((tmp_path / "out" / "run_manifest.json").read_text(encoding="utf-8"))
    assert [Path(entry["path"]).name for entry in manifest["datasets"]] == ["train.json"]
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert f"- data: modelscope:{DATASET_ID} (8 samples)" in card
    assert len(fake_hub.calls) == 1, "the manifest reuses the download"
