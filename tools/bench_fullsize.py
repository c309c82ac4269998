"""Full-size checkpoints, refjax vs HF PyTorch: load, forward and greedy decode, each in its own process.

    python tools/bench_fullsize.py [--models afm gpt2] [--dtype bfloat16] [--workdir DIR] [--keep]
                                   [--refjax-python PY ...] [--out BENCHMARKS.md]

For each model, a real config.json (../shared/data/configs: AFM-4.5B, gpt2) gets random
weights written as HF writes them: sharded safetensors (`model-0000n-of-0000N.safetensors`
+ `model.safetensors.index.json`, shards of at most 2 GB, tensor names from refjax's name
tables), generated one shard at a time so this process never holds the model. AFM-4.5B in
bf16 is 9.24 GB on disk: put `--workdir` on a disk with room; it is deleted afterwards
unless `--keep`.

Then each implementation runs in a fresh process on the same files and the same 128 random
prompt ids, so its peak RSS is its own:
- load: wall time of `refjax.load_checkpoint(dir)` / `from_pretrained(dir, dtype=...)`,
  peak RSS of the process (VmHWM) and its growth over the RSS before loading, both as a
  multiple of the weight bytes;
- forward 1 x 128: tokens/s (best of `--repeats` after a compiled warm-up);
- greedy decode of 16 new tokens after that prompt (eos disabled on both sides so all 16
  are made): ms/token = (time(16 new) - time(1 new)) / 15, i.e. the decode steps without
  the prefill, against the memory roofline (weight bytes / measured read bandwidth);
- agreement: top-1 of the forward's 128 positions and the 16 greedy tokens, refjax vs HF.
refjax runs with its defaults (no `fast=`, `generate` picks stacked or per-layer weights
itself). `--refjax-python` adds the refjax process under other interpreters (e.g. a
Python 3.12 venv with the newest JAX): one row each.
Writes (atomically) or replaces the "Full-size checkpoints" section of BENCHMARKS.md.
Nothing here is a test; timings are never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "configs")
CONFIGS = {"afm": ("AFM-4.5B", "AFM-4.5B.json"), "gpt2": ("GPT-2 124M", "gpt2.json")}
PROMPT, NEW = 128, 16
SHARD_BYTES = 2 * 10**9
SECTION = "# Full-size checkpoints"

import numpy as np  # noqa: E402

import bench  # noqa: E402  (tools/bench.py: cpu_name, cpu_flags, replace_section)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: that keeps the parent's peak across
    fork + exec, so a child of a parent that wrote a big checkpoint reports the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ---------------------------------------------------------------------------------------
# The checkpoint: random weights in HF's sharded layout
# ---------------------------------------------------------------------------------------


def hf_tensor_specs(checkpoint_dir: str, dtype) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor the config's model holds, in refjax's name tables."""
    from refjax.params import checkpoint, io

    family, config, _ = checkpoint.load_config(checkpoint_dir)
    module = checkpoint.FAMILIES[family].module
    rules = {r.path: r for r in module.name_rules(config)}
    specs = []
    for path, leaf in io.tree_paths(module.skeleton(config, dtype)):
        rule = rules[path]
        if "{i}" in rule.hf:
            shape = io._hf_shape(tuple(leaf.shape[1:]), rule)
            specs += [(rule.hf.format(i=i), shape) for i in range(leaf.shape[0])]
        else:
            specs.append((rule.hf, io._hf_shape(tuple(leaf.shape), rule)))
    return sorted(specs)


def random_tensor(name: str, shape: tuple[int, ...], dtype, rng: np.random.Generator) -> np.ndarray:
    """Norm gains 1, biases 0, everything else N(0, 0.02^2) (HF's initializer_range), in chunks."""
    if name.endswith("norm.weight") or ".ln_" in name or name.endswith("ln_f.weight"):
        return np.ones(shape, dtype)
    if name.endswith(".bias"):
        return np.zeros(shape, dtype)
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)
    chunk = 1 << 24
    for start in range(0, flat.size, chunk):
        n = min(chunk, flat.size - start)
        flat[start:start + n] = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(dtype)
    return out


