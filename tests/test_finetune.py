"""tools/finetune.py, the training loop researchers copy (needs the `train` extra: optax).

- the loss falls over 20 steps on the golden GPT-2 (default settings: bf16 compute, fp32
  master weights, dropout, accumulation), and the last line reads `loss FIRST -> LAST`;
- on 8 simulated CPU devices, a 4x2 (data x model) mesh gives the one-device losses step
  for step (float32 compute; within 1e-5 relative: collectives reorder sums);
- the checkpoint it writes loads in HF (`from_pretrained`, reference tier) and gives
  refjax's logits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("optax", reason="tools/finetune.py needs the `train` extra (optax)")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import finetune  # noqa: E402

STEP = re.compile(r"^step (\d+)/\d+  loss ([0-9.]+)", re.M)


def test_loss_falls_over_20_steps(capsys):
    assert finetune.main(["--steps", "20"]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    first, final = (float(x) for x in re.fullmatch(r"loss ([0-9.]+) -> ([0-9.]+)", last).groups())
    assert final < first - 0.5, last
    assert len(STEP.findall(out)) >= 4  # progress lines


SCRIPT = r"""
import os, sys, io, contextlib
sys.path.insert(0, os.path.join(ROOT, "tools"))
import jax
assert len(jax.devices()) == 8
import finetune
runs = {}
for mesh in ("1x1", "4x2"):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        finetune.main(["--steps", "4", "--mesh", mesh, "--compute-dtype", "float32", "--log-every", "1",
                       "--batch", "8", "--accum", "2"])
    runs[mesh] = buffer.getvalue()
print("=====".join(runs[m] for m in ("1x1", "4x2")))
"""


def test_mesh_run_equals_one_device_step_for_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + SCRIPT], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, mesh = proc.stdout.split("=====")
    assert "mesh 4x2" in mesh
    a = np.array([float(x) for _, x in STEP.findall(one)])
    b = np.array([float(x) for _, x in STEP.findall(mesh)])
    assert a.size == b.size == 4
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert not np.allclose(a[1:], a[0])  # the weights moved


def test_saved_checkpoint_loads_in_hf_with_the_same_logits(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="reference tier needs the `reference` extra")
    transformers = pytest.importorskip("transformers", reason="reference tier needs the `reference` extra")
    import jax.numpy as jnp

    import refjax

    out = tmp_path / "tuned"
    assert finetune.main(["--steps", "2", "--out", str(out), "--compute-dtype", "float32"]) == 0
    ckpt = refjax.load_checkpoint(out, dtype=jnp.float32)
    ids = np.arange(1, 13, dtype=np.int64).reshape(2, 6) % ckpt.config.vocab_size
    ours = np.asarray(refjax.gpt2.forward(ckpt.params, ckpt.config, jnp.asarray(ids, jnp.int32)).logits)
    model = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    scale = max(np.abs(theirs).max(), 1.0)
    assert np.abs(ours - theirs).max() <= 1e-5 * scale
    base = refjax.load_checkpoint(finetune.default_checkpoint(), dtype=jnp.float32)
    assert not np.allclose(np.asarray(refjax.gpt2.forward(base.params, base.config, jnp.asarray(ids, jnp.int32)).logits),
                           ours)  # it is the fine-tuned model, not the original
