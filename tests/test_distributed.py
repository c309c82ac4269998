"""Loading onto a multi-process mesh: two local processes under `jax.distributed`.

The simulated form of a multi-host slice: two worker processes on this machine, each with 4
CPU devices (`--xla_force_host_platform_device_count=4`), joined through a localhost
coordinator with gloo CPU collectives, so that each sees 8 global devices and 4 addressable
ones. Both run the same program (as every host of a TPU slice does): build a mesh over the
global devices, `load_checkpoint(dir, mesh=mesh)`, run the jitted forward and greedy
`generate`, gather the results. For golden checkpoints of two families:

- gpt2/lm on a (data 1 x model 8) mesh, arcee/causal-lm on a (data 2 x model 4) mesh whose
  model axis spans both processes (each row: two devices of each process), so every
  tensor-parallel kernel is split across the processes and the batch over the data axis;
- every read of the checkpoint is recorded (`LazyTensor.read_slice`): each process reads, per
  leaf, exactly the distinct slices its 4 devices hold, each once (a slice held by two of its
  devices is read once); for a split leaf that is its half of every tensor, the two
  processes' halves disjoint and covering it; so each process reads under the whole file
  (the replicated leaves, norms and embeddings, are read by both);
- each process checks its addressable shards against the file's values;
- the sharded forward's logits and the generated tokens, gathered to process 0, equal a
  plain single-process run of the same checkpoint (no mesh): tokens exactly, logits within
  1e-5 of their largest magnitude (fp32).

What it does not prove: a real network between hosts (both processes share one machine's
loopback and filesystem) or TPU collectives (gloo on CPU stands in for ICI/DCN); see
docs/design.md, "Multi-host".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from conftest import GOLDEN

CASES = {  # case -> (data, model, interleave: put the model axis across both processes)
    "gpt2/lm": (1, 8, False),
    "arcee/causal-lm": (2, 4, True),
}
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
TIMEOUT_S = 300

WORKER = r"""
import json, os, sys, traceback
def fail_fast(*exc_info):  # exit at once: jax.distributed's exit handler would wait for the other process
    traceback.print_exception(*exc_info)
    sys.stderr.flush()
    os._exit(1)
sys.excepthook = fail_fast
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")
process_id, port, out_dir, golden_dir, cases = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=120)
import numpy as np
import jax.numpy as jnp
from jax.experimental import multihost_utils
from refjax.params import io, sharding
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors, tree_paths
from refjax.tooling.families import FAMILIES
assert jax.process_index() == process_id and jax.process_count() == 2, (jax.process_index(), jax.process_count())
assert jax.device_count() == 8 and jax.local_device_count() == 4, (jax.device_count(), jax.local_device_count())

reads = []  # (file offset of the tensor, [[start, stop] per axis], bytes read), in read order
original = io.LazyTensor.read_slice
def recording(self, index):
    out = original(self, index)
    reads.append((self.offset, [list(sl.indices(n)[:2]) for sl, n in zip(index, self.shape)], int(out.nbytes)))
    return out
io.LazyTensor.read_slice = recording
leaf_reads = []  # per leaf, in load order: the slice of `reads` its callback made
original_leaf = io.sharded_leaf
def per_leaf(*args, **kwargs):
    start = len(reads)
    out = original_leaf(*args, **kwargs)
    leaf_reads.append((start, len(reads)))
    return out
io.sharded_leaf = per_leaf

