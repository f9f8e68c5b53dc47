"""Model resolution: local folders, and ModelScope / Hugging Face ids with the hub client faked.

No hub can be reached from the test machine, so only the download call is replaced; the
folder it returns is then loaded for real.
"""

from __future__ import annotations

import shutil

import pytest

from vlmtune.config import ModelSettings
from vlmtune.errors import ModelError
from vlmtune.model.hub import resolve_model_path
from vlmtune.model.loading import load_model


class FakeSnapshot:
    """Stands in for a hub's snapshot_download: copies the tiny model into a cache folder."""

    def __init__(self, source, cache):
        self.source = source
        self.cache = cache
        self.calls = []

    def __call__(self, model_id, revision=None, cache_dir=None, **kwargs):
        self.calls.append({"model_id": model_id, "revision": revision, "cache_dir": cache_dir})
        target = self.cache / model_id.replace("/", "--")
        if not target.exists():
            shutil.copytree(self.source, target)
        return str(target)


@pytest.mark.parametrize(
    "hub, module, model_id",
    [
        ("modelscope", "modelscope", "ZhipuAI/GLM-4.1V-9B-Thinking"),
        ("huggingface", "huggingface_hub", "zai-org/GLM-4.1V-9B-Thinking"),
    ],
)
def test_hub_download_then_real_load(monkeypatch, tmp_path, tiny_model_dir, hub, module, model_id):
    fake = FakeSnapshot(tiny_model_dir, tmp_path)
    imported = pytest.importorskip(module)
    monkeypatch.setattr(imported, "snapshot_download", fake)
    settings = ModelSettings(name_or_path=model_id, hub=hub, revision="v1", device="cpu")
    loaded = load_model(settings)
    assert fake.calls == [{"model_id": model_id, "revision": "v1", "cache_dir": None}]
    assert type(loaded.model).__name__ == "Glm4vForConditionalGeneration"
    assert loaded.stop_token_ids == loaded.model.generation_config.eos_token_id


def test_auto_hub_prefers_existing_folder(tiny_model_dir):
    assert resolve_model_path(ModelSettings(name_or_path=str(tiny_model_dir))) == tiny_model_dir


def test_auto_hub_uses_huggingface_for_ids(monkeypatch, tmp_path, tiny_model_dir):
    import huggingface_hub

    fake = FakeSnapshot(tiny_model_dir, tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_model_path(ModelSettings(name_or_path="zai-org/GLM-4.1V-9B-Thinking"))
    assert fake.calls[0]["model_id"] == "zai-org/GLM-4.1V-9B-Thinking"


def test_missing_local_folder_message(tmp_path):
    with pytest.raises(ModelError, match="local folder not found.*vlmtune tiny-model"):
        resolve_model_path(ModelSettings(name_or_path=str(tmp_path / "missing"), hub="local"))


def test_model_path_that_is_a_file(tmp_path):
    data = tmp_path / "persona.json"
    data.write_text("[]", encoding="utf-8")
    with pytest.raises(ModelError, match=r"persona.json is a file; give the model's folder"):
        resolve_model_path(ModelSettings(name_or_path=str(data)))


@pytest.mark.parametrize("name", ["/no/such/model", "./tiny-glmv", "../outputs/tiny-glmv", "~/tiny-glmv", "a/b/c"])
def test_auto_hub_treats_paths_as_local(name):
    with pytest.raises(ModelError, match="local folder not found"):
        resolve_model_path(ModelSettings(name_or_path=name))


def test_auto_hub_failure_names_missing_folder(monkeypatch):
    import huggingface_hub

    def failing(*args, **kwargs):
        raise ValueError("Repository Not Found.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(ModelError) as caught:
        resolve_model_path(ModelSettings(name_or_path="outputs/tiny-glmv"))
    message = str(caught.value)
    assert "from huggingface failed: Repository Not Found. There is no local folder " in message
    assert "outputs/tiny-glmv either. Check the id" in message


def test_download_failure_message(monkeypatch):
    import modelscope

    def failing(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(modelscope, "snapshot_download", failing)
    with pytest.raises(ModelError, match=r"downloading 'a/b' from modelscope failed: network unreachable"):
        resolve_model_path(ModelSettings(name_or_path="a/b", hub="modelscope"))