def write_random_checkpoint(config_file: str, out_dir: str, dtype_name: str, seed: int = 0) -> int:
    """config.json + random weights as HF's save_pretrained writes them; returns the weight bytes."""
    import ml_dtypes

    from refjax.params import io

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    os.makedirs(out_dir, exist_ok=True)
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    raw["torch_dtype"] = dtype_name
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
    specs = hf_tensor_specs(out_dir, dtype)
    sizes = {name: int(np.prod(shape)) * dtype.itemsize for name, shape in specs}
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        if shards[-1] and used + sizes[name] > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += sizes[name]
    rng = np.random.default_rng(seed)
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        log(f"writing {file} ({sum(sizes[k] for k, _ in shard) / 1e9:.2f} GB, {len(shard)} tensors)")
        tensors = {name: random_tensor(name, shape, dtype, rng) for name, shape in shard}
        io.write_safetensors(os.path.join(out_dir, file), tensors, {"format": "pt"})
        del tensors
        weight_map.update({name: file for name, _ in shard})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return sum(sizes.values())


# ---------------------------------------------------------------------------------------
# The measured processes
# ---------------------------------------------------------------------------------------


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def child_refjax(ckpt_dir: str, ids_file: str, repeats: int, out_file: str) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp

    import refjax

    jax.devices()  # start the runtime before the baseline
    ids = jnp.asarray(np.load(ids_file))
    jnp.zeros(()).block_until_ready()
    rss_before = rss_bytes()
    start = time.perf_counter()
    ckpt = refjax.load_checkpoint(ckpt_dir)
    jax.block_until_ready(ckpt.params)
    load_s = time.perf_counter() - start
    peak_after_load = peak_rss_bytes()
    family = refjax.FAMILIES[ckpt.family]
    config = dataclasses.replace(ckpt.config, eos_token_id=None)  # all 16 tokens made, as on the HF side
    forward = jax.jit(lambda params, ids: family.forward(params, config, ids).logits)
    start = time.perf_counter()
    logits = forward(ckpt.params, ids).block_until_ready()
    forward_first_s = time.perf_counter() - start
    forward_s = best_of(lambda: forward(ckpt.params, ids).block_until_ready(), repeats)
    top1 = np.asarray(jnp.argmax(logits[0].astype(jnp.float32), -1))
    last_logits = np.asarray(logits[0, -1].astype(jnp.float32))

    def decode(n):
        return np.asarray(family.generate(ckpt.params, config, ids, max_new_tokens=n))

    start = time.perf_counter()
    tokens = decode(NEW)
    generate_first_s = time.perf_counter() - start
    decode(1)
    t16 = best_of(lambda: decode(NEW), repeats)
    t1 = best_of(lambda: decode(1), repeats)
    np.savez(out_file, top1=top1, last_logits=last_logits, tokens=tokens[0, PROMPT:])
    return dict(load_s=load_s, rss_before=rss_before,
                peak_after_load=peak_after_load, forward_s=forward_s, forward_first_s=forward_first_s,
                generate_first_s=generate_first_s, t16=t16, t1=t1, peak_rss=peak_rss_bytes(),
                unstacked_decode=bool(family._unstack(ckpt.params, None)),
                upcasts_half_floats=refjax.layers.cpu_upcasts_half_floats() and any(  # bf16 weights computed in fp32
                    leaf.dtype in refjax.layers.HALF_FLOATS for leaf in jax.tree_util.tree_leaves(ckpt.params)),
                versions=f"jax {jax.__version__}, python {platform.python_version()}")


