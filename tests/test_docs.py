"""Documentation that must follow the code."""

from __future__ import annotations

import runpy

from conftest import REPO_ROOT


def test_config_reference_is_current():
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "write_config_doc.py"))
    current = (REPO_ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == script["render"](), "docs/config.md is stale: run python scripts/write_config_doc.py"


def test_readmes_share_the_two_commands():
    for name in ("README.md", "README_zh.md"):
        text = (REPO_ROOT / name).read_text(encoding="utf-8")
        assert "make demo" in text, name
        assert "make test" in text, name
