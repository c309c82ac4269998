"""README.md stays true: the Python examples of "Using it from Python" run as written (from
the repository root). Later sections show calls on the reader's own files (`refjax.compare`
on a port's dump) and are exercised by their own tests (tests/test_compare.py)."""

from __future__ import annotations

import os
import re

from conftest import ROOT


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Using it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return [b for b in blocks if not b.startswith("# needs:")]  # a block that needs the reader's own files


def test_readme_python_examples_run(monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 3  # forward, the math core by hand, interventions and training
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for block in blocks:  # later blocks use names the earlier ones define, as a reader runs them
        exec(compile(block, "README.md", "exec"), namespace)
