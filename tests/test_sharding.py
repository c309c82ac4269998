"""Sharded == unsharded, on 8 simulated CPU devices (data and tensor parallel meshes).

Runs in a subprocess because the device count is fixed when JAX starts
(XLA_FLAGS=--xla_force_host_platform_device_count=8). For each family and each mesh
(8x1, 4x2, 2x4, 1x8 as data x model) the golden checkpoint is sharded with
params.sharding, the forward is jitted on sharded inputs and compared with the
single-device result in float64 within 1e-12 (collectives may reorder sums), the
tensor-parallel leaves are checked to be really split, and greedy generation on the
mesh must give the same tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import GOLDEN, ROOT

SCRIPT = r"""
import sys
sys.path.insert(0, ROOT)
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp, numpy as np
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors, tree_paths
from refjax.params import sharding
from refjax.tooling.families import FAMILIES
assert len(jax.devices()) == 8, jax.devices()
CASES = ("gpt2/lm", "gpt2/double-heads", "arcee/causal-lm", "arcee/mqa", "roformer/causal-lm", "roformer/mc", "mega/causal-lm")
import re
unmatched = {pattern for pattern, _ in sharding.TENSOR_PARALLEL_RULES}
for case in CASES:
    ckpt = load_checkpoint(f"{GOLDEN}/{case}", dtype=jnp.float64)
    unmatched -= {pattern for pattern in unmatched for path, _ in tree_paths(ckpt.params) if re.fullmatch(pattern, path)}
    golden, _ = read_safetensors(f"{GOLDEN}/{case}/golden.safetensors")
    family = FAMILIES[ckpt.family]
    inputs = {k: jnp.asarray(golden[k]) for k in ("input_ids", "attention_mask", "labels", "mc_token_ids") if k in golden}
    forward = jax.jit(family.forward, static_argnames=("config",))
    expected = forward(ckpt.params, ckpt.config, **inputs)
    for data, model in ((8, 1), (4, 2), (2, 4), (1, 8)):
        mesh = sharding.make_mesh(data, model)
        params = sharding.shard_params(ckpt.params, mesh)
        split = [p for p, leaf in tree_paths(params) if "model" in str(leaf.sharding.spec)]
        if model > 1 and not (case.startswith("mega") and model == 8):  # its FFN width 20 does not split 8 ways
            assert split, f"{case} {data}x{model}: no leaf is tensor-parallel"
            for path, leaf in tree_paths(params):
                if path in split:
                    assert leaf.addressable_shards[0].data.size * model == leaf.size, path
        sharded_inputs = {k: sharding.shard_batch(v, mesh) for k, v in inputs.items()}
        got = forward(params, ckpt.config, **sharded_inputs)
        for field in ("logits", "loss", "mc_logits", "last_hidden_state"):
            a, b = getattr(got, field), getattr(expected, field)
            if b is None:
                continue
            err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(np.asarray(b)))), 1.0))
            assert err <= 1e-12, (case, data, model, field, err)
        if "generate.input_ids" in golden:
            prompt = sharding.shard_batch(jnp.asarray(golden["generate.input_ids"]), mesh)
            mask = sharding.shard_batch(jnp.asarray(golden["generate.attention_mask"]), mesh)
            seqs = family.generate(params, ckpt.config, prompt, mask, max_new_tokens=10)
            unsharded = family.generate(ckpt.params, ckpt.config, golden["generate.input_ids"],
                                        golden["generate.attention_mask"], max_new_tokens=10)
            assert np.array_equal(np.asarray(seqs), np.asarray(unsharded)), (case, data, model)
        print("ok", case, f"{data}x{model}", len(split), "tensor-parallel leaves")
assert not unmatched, f"tensor-parallel rules that match no leaf (a typo?): {sorted(unmatched)}"
print("ALL OK")
"""


def test_sharded_equals_unsharded_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    code = f"ROOT = {ROOT!r}\nGOLDEN = {GOLDEN!r}\n" + SCRIPT
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ALL OK" in proc.stdout
    assert proc.stdout.count("ok ") == 4 * 7
