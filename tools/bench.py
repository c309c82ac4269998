"""Benchmarks: refjax and HF PyTorch side by side, in ONE process, same weights, same threads.

    python tools/bench.py [--out BENCHMARKS.md] [--threads N] [--repeats R] [--quick]

Needs the `reference` extra (torch + transformers). Measures, on this machine:
- its own limits: fp32 matmul GFLOP/s and memory read bandwidth (best of numpy, torch,
  JAX), so every figure is also shown as a fraction of the limit;
- GPT-2 124M (the real gpt2 config, random weights): forward fp32 batch 8 x 128, and
  greedy decoding batch 1 (prompt 16, 64 new tokens) against the memory roofline
  (weight bytes / read bandwidth per token);
- a small Arcee config likewise;
- compile time of the GPT-2 forward at 4, 12 and 48 layers (scan keeps it flat);
- the cost of input validation on the eager path.
Writes a Markdown report (atomically) and prints it. Timings are the best of R runs
after a warm-up run (which includes JAX compilation); nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (and JAX compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_times_interleaved(fns: dict, repeats: int) -> dict:
    """Best time of each function, measured in rounds that run every function once, so a
    change in machine load during the run hits every implementation alike."""
    import torch

    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up (and JAX compile)
        best = {name: float("inf") for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


# --------------------------------------------------------------------------------------
# machine limits
# --------------------------------------------------------------------------------------


def machine_limits(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    a32 = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    flops = 2 * n ** 3
    ta = torch.from_numpy(a32)
    ja = jnp.asarray(a32)
    jmm = jax.jit(lambda x: x @ x)
    gflops = {
        "numpy": flops / best_time(lambda: a32 @ a32, repeats) / 1e9,
        "torch": flops / best_time(lambda: ta @ ta, repeats) / 1e9,
        "jax": flops / best_time(lambda: jmm(ja).block_until_ready(), repeats) / 1e9,
    }
    big = np.ones(256 * 2**20 // 4, np.float32)  # 256 MiB, far beyond the caches
    tbig, jbig = torch.from_numpy(big), jnp.asarray(big)
    jsum = jax.jit(jnp.sum)
    bandwidth = {
        "numpy": big.nbytes / best_time(lambda: big.sum(), repeats) / 1e9,
        "torch": big.nbytes / best_time(lambda: tbig.sum(), repeats) / 1e9,
        "jax": big.nbytes / best_time(lambda: jsum(jbig).block_until_ready(), repeats) / 1e9,
    }
    return {"matmul_gflops": max(gflops.values()), "matmul_by": gflops,
            "read_gbps": max(bandwidth.values()), "read_by": bandwidth}


# --------------------------------------------------------------------------------------
# models with the same weights in HF and refjax
# --------------------------------------------------------------------------------------


def hf_and_refjax(family: str, raw_config: dict, attn: str):
    """An HF model (random init, seeded) and refjax params holding the same tensors."""
    import jax.numpy as jnp
    import torch
    import transformers

    from params import checkpoint, io

    torch.manual_seed(0)
    cls = getattr(transformers, raw_config["architectures"][0])
    config_cls = transformers.GPT2Config if family == "gpt2" else transformers.ArceeConfig
    model = cls._from_config(config_cls(**raw_config), attn_implementation=attn).eval()
    fam = checkpoint.FAMILIES[family]
    config = fam.parse_config(raw_config)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = io.tree_from_tensors(tensors, fam.module.skeleton(config), fam.module.name_rules(config),
                                  fam.module.dropped_keys(config), fam.module.base_prefix(config), dtype=jnp.float32)
    return model, config, params


def weight_bytes(params) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def forward_flops(n_params_matmul: int, tokens: int, layers: int, width: int, seq: int) -> float:
    """2 FLOPs per weight per token for the matmuls + attention scores and mixing."""
    return 2.0 * n_params_matmul * tokens + 4.0 * layers * tokens * seq * width


def bench_family(name: str, family: str, raw: dict, batch: int, seq: int, prompt: int, new: int, repeats: int,
                 limits: dict) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from ref.families import FAMILIES

    rows = []
    ops = FAMILIES[family]
    hf_models = {}
    for attn in ("eager", "sdpa"):
        hf_models[attn], config, params = hf_and_refjax(family, raw, attn)
    config = dataclasses.replace(config, eos_token_id=None)  # decode exactly `new` tokens
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (batch, seq))
    tids = torch.from_numpy(ids)
    jids = jnp.asarray(ids, jnp.int32)
    wbytes = weight_bytes(params)
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    width = getattr(config, "n_embd", None) or config.hidden_size
    # parameters used as matmul weights: all but the lookup tables, plus a tied LM head
    matmul_params = wbytes // 4 - config.vocab_size * width
    if family == "gpt2":
        matmul_params -= config.n_positions * width
    if config.tie_word_embeddings:
        matmul_params += config.vocab_size * width
    flops = forward_flops(matmul_params, batch * seq, layers, width, seq)

    forward = jax.jit(ops.forward, static_argnames=("config", "fast"))
    unstacked = ops.unstack_layers(params)  # layers as a tuple: no per-step weight copies (ref/layers.py)
    times = best_times_interleaved({
        "refjax (readable)": lambda: forward(params, config, jids).logits.block_until_ready(),
        "refjax (fast)": lambda: forward(params, config, jids, fast=True).logits.block_until_ready(),
        "refjax (fast, unstacked)": lambda: forward(unstacked, config, jids, fast=True).logits.block_until_ready(),
        "HF eager": lambda: hf_models["eager"](tids).logits,
        "HF sdpa": lambda: hf_models["sdpa"](tids).logits,
    }, repeats)
    for label, t in times.items():
        rows.append({"model": name, "task": f"forward fp32 {batch}x{seq}", "impl": label, "seconds": t,
                     "throughput": batch * seq / t, "unit": "tok/s",
                     "of_limit": flops / t / 1e9 / limits["matmul_gflops"]})

    prompt_ids = ids[:1, :prompt]
    roofline = wbytes / (limits["read_gbps"] * 1e9)  # seconds per token if weights are read once per token
    times = best_times_interleaved({
        "refjax (readable)": lambda: np.asarray(ops.generate(params, config, prompt_ids, max_new_tokens=new)),
        "refjax (fast)": lambda: np.asarray(ops.generate(params, config, prompt_ids, max_new_tokens=new, fast=True)),
        "refjax (fast, unstacked)": lambda: np.asarray(ops.generate(unstacked, config, prompt_ids, max_new_tokens=new,
                                                                    fast=True)),
        "HF eager": lambda: hf_models["eager"].generate(torch.from_numpy(prompt_ids), max_new_tokens=new,
                                                        min_new_tokens=new, do_sample=False, pad_token_id=0),
        "HF sdpa": lambda: hf_models["sdpa"].generate(torch.from_numpy(prompt_ids), max_new_tokens=new,
                                                      min_new_tokens=new, do_sample=False, pad_token_id=0),
    }, repeats)
    for label, t in times.items():
        per_token = t / new
        rows.append({"model": name, "task": f"greedy decode b1 p{prompt}+{new}", "impl": label, "seconds": t,
                     "throughput": new / t, "unit": "tok/s", "ms_per_token": per_token * 1e3,
                     "of_limit": roofline / per_token})
    return rows


def compile_times(raw: dict, layer_counts=(4, 12, 48)) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from params import gpt2 as gpt2_params
    from params.config import parse_gpt2_config
    from ref import gpt2

    rows = []
    for layers in layer_counts:
        config = parse_gpt2_config({**raw, "n_layer": layers})
        skeleton = gpt2_params.skeleton(config)
        ids = jax.ShapeDtypeStruct((8, 128), jnp.int32)
        start = time.perf_counter()
        jax.jit(gpt2.forward, static_argnames=("config",)).lower(skeleton, config, ids).compile()
        rows.append({"layers": layers, "seconds": time.perf_counter() - start})
    return rows


def validation_cost(raw: dict, repeats: int) -> dict:
    import jax.numpy as jnp

    from params.config import parse_gpt2_config
    from ref.validate import check_token_inputs

    config = parse_gpt2_config(raw)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (8, 128)), jnp.int32)
    mask = jnp.ones_like(ids)
    t = best_time(lambda: check_token_inputs(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, input_ids=ids, attention_mask=mask,
        position_ids=None, inputs_embeds=None, cache=None, max_positions=config.n_positions), repeats * 10)
    return {"seconds": t}


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(limits, rows, compiles, validation, threads, versions) -> str:
    lines = ["# Benchmarks", "",
             f"Measured by `tools/bench.py` on {datetime.date.today().isoformat()}, one process, same random "
             "weights in refjax and HF PyTorch, best of several runs after a warm-up (JAX compile excluded).", "",
             "## Machine", "",
             f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; torch threads {threads}; no GPU used",
             f"- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"- Measured fp32 matmul peak: {limits['matmul_gflops']:.1f} GFLOP/s (2048^3; "
             + ", ".join(f"{k} {v:.1f}" for k, v in limits["matmul_by"].items()) + ")",
             f"- Measured memory read bandwidth: {limits['read_gbps']:.1f} GB/s (sum of 256 MiB; "
             + ", ".join(f"{k} {v:.1f}" for k, v in limits["read_by"].items()) + ")", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        for task in dict.fromkeys(r["task"] for r in rows if r["model"] == model):
            group = [r for r in rows if r["model"] == model and r["task"] == task]
            sdpa = next(r for r in group if r["impl"] == "HF sdpa")
            decode = "decode" in task
            lines += [f"## {model}: {task}", "",
                      "| implementation | " + ("ms/token | " if decode else "") + "tokens/s | vs HF sdpa | "
                      + ("of memory roofline |" if decode else "of matmul peak |"),
                      "|---|" + ("---:|" if decode else "") + "---:|---:|---:|"]
            for r in group:
                lines.append(f"| {r['impl']} | " + (f"{r['ms_per_token']:.1f} | " if decode else "")
                             + f"{r['throughput']:.1f} | {r['throughput'] / sdpa['throughput']:.2f}x | "
                             f"{100 * r['of_limit']:.0f}% |")
            lines.append("")
    lines += ["## Compile time of the GPT-2 forward (124M widths, 8 x 128) by depth", "",
              "| layers | compile seconds |", "|---:|---:|"]
    lines += [f"| {r['layers']} | {r['seconds']:.2f} |" for r in compiles]
    lines += ["", "Layers are stacked and run with `lax.scan`, so compile time does not grow with depth.",
              "\"unstacked\" rows use `unstack_layers` (a tuple of per-layer weights, a Python loop): XLA's CPU "
              "backend copies each scanned layer's weights out of the stack before its matmuls, once per token "
              "when decoding; unstacked layers read their own buffers instead (compile time then grows with "
              "depth).", "",
              "## Input validation", "",
              f"Checking an 8 x 128 batch (shapes, id ranges) costs {validation['seconds'] * 1e6:.0f} us per eager "
              "call; under `jit` the ids are tracers and the value checks are skipped, so a jitted forward or "
              "`generate` pays nothing.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test of this script")
    args = parser.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError:
        print("tools/bench.py needs the `reference` extra: pip install '.[reference]'", file=sys.stderr)
        return 2
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads)
    versions = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    print("measuring machine limits ...", file=sys.stderr)
    limits = machine_limits(args.repeats)
    with open(os.path.join(ROOT, "tests", "data", "configs", "gpt2.json")) as f:
        gpt2_raw = json.load(f)
    arcee_raw = {"model_type": "arcee", "architectures": ["ArceeForCausalLM"], "vocab_size": 32000,
                 "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 16,
                 "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 4096, "hidden_act": "relu2",
                 "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    batch, seq, prompt, new = (2, 32, 8, 8) if args.quick else (8, 128, 16, 64)
    if args.quick:
        gpt2_raw = {**gpt2_raw, "n_layer": 2}
        arcee_raw = {**arcee_raw, "num_hidden_layers": 2}
    rows = []
    for name, family, raw in [("GPT-2 124M", "gpt2", gpt2_raw), ("Arcee small (8 x 1024, GQA 16/4)", "arcee",
                                                                    arcee_raw)]:
        print(f"benchmarking {name} ...", file=sys.stderr)
        rows += bench_family(name, family, raw, batch, seq, prompt, new, args.repeats, limits)
    print("compile times ...", file=sys.stderr)
    compiles = compile_times(gpt2_raw, (2, 4) if args.quick else (4, 12, 48))
    validation = validation_cost(gpt2_raw, args.repeats)
    text = report(limits, rows, compiles, validation, args.threads, versions)
    from params.io import atomic_write

    with atomic_write(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