def child_hf(ckpt_dir: str, ids_file: str, repeats: int, out_file: str, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    ids = torch.from_numpy(np.load(ids_file).astype(np.int64))
    torch.zeros(1)
    rss_before = rss_bytes()
    start = time.perf_counter()
    with open(os.path.join(ckpt_dir, "config.json"), encoding="utf-8") as f:
        dtype = getattr(torch, json.load(f)["torch_dtype"])
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    load_s = time.perf_counter() - start
    peak_after_load = peak_rss_bytes()
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(ids).logits
        forward_first_s = time.perf_counter() - start
        forward_s = best_of(lambda: model(ids), repeats)
        top1 = logits[0].float().argmax(-1).numpy()
        last_logits = logits[0, -1].float().numpy()

        def decode(n):
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, eos_token_id=None, pad_token_id=0).numpy()

        start = time.perf_counter()
        tokens = decode(NEW)
        generate_first_s = time.perf_counter() - start
        t16 = best_of(lambda: decode(NEW), repeats)
        t1 = best_of(lambda: decode(1), repeats)
    np.savez(out_file, top1=top1, last_logits=last_logits, tokens=tokens[0, PROMPT:])
    return dict(load_s=load_s, rss_before=rss_before,
                peak_after_load=peak_after_load, forward_s=forward_s, forward_first_s=forward_first_s,
                generate_first_s=generate_first_s, t16=t16, t1=t1, peak_rss=peak_rss_bytes(),
                versions=f"torch {torch.__version__}, transformers {transformers.__version__}, "
                         f"python {platform.python_version()}")