report = {"process": process_id, "cases": {}}
results = {}
for case, (data, model, interleave) in cases.items():
    devices = jax.devices()  # global, ordered by process: 0-3 on process 0, 4-7 on process 1
    if interleave:  # each mesh row [p0 d, p0 d, p1 d, p1 d]: the model axis spans both processes
        by_process = [[d for d in devices if d.process_index == p] for p in range(2)]
        devices = [d for row in range(data) for p in range(2) for d in by_process[p][2 * row: 2 * row + 2]]
    mesh = sharding.make_mesh(data, model, devices)
    directory = f"{golden_dir}/{case}"
    lazy, _ = read_safetensors(f"{directory}/model.safetensors", lazy=True)
    names = {t.offset: name for name, t in lazy.items()}
    reads.clear(); leaf_reads.clear()
    placed = load_checkpoint(directory, mesh=mesh)
    case_reads = list(reads)
    io.LazyTensor.read_slice = original  # the checks below read whole tensors: not the loader's reads
    plain_host = dict(tree_paths(jax.tree.map(np.asarray, load_checkpoint(directory).params)))
    leaves = []
    for (path, leaf), (start, stop) in zip(tree_paths(placed.params), leaf_reads):
        shards = leaf.addressable_shards
        assert len(shards) == 4, (path, len(shards))
        assert not leaf.is_fully_addressable, path
        distinct = {}
        for s in shards:  # this process's shards hold the file's values
            np.testing.assert_array_equal(np.asarray(s.data), plain_host[path][s.index], err_msg=path)
            distinct[tuple(tuple(sl.indices(n)[:2]) for sl, n in zip(s.index, leaf.shape))] = s.data.nbytes
        leaves.append(dict(path=path, spec=[a for a in leaf.sharding.spec], nbytes=int(leaf.nbytes),
                           distinct=int(sum(distinct.values())), held=int(sum(s.data.nbytes for s in shards)),
                           reads=[[names[o], idx, n] for o, idx, n in case_reads[start:stop]]))
    assert sum(stop - start for start, stop in leaf_reads) == len(case_reads)
    report["cases"][case] = dict(leaves=leaves, read=int(sum(n for _, _, n in case_reads)),
                                 file_bytes=int(sum(t.nbytes for t in lazy.values())),
                                 tensor_bytes={name: int(t.nbytes) for name, t in lazy.items()})
    io.LazyTensor.read_slice = recording

    golden, _ = read_safetensors(f"{directory}/golden.safetensors")
    family = FAMILIES[placed.family]
    ids, mask = np.asarray(golden["input_ids"]), np.asarray(golden["attention_mask"])
    fwd = jax.jit(family.forward, static_argnames="config")
    logits = fwd(placed.params, placed.config, sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh)).logits
    assert not logits.is_fully_addressable  # a global array: each process holds its part
    logits = multihost_utils.process_allgather(logits, tiled=True)
    tokens = family.generate(placed.params, placed.config, np.asarray(golden["generate.input_ids"]),
                             np.asarray(golden["generate.attention_mask"]), max_new_tokens=4)
    tokens = multihost_utils.process_allgather(tokens, tiled=True)
    results[f"{case}/logits"] = np.asarray(logits)
    results[f"{case}/tokens"] = np.asarray(tokens)

with open(os.path.join(out_dir, f"reads-{process_id}.json"), "w") as f:
    json.dump(report, f)
if process_id == 0:
    np.savez(os.path.join(out_dir, "results.npz"), **results)
