"""Fine-tune a refjax model on a text file: a training loop to copy.

    pip install ".[train]"          # optax
    python tools/finetune.py        # golden GPT-2 + tools/data/finetune.txt, 20 steps

What it shows, each in a few lines you can lift:
- HF's training mode: `forward(..., labels=ids, train=True, key=k)` gives HF's causal-LM
  loss with dropout at HF's sites (ref/probe.py);
- AdamW (optax) with linear warmup then cosine decay, global-norm clipping;
- fp32 master weights, compute in bf16 (`--compute-dtype`): the loss differentiates
  through the cast, so gradients arrive in fp32;
- gradient accumulation over `--accum` micro-batches (a `lax.scan`, one compiled step);
- remat (`--remat`: each layer recomputed in the backward pass);
- data + tensor parallelism on a `jax.sharding.Mesh` (`--mesh DATAxMODEL`, e.g. 4x2;
  refjax.params.sharding places the weights Megatron-style, the batch along `data`,
  and XLA inserts the collectives);
- a checkpoint written with `save_checkpoint` in HF's layout (`--out DIR`), which HF
  `from_pretrained` loads and which reproduces refjax's logits.

Progress: one line every `--log-every` steps; the last line is `loss FIRST -> LAST`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "data", "finetune.txt")


def default_checkpoint() -> str:
    from refjax.tooling.cli import _default_golden_dir

    return os.path.join(_default_golden_dir(), "gpt2", "lm")


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="HF checkpoint directory (default: the golden GPT-2 LM)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="training text (default: tools/data/finetune.txt)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL devices (e.g. 4x2)")
    p.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--no-dropout", action="store_true", help="train without HF's dropout")
    p.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--out", default=None, help="write the fine-tuned checkpoint here (HF layout)")
    return p.parse_args(argv)


def token_stream(text_path: str, checkpoint_dir: str, vocab_size: int):
    """The text as token ids: the checkpoint's tokenizer, or UTF-8 bytes when it has none."""
    import numpy as np

    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    try:
        from refjax.params.tokenizer import encode, load_tokenizer

        ids = encode(load_tokenizer(checkpoint_dir), text)
    except (FileNotFoundError, ValueError):
        ids = list(text.encode("utf-8"))
    ids = np.asarray(ids, np.int64) % vocab_size
    if ids.size < 2:
        raise SystemExit(f"finetune: {text_path} holds too little text to train on")
    return ids


def batches(ids, batch: int, seq: int, accum: int, rng):
    """[accum, batch, seq] windows at random offsets (wrapping around a short text)."""
    import numpy as np

    n = ids.size
    starts = rng.integers(0, n, (accum, batch))
    return np.stack([ids[(s + np.arange(seq)) % n] for s in starts.reshape(-1)]).reshape(accum, batch, seq)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import refjax
    from refjax.params import sharding

    checkpoint_dir = args.checkpoint or default_checkpoint()
    ckpt = refjax.load_checkpoint(checkpoint_dir, dtype=jnp.float32)  # fp32 master weights
    family = refjax.FAMILIES[ckpt.family]
    config = ckpt.config
    if config.architecture not in family.lm_architectures:
        raise SystemExit(f"finetune: {config.architecture} is not a causal LM (needs one of "
                         f"{', '.join(family.lm_architectures)})")
    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--seq", args.seq), ("--accum", args.accum)):
        if value < 1:
            raise SystemExit(f"finetune: {flag} must be >= 1, got {value}")
    try:
        data, model = (int(x) for x in args.mesh.lower().split("x"))
    except ValueError:
        raise SystemExit(f"finetune: --mesh must be DATAxMODEL (e.g. 4x2), got {args.mesh!r}") from None
    mesh = sharding.make_mesh(data, model)
    if args.batch % data:
        raise SystemExit(f"finetune: --batch {args.batch} must divide by the data axis ({data})")
    compute = jnp.dtype(args.compute_dtype)
    rng = np.random.default_rng(args.seed)
    ids = token_stream(args.text, checkpoint_dir, config.vocab_size)

    warmup = max(args.warmup, 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=args.weight_decay))
    params = sharding.shard_params(ckpt.params, mesh)
    opt_state = optimizer.init(params)

    def loss_fn(params, tokens, key):
        low = jax.tree.map(lambda w: w.astype(compute), params)  # bf16 compute, fp32 master weights
        out = family.forward(low, config, tokens, labels=tokens, train=not args.no_dropout, key=key,
                             remat=args.remat)
        return out.loss.astype(jnp.float32)

    @jax.jit
    def train_step(params, opt_state, micro_batches, key):
        """One optimizer step over `accum` micro-batches [accum, B, T]: mean loss and gradient."""
        keys = jax.random.split(key, micro_batches.shape[0])

        def accumulate(total, xs):
            tokens, k = xs
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens, k)
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(accumulate, zero, (micro_batches, keys))
        n = micro_batches.shape[0]
        loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats with int32 step counts
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(args.seed)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA, None))
    print(f"finetune: {checkpoint_dir} ({config.architecture}), {ids.size} tokens from {args.text}, "
          f"mesh {data}x{model}, compute {compute.name}, {args.steps} steps x {args.accum} x "
          f"{args.batch} x {args.seq} tokens", flush=True)
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        key, step_key = jax.random.split(key)
        micro = jax.device_put(jnp.asarray(batches(ids, args.batch, args.seq, args.accum, rng), jnp.int32),
                               batch_sharding)
        params, opt_state, loss = train_step(params, opt_state, micro, step_key)
        losses.append(float(loss))
        if step % args.log_every == 0 or step in (1, args.steps):
            rate = step * args.accum * args.batch * args.seq / (time.perf_counter() - start)
            with jax.numpy_dtype_promotion("standard"):
                lr = float(schedule(step - 1))
            print(f"step {step}/{args.steps}  loss {losses[-1]:.4f}  lr {lr:.2e}  "
                  f"{rate:.0f} tok/s", flush=True)
    if args.out:
        params_host = jax.tree.map(lambda w: np.asarray(w), params)
        refjax.save_checkpoint(args.out, dataclasses.replace(ckpt, params=params_host))
        print(f"finetune: wrote {args.out} (HF layout: from_pretrained loads it)", flush=True)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
