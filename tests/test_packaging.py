"""The built wheel: one top-level package, `refjax`, usable from outside the checkout.

Builds the wheel as `pip install .` would (PEP 517, build isolation), checks what it
installs, then imports the unpacked wheel from a temporary directory (ahead of any
installed copy on sys.path) and runs a golden checkpoint through the public surface.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import GOLDEN, ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), ROOT],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = glob.glob(str(out / "refjax-*.whl"))
    return path


def test_wheel_installs_only_refjax(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["refjax"]
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"refjax"}, roots
    golden_files = sum(len(files) for _, _, files in os.walk(GOLDEN))
    assert len([n for n in names if n.startswith("refjax/golden/")]) == golden_files  # every golden file ships
    for module in ("refjax/golden/MANIFEST.json", "refjax/__init__.py", "refjax/shell.py", "refjax/gpt2.py", "refjax/params/checkpoint.py",
                   "refjax/tooling/cli.py"):
        assert module in names, module
    assert "refjax = refjax.tooling.cli:main" in entry_points


def test_unpacked_wheel_runs_a_golden_from_elsewhere(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    script = (
        "import refjax, numpy as np\n"
        f"assert refjax.__file__.startswith({str(site)!r}), refjax.__file__\n"
        f"ckpt = refjax.load_checkpoint({os.path.join(GOLDEN, 'gpt2', 'lm')!r})\n"
        "out = refjax.gpt2.forward(ckpt.params, ckpt.config, [[1, 2, 3]])\n"
        "assert out.logits.shape == (1, 3, ckpt.config.vocab_size)\n"
        "assert sorted(refjax.FAMILIES) == ['arcee', 'gpt2', 'ibert', 'mega', 'roformer']\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_unpacked_wheel_verifies_its_own_goldens_from_elsewhere(wheel, tmp_path):
    """`refjax verify` after a plain install, run from a directory without golden/: it finds
    the goldens shipped in the package."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-m", "refjax.tooling.cli", "verify", "--only", "gpt2/tokcls", "arcee/mqa"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "tensors within tolerance" in proc.stdout
    assert f"goldens: {site / 'refjax' / 'golden'} (2 cases, " in proc.stderr  # then the worker count