multihost_utils.sync_global_devices("done")
jax.distributed.shutdown()
print("worker", process_id, "ok", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_workers(out_dir: str) -> None:
    """Both workers, each with a deadline; one failing stops the other; on failure both
    workers' output is in the assertion message."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
           "JAX_PLATFORMS": "cpu"}
    env.pop("REFJAX_COMPILATION_CACHE", None)
    port = _free_port()
    logs, procs = [], []
    for i in range(NUM_PROCESSES):
        log = open(os.path.join(out_dir, f"worker-{i}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(port), out_dir, GOLDEN, json.dumps(CASES)],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            failed = f"timed out after {TIMEOUT_S} s"
            break
        if any(p.poll() not in (None, 0) for p in procs):
            failed = "a worker failed"
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    codes = [p.returncode for p in procs]
    if failed is None and any(codes):
        failed = "a worker failed"
    if failed:
        outputs = []
        for i, log in enumerate(logs):
            log.seek(0)
            text = "\n".join(line for line in log.read().splitlines() if not line.startswith("[Gloo]"))
            outputs.append(f"--- worker {i} (exit code {codes[i]}) ---\n{text[-6000:]}")
        raise AssertionError(f"{failed}; exit codes {codes}\n" + "\n".join(outputs))
    for log in logs:
        log.close()


def _plain_results() -> dict:
    """The same forward and generate in this process, one device, no mesh."""
    from refjax.params.checkpoint import load_checkpoint
    from refjax.params.io import read_safetensors
    from refjax.tooling.families import FAMILIES

    out = {}
    for case in CASES:
        plain = load_checkpoint(f"{GOLDEN}/{case}")
        golden, _ = read_safetensors(f"{GOLDEN}/{case}/golden.safetensors")
        family = FAMILIES[plain.family]
        fwd = jax.jit(family.forward, static_argnames="config")
        out[f"{case}/logits"] = np.asarray(fwd(plain.params, plain.config, jnp.asarray(golden["input_ids"]),
                                               jnp.asarray(golden["attention_mask"])).logits)
        out[f"{case}/tokens"] = np.asarray(family.generate(plain.params, plain.config, golden["generate.input_ids"],
                                                           golden["generate.attention_mask"], max_new_tokens=4))
    return out


def _check_reads(reports: list[dict]) -> list[str]:
    lines = []
    for case in CASES:
        per_process = [r["cases"][case] for r in reports]
        file_bytes = per_process[0]["file_bytes"]
        tensor_bytes = per_process[0]["tensor_bytes"]
        split = split_bytes = 0
        for leaves in zip(*(p["leaves"] for p in per_process)):
            path, nbytes = leaves[0]["path"], leaves[0]["nbytes"]
            for leaf in leaves:
                # each distinct slice this process's devices hold, read once (io.sharded_leaf)
                assert sum(n for _, _, n in leaf["reads"]) == leaf["distinct"], (case, path, leaf)
            if "model" not in leaves[0]["spec"]:
                continue
            split += 1
            split_bytes += nbytes
            # a split leaf: each process read exactly its half, the halves disjoint and covering
            # every tensor (per HF key: a stacked leaf is one tensor per layer)
            regions: dict[str, list] = {}
            for p, leaf in enumerate(leaves):
                assert leaf["distinct"] * NUM_PROCESSES == nbytes, (case, path, leaf["distinct"], nbytes)
                for name, index, n in leaf["reads"]:
                    regions.setdefault(name, []).append((p, tuple(map(tuple, index)), n))
            for name, parts in regions.items():
                by_process = [{idx for q, idx, _ in parts if q == p} for p in range(NUM_PROCESSES)]
                assert all(by_process) and not by_process[0] & by_process[1], (case, name, by_process)
                sizes = {idx: n for _, idx, n in parts}
                boxes = sorted(sizes)
                for i, a in enumerate(boxes):  # the distinct regions do not overlap...
                    for b in boxes[i + 1:]:
                        assert any(a1 <= b0 or b1 <= a0 for (a0, a1), (b0, b1) in zip(a, b)), (case, name, a, b)
                assert sum(sizes.values()) == tensor_bytes[name], (case, name, sizes)  # ...and cover the tensor
        assert split >= 4, (case, split)
        reads = [p["read"] for p in per_process]
        held = [sum(leaf["held"] for leaf in p["leaves"]) for p in per_process]
        assert all(r < file_bytes for r in reads), (case, reads, file_bytes)
        lines.append(f"{case}: file {file_bytes} B; read by process 0 / 1: {reads[0]} / {reads[1]} B "
                     f"(held by their 4 devices: {held[0]} / {held[1]} B); {split} split leaves, {split_bytes} B: "
                     f"each process read half")
    return lines


def test_two_processes_load_onto_one_mesh_and_match_one_process():
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="refjax-distributed-") as out_dir:
        _run_workers(out_dir)
        reports = []
        for i in range(NUM_PROCESSES):
            with open(os.path.join(out_dir, f"reads-{i}.json")) as f:
                reports.append(json.load(f))
        with np.load(os.path.join(out_dir, "results.npz")) as npz:
            sharded = {k: npz[k] for k in npz.files}
    lines = _check_reads(reports)
    plain = _plain_results()
    for case in CASES:
        a, b = plain[f"{case}/logits"], sharded[f"{case}/logits"]
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32, (case, a.shape, b.shape, a.dtype, b.dtype)
        scale = float(np.max(np.abs(a)))
        diff = float(np.max(np.abs(a - b)))
        assert diff <= 1e-5 * scale, (case, diff, scale)
        np.testing.assert_array_equal(sharded[f"{case}/tokens"], plain[f"{case}/tokens"], err_msg=case)
        lines.append(f"{case}: logits max |diff| {diff:.2e} (max |logit| {scale:.2f}); "
                     f"tokens equal {sharded[f'{case}/tokens'].shape}")
    print("\n".join(lines + [f"{time.monotonic() - start:.1f} s"]))
