"""Benchmarks: refjax and HF PyTorch side by side, in ONE process, same weights, same threads.

    python tools/bench.py [--out BENCHMARKS.md] [--threads N] [--repeats R] [--quick] [--device cpu|cuda]

Needs the `reference` extra (torch + transformers). Measures, on this machine:
- its own limits: fp32 matmul GFLOP/s and memory read bandwidth (best of numpy, torch,
  JAX), so every figure is also shown as a fraction of the limit;
- GPT-2 124M (the real gpt2 config, random weights): forward fp32 batch 8 x 128, and
  greedy decoding batch 1 (prompt 16, 64 new tokens; fp32 also after a 496-token prompt)
  against the memory roofline
  (weight bytes / read bandwidth per token);
- a small Arcee config likewise;
- compile time of the GPT-2 forward at 4, 12 and 48 layers (scan keeps it flat);
- the cost of input validation on the eager path.
Writes its Markdown section of --out ("# Benchmarks" on the CPU, "# Benchmarks (GPU)"
with --device cuda; atomically, the file's other sections kept) and prints it. Timings are the best of R runs
after a warm-up run (which includes JAX compilation); nothing here is asserted in tests.

`--device cuda` runs both sides on the GPU (torch models and inputs on "cuda", JAX's default
backend must be the GPU), fp32 throughout: TF32 off in torch, JAX matmul precision "highest".
Every timed call is synchronized (torch.cuda.synchronize, block_until_ready). The limits are
then the GPU's fp32 matmul rate (8192^3) and device memory bandwidth (a 2 GiB device-to-device
copy, bytes read + written); GPT-2 also gets a batch 32 x 512 forward. The report is rewritten
after every stage, so a run cut short still leaves what it measured; a failed stage is listed
in the report and the exit status is 1.
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
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def no_sync() -> None:
    pass


class FakeCuda:
    """Stands in for `torch.cuda` under --simulate-cuda (the cuda code path run on the CPU, a
    self-check of this script): same attribute names, CPU answers, synchronize calls counted."""

    def __init__(self):
        self.synchronize_calls = 0

    def synchronize(self) -> None:
        self.synchronize_calls += 1

    def is_available(self) -> bool:
        return True

    def get_device_name(self, index: int = 0) -> str:
        return "simulated on CPU"

    def get_device_properties(self, index: int = 0):
        return type("Props", (), {"total_memory": 0, "major": 0, "minor": 0, "multi_processor_count": 0})()

    def empty_cache(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Device:
    """Where the benchmark runs: `kind` picks the code path ("cpu" or "cuda"), `torch` is the
    device torch models and inputs go to, `cuda` is `torch.cuda` (or a FakeCuda when simulated)."""

    kind: str = "cpu"
    torch: str = "cpu"
    cuda: object = None
    simulate: bool = False

    @property
    def gpu(self) -> bool:
        return self.kind == "cuda"

    def sync(self) -> None:
        """Wait for queued torch GPU work (before reading the clock); nothing on the CPU."""
        if self.gpu:
            self.cuda.synchronize()

    def tensor(self, array: np.ndarray):
        """A host array as a torch tensor on this device."""
        import torch

        return torch.from_numpy(array).to(self.torch)


CPU = Device()


def best_time(fn, repeats: int, sync=no_sync) -> float:
    fn()  # warm-up (and JAX compile)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def best_times_interleaved(fns: dict, repeats: int, sync=no_sync) -> dict:
    """Best time of each function, measured in rounds that run every function once, so a
    change in machine load during the run hits every implementation alike. `sync` runs after
    every call, before the clock is read (torch.cuda.synchronize on a GPU; JAX calls block
    themselves with block_until_ready or a host copy)."""
    import torch

    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up (and JAX compile)
            sync()
        best = {name: float("inf") for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                sync()
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
    tb, jb = ta.to(torch.bfloat16), ja.astype(jnp.bfloat16)
    bf16 = {
        "torch": flops / best_time(lambda: tb @ tb, repeats) / 1e9,
        "jax": flops / best_time(lambda: jmm(jb).block_until_ready(), repeats) / 1e9,
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
            "bf16_matmul_gflops": max(bf16.values()), "bf16_matmul_by": bf16,
            "read_gbps": max(bandwidth.values()), "read_by": bandwidth}


def gpu_limits(repeats: int, dev: Device, n: int = 8192, copy_bytes: int = 2 * 2**30) -> dict:
    """fp32 matmul rate (n^3, TF32 off in torch, precision HIGHEST in JAX) and device memory
    bandwidth (a device-to-device copy of `copy_bytes`, counting bytes read + written)."""
    gflops = gpu_matmul_gflops(repeats, dev, n)
    bandwidth = gpu_copy_gbps(repeats, dev, copy_bytes)
    dev.sync()
    dev.cuda.empty_cache()  # give the buffers back for the models
    return {"matmul_gflops": max(gflops.values()), "matmul_by": gflops,
            "read_gbps": max(bandwidth.values()), "read_by": bandwidth, "matmul_n": n, "copy_bytes": copy_bytes}


def gpu_matmul_gflops(repeats: int, dev: Device, n: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    flops = 2 * n ** 3
    gen = torch.Generator(device=dev.torch).manual_seed(0)
    ta = torch.randn((n, n), generator=gen, device=dev.torch, dtype=torch.float32)
    tc = torch.empty_like(ta)
    ja = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    jmm = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    return {"torch": flops / best_time(lambda: torch.mm(ta, ta, out=tc), repeats, dev.sync) / 1e9,
            "jax": flops / best_time(lambda: jmm(ja).block_until_ready(), repeats) / 1e9}


def gpu_copy_gbps(repeats: int, dev: Device, copy_bytes: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    count = copy_bytes // 4
    src = torch.ones(count, device=dev.torch, dtype=torch.float32)
    dst = torch.empty_like(src)
    jsrc = jnp.ones(count, jnp.float32)
    jscale = jax.jit(lambda x: x * 2.0)  # reads and writes every byte once, like a copy
    moved = 2 * count * 4
    return {"torch copy": moved / best_time(lambda: dst.copy_(src), repeats, dev.sync) / 1e9,
            "jax x * 2": moved / best_time(lambda: jscale(jsrc).block_until_ready(), repeats) / 1e9}


# --------------------------------------------------------------------------------------
# models with the same weights in HF and refjax
# --------------------------------------------------------------------------------------


def hf_and_refjax(family: str, raw_config: dict, attn: str):
    """An HF model (random init, seeded) and refjax params holding the same tensors."""
    import jax.numpy as jnp
    import torch
    import transformers

    from refjax.params import checkpoint, io

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


def bench_family(name: str, family: str, raw: dict, shapes: list[tuple[int, int]], prompt: int, new: int,
                 repeats: int, limits: dict, dev: Device = CPU, rows: list | None = None,
                 long_prompt: int | None = None) -> list[dict]:
    """Forward rows for each (batch, seq) in `shapes`, then greedy decode rows (the prompt is
    the start of the first shape's ids), and with `long_prompt` fp32 decode rows after a
    prompt of that many tokens (where attention over the cache is a real part of a step).
    Rows are appended to `rows` as they are measured."""
    import jax
    import jax.numpy as jnp

    from refjax.tooling.families import FAMILIES

    rows = [] if rows is None else rows
    ops = FAMILIES[family]
    hf_models = {}
    for attn in ("eager", "sdpa"):
        hf_models[attn], config, params = hf_and_refjax(family, raw, attn)
        hf_models[attn] = hf_models[attn].to(dev.torch)
    config = dataclasses.replace(config, eos_token_id=None)  # decode exactly `new` tokens
    wbytes = weight_bytes(params)  # fp32
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    width = getattr(config, "n_embd", None) or config.hidden_size
    # parameters used as matmul weights: all but the lookup tables, plus a tied LM head
    matmul_params = wbytes // 4 - config.vocab_size * width
    if family == "gpt2":
        matmul_params -= config.n_positions * width
    if config.tie_word_embeddings:
        matmul_params += config.vocab_size * width

    forward = jax.jit(ops.forward, static_argnames=("config", "fast"))
    for dtype in ("fp32", "bf16") if not dev.gpu else ("fp32",):
        if dtype == "bf16":  # weights and compute in bf16 on both sides (HF: model.to(bfloat16)); sdpa only
            import torch

            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
            hf_models = {"sdpa": hf_models["sdpa"].to(torch.bfloat16)}
        peak = limits["bf16_matmul_gflops" if dtype == "bf16" else "matmul_gflops"]
        unstacked = ops.unstack_layers(params)  # layers as a tuple: no per-step weight copies (ref/layers.py)
        for batch, seq in shapes:
            ids = np.random.default_rng(1).integers(0, config.vocab_size, (batch, seq))
            if (batch, seq) == shapes[0]:
                prompt_ids = ids[:1, :prompt]
            tids = dev.tensor(ids)
            jids = jnp.asarray(ids, jnp.int32)
            flops = forward_flops(matmul_params, batch * seq, layers, width, seq)
            fns = {
                "refjax (default)": lambda: forward(params, config, jids).logits.block_until_ready(),
                "refjax (fast)": lambda: forward(params, config, jids, fast=True).logits.block_until_ready(),
                "refjax (fast, unstacked)": lambda: forward(unstacked, config, jids,
                                                            fast=True).logits.block_until_ready(),
            }
            fns.update({f"HF {attn}": (lambda m=m: m(tids).logits) for attn, m in hf_models.items()})
            times = best_times_interleaved(fns, repeats, dev.sync)
            for label, t in times.items():
                rows.append({"model": name, "task": f"forward {dtype} {batch}x{seq}", "impl": label, "seconds": t,
                             "throughput": batch * seq / t, "unit": "tok/s", "of_limit": flops / t / 1e9 / peak})
            if dev.gpu:
                dev.cuda.empty_cache()  # the big batch's activations, before the next stage

        # seconds per token if weights are read once per token
        roofline = weight_bytes(params) / (limits["read_gbps"] * 1e9)
        decodes = [(prompt_ids, prompt)]
        if long_prompt and dtype == "fp32":
            decodes.append((np.random.default_rng(3).integers(0, config.vocab_size, (1, long_prompt)), long_prompt))
        for decode_ids, length in decodes:
            tprompt = dev.tensor(decode_ids)
            fns = {  # `generate` decodes on per-layer weights by default (ref/tooling/families.py)
                "refjax (default)": lambda: np.asarray(ops.generate(params, config, decode_ids, max_new_tokens=new)),
                "refjax (stacked)": lambda: np.asarray(ops.generate(params, config, decode_ids, max_new_tokens=new,
                                                                    unstack=False)),
                "refjax (fast)": lambda: np.asarray(ops.generate(params, config, decode_ids, max_new_tokens=new,
                                                                 fast=True)),
            }
            fns.update({f"HF {attn}": (lambda m=m: m.generate(tprompt, max_new_tokens=new, min_new_tokens=new,
                                                              do_sample=False, pad_token_id=0))
                        for attn, m in hf_models.items()})
            times = best_times_interleaved(fns, repeats, dev.sync)
            for label, t in times.items():
                per_token = t / new
                rows.append({"model": name, "task": f"greedy decode {dtype} b1 p{length}+{new}", "impl": label,
                             "seconds": t, "throughput": new / t, "unit": "tok/s", "ms_per_token": per_token * 1e3,
                             "of_limit": roofline / per_token})
    return rows


def compile_times(raw: dict, layer_counts=(4, 12, 48)) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from refjax.params import gpt2 as gpt2_params
    from refjax.params.gpt2 import parse_gpt2_config
    from refjax import gpt2

    rows = []
    for layers in layer_counts:
        config = parse_gpt2_config({**raw, "n_layer": layers})
        skeleton = gpt2_params.skeleton(config)
        ids = jax.ShapeDtypeStruct((8, 128), jnp.int32)
        start = time.perf_counter()
        jax.jit(gpt2.forward, static_argnames=("config",)).lower(skeleton, config, ids).compile()
        rows.append({"layers": layers, "seconds": time.perf_counter() - start})
    return rows


def golden_compile_times(golden_dir: str = os.path.join(ROOT, "golden"), limit: int | None = None) -> list[dict]:
    """Lower + compile seconds of `jit(forward)` for every golden case and forward variant, in
    float32 on the inputs and outputs `refjax verify` checks (hidden states, attentions; verify
    itself jits only I-BERT and runs the others eagerly): one row per case, slowest first. JAX's persistent cache is off
    for this stage, so every compile is a real one."""
    import jax
    import jax.numpy as jnp

    from refjax.params.checkpoint import load_checkpoint
    from refjax.params.io import read_safetensors
    from refjax.tooling import families, verify

    rows = []
    cache_was, x64_was = jax.config.jax_enable_compilation_cache, jax.config.jax_enable_x64
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_enable_x64", True)  # as `refjax verify`: I-BERT's quant mode requantizes in float64
    try:
        for case in verify.golden_cases(golden_dir)[:limit]:
            golden, metadata = read_safetensors(os.path.join(golden_dir, case, "golden.safetensors"))
            if not any(k.startswith("float32/") for k in golden):
                continue  # a tokenizer-only or generation-only case: no forward recorded
            ckpt = load_checkpoint(os.path.join(golden_dir, case), dtype=jnp.float32)
            family = families.FAMILIES[ckpt.family]
            inputs = verify.case_inputs(golden, "float32")
            for options in json.loads(metadata.get("forward_variants", "[{}]")):
                forward = jax.jit(family.forward, static_argnames=(
                    "config", "output_hidden_states", "output_attentions", *options))
                start = time.perf_counter()
                forward.lower(ckpt.params, ckpt.config, **inputs, **options, output_hidden_states=True,
                              output_attentions=True).compile()
                tag = "".join(f" [{k}={v}]" for k, v in options.items())
                rows.append({"case": case + tag, "family": ckpt.family, "seconds": time.perf_counter() - start})
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
        jax.config.update("jax_enable_x64", x64_was)
    return sorted(rows, key=lambda r: -r["seconds"])


def validation_cost(raw: dict, repeats: int) -> dict:
    import jax.numpy as jnp

    from refjax.params.gpt2 import parse_gpt2_config
    from refjax.validate import check_token_inputs

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


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions that decide matmul speed (from /proc/cpuinfo)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni")]
                return " ".join(sorted(keep)) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_info(dev: Device) -> dict:
    """What the report says about the GPU: torch's name and properties, JAX's device kind,
    the driver (nvidia-smi, when present) and torch's CUDA version."""
    import subprocess

    import jax
    import torch

    props = dev.cuda.get_device_properties(0)
    jdev = jax.devices()[0]
    driver = "unknown"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            driver = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        precision = jax.config.jax_default_matmul_precision
    except Exception:  # noqa: BLE001 - only for the report line: say what was set instead
        precision = "highest (as set; not read back)"
    return {"name": dev.cuda.get_device_name(0), "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "jax_device": f"{jdev.platform}: {jdev.device_kind}", "driver": driver,
            "cuda": torch.version.cuda or "n/a",
            "tf32": f"torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                    f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                    f"jax_default_matmul_precision={precision}"}


def machine_lines(limits, threads, versions, dev: Device, info: dict | None, repeats: int | None) -> list[str]:
    if not dev.gpu:
        return [f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; torch threads {threads}; no GPU used",
                f"- CPU flags (matmul-relevant): {cpu_flags()}",
                "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
                f"- Measured fp32 matmul peak: {limits['matmul_gflops']:.1f} GFLOP/s (2048^3; "
                + ", ".join(f"{k} {v:.1f}" for k, v in limits["matmul_by"].items()) + ")",
                f"- Measured bf16 matmul peak: {limits['bf16_matmul_gflops']:.1f} GFLOP/s (2048^3; "
                + ", ".join(f"{k} {v:.1f}" for k, v in limits["bf16_matmul_by"].items()) + ")",
                f"- Measured memory read bandwidth: {limits['read_gbps']:.1f} GB/s (sum of 256 MiB; "
                + ", ".join(f"{k} {v:.1f}" for k, v in limits["read_by"].items()) + ")"]
    n, copy_mib = limits["matmul_n"], limits["copy_bytes"] / 2**20
    return [f"- GPU: {info['name']} ({info['memory_gib']:.1f} GiB, compute capability {info['capability']}, "
            f"{info['sms']} SMs); JAX device {info['jax_device']}; driver {info['driver']}, CUDA (torch) "
            f"{info['cuda']}",
            f"- Host: {cpu_name()}, {os.cpu_count()} logical cores; torch threads {threads}",
            "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            f"- fp32 settings: {info['tf32']}; timings are the best of {repeats} runs after a warm-up",
            f"- Measured fp32 matmul peak: {limits['matmul_gflops'] / 1e3:.1f} TFLOP/s ({n}^3, TF32 off; "
            + ", ".join(f"{k} {v / 1e3:.1f}" for k, v in limits["matmul_by"].items()) + ")",
            f"- Measured device memory bandwidth: {limits['read_gbps']:.0f} GB/s ({copy_mib:.0f} MiB "
            "device-to-device, bytes read + written; "
            + ", ".join(f"{k} {v:.0f}" for k, v in limits["read_by"].items()) + ")"]


def report(limits, rows, compiles, validation, threads, versions, dev: Device = CPU, info: dict | None = None,
           repeats: int | None = None, failures=(), wall: float | None = None,
           golden_compiles: list[dict] | None = None) -> str:
    """The Markdown report. With `dev` on a GPU, `compiles` or `validation` may be None (a
    stage not yet run, or failed), `failures` lists failed stages and `wall` is the run time."""
    if dev.gpu:
        head = ["# Benchmarks (GPU)", "",
                f"Measured by `tools/bench.py --device cuda` on {datetime.date.today().isoformat()}, one process, "
                "same random weights in refjax and HF PyTorch on the same GPU, fp32 throughout, best of several "
                "runs after a warm-up (JAX compile excluded); every timed call is synchronized "
                "(`torch.cuda.synchronize`, `block_until_ready` or a copy to the host)."]
    else:
        head = ["# Benchmarks", "",
                f"Measured by `tools/bench.py` on {datetime.date.today().isoformat()}, one process, same random "
                "weights in refjax and HF PyTorch, best of several runs after a warm-up (JAX compile excluded)."]
    lines = head + ["", "## Machine", ""] + machine_lines(limits, threads, versions, dev, info, repeats)
    if wall is not None:
        lines.append(f"- Wall time of this run so far: {wall:.0f} s")
    lines.append("")
    if failures:
        lines += ["## Failed stages", ""] + [f"- {stage}: {error}" for stage, error in failures] + [""]
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
    if compiles is not None:
        lines += ["## Compile time of the GPT-2 forward (124M widths, 8 x 128) by depth", "",
                  "| layers | compile seconds |", "|---:|---:|"]
        lines += [f"| {r['layers']} | {r['seconds']:.2f} |" for r in compiles]
        if dev.gpu:
            lines += ["", "Layers are stacked and run with `lax.scan`, so compile time does not grow with depth.",
                      "\"unstacked\" rows use `unstack_layers` (a tuple of per-layer weights, a Python loop): on "
                      "XLA's CPU backend this avoids copying each scanned layer's weights out of the stack once "
                      "per token when decoding; the rows above show what it does on this GPU.", ""]
        else:
            lines += ["", "Layers are stacked and run with `lax.scan`, so compile time does not grow with depth.",
                      "XLA's CPU backend copies each scanned layer's weights out of the stack before its matmuls, "
                      "once per token when decoding. So `generate` by default slices the layers into per-layer "
                      "buffers once per call (for params up to 4 GiB; `unstack=False` keeps the stack: the "
                      "\"stacked\" rows), and \"unstacked\" forward rows use `unstack_layers` (a tuple of "
                      "per-layer weights, a Python loop; compile time then grows with depth). \"default\" rows "
                      "are what a user gets without options; \"fast\" adds `fast=True` "
                      "(`jax.nn.dot_product_attention`, no attention probabilities).", ""]
    if golden_compiles:
        lines += ["## Compile time of every golden forward (float32, jit, all outputs)", "",
                  "| family | forwards | median s | slowest s | slowest case |", "|---|---:|---:|---:|---|"]
        for family in sorted({r["family"] for r in golden_compiles}):
            group = [r for r in golden_compiles if r["family"] == family]  # slowest first
            lines.append(f"| {family} | {len(group)} | {float(np.median([r['seconds'] for r in group])):.2f} | "
                         f"{group[0]['seconds']:.2f} | {group[0]['case']} |")
        over = [r for r in golden_compiles if r["seconds"] > 3.0]
        lines += ["", f"{len(golden_compiles)} forwards (each golden case and forward variant, lowered and compiled "
                  "with JAX's persistent cache off); "
                  + ("over 3 s: " + ", ".join(f"{r['case']} {r['seconds']:.1f} s" for r in over) + "." if over
                     else "none takes over 3 s."), ""]
    if validation is not None:
        lines += ["## Input validation", "",
                  f"Checking an 8 x 128 batch (shapes, id ranges) costs {validation['seconds'] * 1e6:.0f} us per "
                  "eager call; under `jit` the ids are tracers and the value checks are skipped, so a jitted "
                  "forward or `generate` pays nothing.", ""]
    return "\n".join(lines)


def replace_section(path: str, text: str) -> None:
    """Write `text` (a Markdown section starting with its "# Title" line) into the file at
    `path` in place of the section of that title (up to the next top-level "# " heading),
    or append it; the file's other sections stay as they are. Atomic: a failed write leaves
    the old file."""
    from refjax.params.io import atomic_write

    title = text.split("\n", 1)[0]
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if old.startswith(title + "\n"):
        at = 0
    else:
        at = old.find("\n" + title + "\n")
        at = at + 1 if at >= 0 else -1  # the title line's start; -1: not there
    body = text.rstrip("\n") + "\n"
    if at >= 0:
        end = old.find("\n# ", at)
        rest = old[end + 1:] if end >= 0 else ""
        new = old[:at] + body + ("\n" + rest if rest else "")
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + body
    with atomic_write(path, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test of this script")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: torch and JAX on the GPU, fp32 with TF32 off (default: cpu)")
    # the cuda code path with torch on the CPU and a stand-in for torch.cuda: a self-check of this script
    parser.add_argument("--simulate-cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        import torch
        import transformers
    except ImportError:
        print("tools/bench.py needs the `reference` extra: pip install '.[reference]'", file=sys.stderr)
        return 2
    dev = CPU
    if args.simulate_cuda:
        dev = Device("cuda", "cpu", FakeCuda(), simulate=True)
        missing = [n for n in dir(FakeCuda) if not n.startswith("_") and not hasattr(torch.cuda, n)]
        assert not missing, f"FakeCuda names not in torch.cuda: {missing}"
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            print(f"tools/bench.py: --device cuda needs a CUDA GPU, but torch {torch.__version__} sees none "
                  f"(torch.cuda.is_available() is False, torch.version.cuda={torch.version.cuda})", file=sys.stderr)
            return 2
        dev = Device("cuda", "cuda", torch.cuda)
    if dev.gpu:
        # JAX would otherwise take 75% of the GPU memory up front and leave torch the rest
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads)
    versions = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    info = None
    if dev.gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls, as JAX's "highest" precision
        torch.backends.cudnn.allow_tf32 = False
        try:
            jdev = jax.devices()[0]
        except RuntimeError as e:
            print(f"tools/bench.py: JAX could not start a backend: {e}".splitlines()[0], file=sys.stderr)
            return 2
        if jdev.platform not in ("gpu", "cuda") and not dev.simulate:
            print(f"tools/bench.py: --device cuda needs JAX on the GPU, but its default backend is "
                  f"{jdev.platform!r} ({jdev.device_kind}): install jax[cuda] (the jax-cuda plugin)", file=sys.stderr)
            return 2
        import jaxlib

        versions = {"jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?"), "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version()}
        info = gpu_info(dev)
    t0 = time.perf_counter()
    failures: list[tuple[str, str]] = []
    rows: list[dict] = []
    state = {"compiles": None, "validation": None, "golden_compiles": None}

    def write_report() -> str:  # this run's section of --out; the file's other sections are kept
        text = report(limits, rows, state["compiles"], state["validation"], args.threads, versions, dev, info,
                      args.repeats, failures, time.perf_counter() - t0 if dev.gpu else None, state["golden_compiles"])
        replace_section(args.out, text)
        return text

    def stage(message: str, fn, *, partial_report: bool = True):
        """Run one stage; the report is rewritten after each one, so a run cut short keeps what
        it measured. On a GPU a failure is recorded (report and exit status) and the next
        stage still runs; on the CPU errors raise."""
        prefix = f"[{time.perf_counter() - t0:5.0f} s] " if dev.gpu else ""
        print(f"{prefix}{message} ...", file=sys.stderr, flush=True)
        if not dev.gpu:
            result = fn()
            if partial_report:
                write_report()
            return result
        n_rows = len(rows)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - recorded in the report and the exit status
            traceback.print_exc()
            failures.append((message, (f"{type(e).__name__}: {e}".splitlines() or ["?"])[0][:300]))
            return None
        finally:
            for row in rows[n_rows:]:
                print("  " + json.dumps(row), file=sys.stderr, flush=True)
            if partial_report:
                write_report()

    if dev.gpu:
        n, copy_bytes = (1024, 64 * 2**20) if args.quick else (8192, 2 * 2**30)
        limits = {"matmul_gflops": float("nan"), "matmul_by": {}, "read_gbps": float("nan"), "read_by": {},
                  "matmul_n": n, "copy_bytes": copy_bytes}
        measured = stage("measuring machine limits", lambda: gpu_limits(args.repeats, dev, n, copy_bytes),
                         partial_report=False)
        limits = measured or limits
        print(f"  {json.dumps(limits)}", file=sys.stderr, flush=True)
        write_report()
    else:
        print("measuring machine limits ...", file=sys.stderr)
        limits = machine_limits(args.repeats)
    with open(os.path.join(ROOT, "tests", "data", "configs", "gpt2.json")) as f:
        gpt2_raw = json.load(f)
    arcee_raw = {"model_type": "arcee", "architectures": ["ArceeForCausalLM"], "vocab_size": 32000,
                 "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 16,
                 "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 4096, "hidden_act": "relu2",
                 "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    batch, seq, prompt, new = (2, 32, 8, 8) if args.quick else (8, 128, 16, 64)
    long_prompt = 24 if args.quick else 496  # + 64 new tokens: within GPT-2's 1024 positions
    big = (4, 64) if args.quick else (32, 512)  # GPT-2 forward on a GPU: 8 x 128 is tiny for one
    if args.quick:
        gpt2_raw = {**gpt2_raw, "n_layer": 2}
        arcee_raw = {**arcee_raw, "num_hidden_layers": 2}
    for name, family, raw in [("GPT-2 124M", "gpt2", gpt2_raw), ("Arcee small (8 x 1024, GQA 16/4)", "arcee",
                                                                    arcee_raw)]:
        shapes = [(batch, seq), big] if dev.gpu and family == "gpt2" else [(batch, seq)]
        stage(f"benchmarking {name}", lambda: bench_family(name, family, raw, shapes, prompt, new, args.repeats,
                                                           limits, dev, rows, long_prompt))
    state["compiles"] = stage("compile times", lambda: compile_times(gpt2_raw, (2, 4) if args.quick else (4, 12, 48)))
    state["golden_compiles"] = stage("compile time of every golden forward", lambda: golden_compile_times(
        limit=3 if args.quick else None))
    validate = (lambda: validation_cost(gpt2_raw, args.repeats))
    state["validation"] = stage("validation cost", validate) if dev.gpu else validate()
    if dev.simulate:
        print(f"simulated cuda path: torch.cuda.synchronize called {dev.cuda.synchronize_calls} times",
              file=sys.stderr)
        assert dev.cuda.synchronize_calls > 0
    text = write_report()
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