def run_child(python: str, kind: str, ckpt_dir: str, ids_file: str, repeats: int, out_file: str,
              threads: int) -> dict:
    """One measured process; its JSON result (the last stdout line) or the error it printed."""
    command = [python, os.path.abspath(__file__), "--child", kind, "--ckpt", ckpt_dir, "--ids", ids_file,
               "--repeats", str(repeats), "--child-out", out_file, "--threads", str(threads)]
    log(f"{kind} process: {python}")
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:] if done.returncode else "")
    if done.returncode:
        return {"error": f"exit {done.returncode}: " + (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def read_bandwidth() -> float:
    big = np.ones(1 << 28, np.float32)  # 1 GiB
    return big.nbytes / best_of(lambda: big.sum(), 5) / 1e9


def model_rows(title: str, weight_bytes: int, gbps: float, rows: list[tuple[str, dict]], hf: dict,
               agreement: dict) -> list[str]:
    gb = weight_bytes / 1e9
    roofline_ms = weight_bytes / (gbps * 1e9) * 1e3
    lines = [f"## {title}: {gb:.2f} GB of weights",
             "",
             "| implementation | load s | peak RSS GB (x weights) | load growth (x weights) | forward 1x128 tok/s "
             "| vs HF | decode ms/token | vs HF | of roofline | first forward s | first generate s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * 10)
            continue
        tok_s = PROMPT / r["forward_s"]
        ms = (r["t16"] - r["t1"]) / (NEW - 1) * 1e3
        hf_tok_s = PROMPT / hf["forward_s"] if "forward_s" in hf else float("nan")
        hf_ms = (hf["t16"] - hf["t1"]) / (NEW - 1) * 1e3 if "t16" in hf else float("nan")
        growth = (r["peak_after_load"] - r["rss_before"]) / weight_bytes
        lines.append(
            f"| {name} | {r['load_s']:.1f} | {r['peak_rss'] / 1e9:.2f} ({r['peak_rss'] / weight_bytes:.2f}x) "
            f"| {growth:.2f}x | {tok_s:.1f} | {tok_s / hf_tok_s:.2f}x | {ms:.1f} | {hf_ms / ms:.2f}x "
            f"| {roofline_ms / ms:.0%} | {r['forward_first_s']:.1f} | {r['generate_first_s']:.1f} |")
    lines += ["", f"Memory roofline: {roofline_ms:.1f} ms/token (weights / {gbps:.1f} GB/s). "
              f"Peak RSS is the process's whole peak (runtime, weights, activations, decoding); "
              f"load growth is the peak during loading less the RSS before it."]
    for name, a in agreement.items():
        lines.append(f"- {name} vs HF: forward top-1 agrees at {a['top1']}/{PROMPT} positions; "
                     f"greedy tokens equal for the first {a['tokens']}/{NEW}; last-position logits "
                     f"max |diff| {a['logit_diff']:.3g} (HF's max |logit| {a['logit_max']:.3g})")
    for name, r in rows:
        if "versions" in r:
            lines.append(f"- {name}: {r['versions']}" + (
                "; decodes on per-layer weights" if r.get("unstacked_decode") else
                "" if "unstacked_decode" not in r else "; decodes on the stacked weights (params above 4 GiB)")
                + ("; XLA:CPU here computes bf16 in fp32, and the layer scan reads a uint16 view of the stacked "
                   "weights (one copy of them, ref/layers.py) so that no fp32 copy is made: hence the higher peak"
                   if r.get("upcasts_half_floats") else ""))
    return lines + [""]


def agreement(ours_file: str, hf_file: str) -> dict:
    ours, theirs = np.load(ours_file), np.load(hf_file)
    same = ours["tokens"] == theirs["tokens"]
    first_diff = int(np.argmin(same)) if not same.all() else len(same)
    return dict(top1=int((ours["top1"] == theirs["top1"]).sum()), tokens=first_diff,
                logit_diff=float(np.abs(ours["last_logits"] - theirs["last_logits"]).max()),
                logit_max=float(np.abs(theirs["last_logits"]).max()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=["afm", "gpt2"])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--refjax-python", nargs="*", default=[],
                        help="more interpreters to run the refjax process under (refjax installed there)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--child", choices=("refjax", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        fn = child_refjax if args.child == "refjax" else (
            lambda *a: child_hf(*a, threads=args.threads))
        print(json.dumps(fn(args.ckpt, args.ids, args.repeats, args.child_out)))
        return 0

    started = time.time()
    gbps = read_bandwidth()
    log(f"memory read bandwidth {gbps:.1f} GB/s")
    workdir = tempfile.mkdtemp(prefix="refjax-fullsize-", dir=args.workdir)
    sections, failed = [], False
    try:
        for model in args.models:
            title, config_name = CONFIGS[model]
            ckpt_dir = os.path.join(workdir, model)
            start = time.perf_counter()
            weight_bytes = write_random_checkpoint(os.path.join(DATA, config_name), ckpt_dir, args.dtype)
            log(f"{title}: {weight_bytes / 1e9:.2f} GB written in {time.perf_counter() - start:.0f} s")
            ids_file = os.path.join(workdir, f"{model}-ids.npy")
            with open(os.path.join(ckpt_dir, "config.json"), encoding="utf-8") as f:
                vocab = json.load(f)["vocab_size"]
            np.save(ids_file, np.random.default_rng(1).integers(0, vocab, (1, PROMPT), dtype=np.int32))
            hf_out = os.path.join(workdir, f"{model}-hf.npz")
            hf = run_child(sys.executable, "hf", ckpt_dir, ids_file, args.repeats, hf_out, args.threads)
            rows, agree = [], {}
            for python in [sys.executable] + args.refjax_python:
                ours_out = os.path.join(workdir, f"{model}-refjax-{len(rows)}.npz")
                r = run_child(python, "refjax", ckpt_dir, ids_file, args.repeats, ours_out, args.threads)
                name = "refjax" + (f" ({r['versions'].split(',')[0]})" if "versions" in r else f" ({python})")
                rows.append((name, r))
                if "error" not in r and "error" not in hf:
                    agree[name] = agreement(ours_out, hf_out)
            rows.append((f"HF {args.dtype} sdpa", hf))
            failed |= any("error" in r for _, r in rows)
            sections += model_rows(f"{title}, {args.dtype}", weight_bytes, gbps, rows, hf, agree)
            shutil.rmtree(ckpt_dir, ignore_errors=True) if not args.keep else None
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    lines = [SECTION, "",
             f"Measured by `tools/bench_fullsize.py` on {datetime.date.today().isoformat()}: the real config.json "
             f"with random {args.dtype} weights written as sharded safetensors; refjax and HF each in a fresh "
             f"process on the same files and prompt (1 x {PROMPT} ids); best of {args.repeats} after a warm-up; "
             f"decode = {NEW} greedy tokens, prefill excluded. Wall time of the run: {time.time() - started:.0f} s.",
             "",
             f"- CPU: {bench.cpu_name()}, {os.cpu_count()} logical cores ({bench.cpu_flags()}); "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory; "
             f"threads {args.threads}",
             f"- Measured memory read bandwidth: {gbps:.1f} GB/s (numpy sum of 1 GiB)", ""] + sections
    bench.replace_section(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
