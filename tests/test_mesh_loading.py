"""Loading straight onto a mesh: `load_checkpoint(dir, mesh=...)` on 8 simulated CPU devices.

In a subprocess (the device count is fixed when JAX starts). For golden checkpoints of
three families and a (data 2 x model 4) mesh:
- every leaf has its tensor-parallel sharding and the same values as a plain load;
- each device reads only its own slice: every read is one shard (a tensor-parallel kernel:
  a quarter of it), and each distinct shard is read once (the bytes read are the distinct
  shards' bytes, under what the devices hold), so no device ever needed the whole model;
- the forward and greedy generation on the mesh-loaded model equal the plain model's.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import GOLDEN

SCRIPT = r"""
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp, numpy as np
from refjax.params import io, sharding
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors, tree_paths
from refjax.tooling.families import FAMILIES
assert len(jax.devices()) == 8
read_bytes = []
original = io.LazyTensor.read_slice
def counting(self, index):
    out = original(self, index)
    read_bytes.append(out.nbytes)
    return out
io.LazyTensor.read_slice = counting
mesh = sharding.make_mesh(2, 4)
for case in ("gpt2/lm", "arcee/causal-lm", "roformer/causal-lm"):
    plain = load_checkpoint(f"{GOLDEN}/{case}", dtype=jnp.float64)
    read_bytes.clear()
    placed = load_checkpoint(f"{GOLDEN}/{case}", dtype=jnp.float64, mesh=mesh)
    held = 0
    unique = 0
    split = 0
    specs = dict(tree_paths(sharding.param_specs(plain.params, mesh)))
    for (path, a), (_, b) in zip(tree_paths(plain.params), tree_paths(placed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
        assert b.sharding.spec == specs[path], (path, b.sharding.spec, specs[path])
        shards = b.addressable_shards
        assert len(shards) == 8
        held += sum(s.data.nbytes for s in shards)
        indices = {tuple(sl.indices(n)[:2] for sl, n in zip(s.index, b.shape)): s.data.nbytes for s in shards}
        unique += sum(indices.values())
        if sharding.MODEL in tuple(specs[path]):
            split += 1
            assert all(s.data.size * 4 == b.size for s in shards), path
    assert split >= 4, (case, split)
    # Reads are per distinct shard, each once (io.sharded_leaf reads a slice that several
    # devices hold once; on this data 2 x model 4 mesh every shard is held by two devices).
    # float64 here, the goldens float32: the file's bytes are half.
    assert 2 * sum(read_bytes) == unique < held, (case, sum(read_bytes), unique, held)
    assert max(read_bytes) * 2 <= max(np.asarray(x).nbytes for _, x in tree_paths(plain.params)), case
    golden, _ = read_safetensors(f"{GOLDEN}/{case}/golden.safetensors")
    family = FAMILIES[plain.family]
    ids, mask = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])
    fwd = jax.jit(family.forward, static_argnames="config")
    a = fwd(plain.params, plain.config, ids, mask).logits
    b = fwd(placed.params, placed.config, sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh)).logits
    scale = max(float(jnp.max(jnp.abs(a))), 1.0)
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-12 * scale, case
    prompt, pmask = golden["generate.input_ids"], golden["generate.attention_mask"]
    np.testing.assert_array_equal(np.asarray(family.generate(placed.params, placed.config, prompt, pmask, max_new_tokens=4)),
                                  np.asarray(family.generate(plain.params, plain.config, prompt, pmask, max_new_tokens=4)))
    print(case, "ok", sum(read_bytes), "bytes read;", held // 2, "bytes held over 8 devices (float32 equivalent)")
"""


def test_load_checkpoint_onto_a_mesh_reads_only_each_devices_slices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", f"GOLDEN = {GOLDEN!r}\n" + SCRIPT], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok ") == 3, proc.stdout
