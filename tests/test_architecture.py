"""The import rules of docs/architecture.md, checked on the source and in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "vlmtune"
# Stage -> stages it must not import (anything else of ours is allowed by the table in docs/architecture.md).
FORBIDDEN = {
    "outputs": {"config", "data", "encoding", "model", "training", "inference", "serving", "webui", "cli"},
    "notices": {"config", "data", "encoding", "model", "training", "inference", "serving", "webui", "cli"},
    "config": {"data", "encoding", "model", "training", "inference", "serving", "cli"},
    "data": {"encoding", "model", "training", "inference", "serving", "cli"},
    "encoding": {"model", "training", "inference", "serving", "cli"},
    "model": {"data", "encoding", "training", "inference", "serving", "cli"},
    "training": {"serving", "cli"},
    "inference": {"training", "serving", "cli"},
    "serving": {"training", "cli"},
    # The web UI starts training as a `vlmtune train` subprocess, never in its own process.
    "webui": {"training", "serving", "cli"},
}


def imported_stages(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    stages = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmtune."):
            stages.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            stages.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("vlmtune."))
    return stages


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_stage_imports_follow_architecture(stage):
    location = PACKAGE / stage
    files = sorted(location.rglob("*.py")) if location.is_dir() else [PACKAGE / f"{stage}.py"]
    for path in files:
        bad = imported_stages(path) & FORBIDDEN[stage]
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {sorted(bad)}"


def test_data_stage_imports_no_torch():
    script = "import sys, vlmtune.data.loading; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr
