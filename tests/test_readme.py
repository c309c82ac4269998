"""README.md stays true: its Python examples run as written (from the repository root)."""

from __future__ import annotations

import os
import re

from conftest import ROOT


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 2  # the forward example and the math-core example
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for block in blocks:  # later blocks use names the earlier ones define, as a reader runs them
        exec(compile(block, "README.md", "exec"), namespace)
