"""Helpers that the benchmark scripts share: memory readings and one process per variant."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def anonymous_mib() -> float:
    """Return this process's anonymous memory (RssAnon) in MiB, or NaN where /proc is missing."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_variants(script: str, variants: dict[str, str], arguments: list[str]) -> dict[str, dict]:
    """Run `script --variant NAME ARGUMENTS` for each variant in its own process; return each one's JSON result.

    The child prints its result as JSON on its last line. A failed child ends the benchmark with its stderr.
    """
    rows = {}
    for name in variants:
        print(f"running {name} ...", flush=True)
        finished = subprocess.run([sys.executable, script, "--variant", name, *arguments], capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"{name} failed:\n{finished.stderr[-4000:]}")
        rows[name] = json.loads(finished.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[name]), flush=True)
    return rows


def write_results(out: str, stem: str, report: dict, markdown: str) -> None:
    """Write the report as OUT/STEM.json and the table as OUT/STEM.md, and print the table."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    (folder / f"{stem}.md").write_text(markdown, encoding="utf-8")
    print(markdown)


def add_common_arguments(parser: argparse.ArgumentParser, output_dir: Path) -> None:
    """Add --model and --out, and the arguments that the parent passes to each variant's process."""
    parser.add_argument("--model", help="Model folder. Default: build the tiny GLM-4.1V offline.")
    parser.add_argument("--out", default=str(output_dir), help="Results folder (benchmarks/results to record them).")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)


def tiny_model(workdir: str, data: Path) -> str:
    """Build the tiny GLM-4.1V offline in WORKDIR/tiny-glm4v, its tokenizer trained on `data`; return its folder."""
    from vlmtune.model.tiny import build_tiny_model

    return str(build_tiny_model(Path(workdir) / "tiny-glm4v", [data], seed=0))
