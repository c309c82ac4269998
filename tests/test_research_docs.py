"""docs/research.md stays true: its demos (logit lens, causal tracing) run as written."""

from __future__ import annotations

import os
import re

import pytest

from conftest import ROOT


@pytest.mark.parametrize("index", [0, 1])
def test_research_demo_runs(index, monkeypatch):
    with open(os.path.join(ROOT, "docs", "research.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(ROOT)
    exec(compile(blocks[index], "docs/research.md", "exec"), {})
