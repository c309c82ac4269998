"""The `refjax` command: the imperative shell around the pure core.

    refjax verify   [--golden DIR] [--only SUBSTRING ...]
    refjax forward  CHECKPOINT_DIR (--text TEXT | --inputs IN.safetensors) --out OUT.safetensors
                    [--dtype float32|float64|bfloat16] [--taps] [--integer] [--propagate-scales]
    refjax generate CHECKPOINT_DIR (--prompt TEXT | --inputs IN.safetensors) [--max-new-tokens N]
                    [--do-sample] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                    [--out OUT.safetensors] [--dtype ...]
    refjax diff     REF.safetensors OTHER.safetensors [--rtol R] [--atol A] [--map NAMES.json]
                    [--allow-missing]

Errors in what the user gave (paths, files, configs, inputs) print one line
`refjax: error: ...` and exit 2; `verify` exits 1 when a golden comparison fails, `diff`
when two dumps differ.
Output files are written to a temporary file and renamed, so they are never half-written.
All runs use fp64-capable JAX (`jax_enable_x64`, arrays keep their stated dtypes) and
"highest" matmul precision, recorded in the output metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

DTYPES = ("float32", "float64", "bfloat16")
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "mc_token_ids", "labels",
              "mc_labels", "start_positions", "end_positions")
OUTPUT_FIELDS = ("logits", "loss", "mc_logits", "mc_loss", "start_logits", "end_logits", "last_hidden_state",
                 "pooler_output")
MATMUL_PRECISION = "highest"


class UsageError(ValueError):
    """A problem with the command line itself."""


def _setup_jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISION)
    return jax


def _default_golden_dir() -> str:
    here = os.path.join(os.getcwd(), "golden")
    if os.path.isfile(os.path.join(here, "MANIFEST.json")):
        return here
    beside_package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
    if os.path.isfile(os.path.join(beside_package, "MANIFEST.json")):
        return beside_package
    raise FileNotFoundError("no golden/MANIFEST.json in the current directory; pass --golden DIR")


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------


def cmd_verify(args) -> int:
    _setup_jax()
    from refjax.tooling import verify

    golden_dir = args.golden or _default_golden_dir()
    cases = verify.golden_cases(golden_dir)
    if args.only:
        cases = [c for c in cases if any(pattern in c for pattern in args.only)]
        if not cases:
            raise UsageError(f"--only {' '.join(args.only)} matches no golden case")
    rows = []
    for n, case in enumerate(cases, 1):
        start = time.perf_counter()
        case_rows = list(verify.run_case(golden_dir, case))
        bad = sum(not r.ok for r in case_rows)
        print(f"[{n}/{len(cases)}] {case}: {len(case_rows)} tensors, "
              f"{'ok' if not bad else f'{bad} FAILED'} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
        rows += case_rows
    print(verify.format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} tensors within tolerance over {len(cases)} cases "
          f"(matmul precision {MATMUL_PRECISION})")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------
# forward / generate
# --------------------------------------------------------------------------------------


def _check_out_path(path: str | None) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--out {path!r} is a directory; give a file name")


def _load(checkpoint_dir: str, dtype_name: str):
    import jax.numpy as jnp

    from refjax.params.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint_dir, dtype=jnp.dtype(dtype_name))


def _read_inputs(path: str) -> dict[str, Any]:
    import jax.numpy as jnp

    from refjax.params import io

    if not os.path.isfile(path):
        raise FileNotFoundError(f"inputs file {path!r} does not exist")
    tensors, _ = io.read_safetensors(path)
    unknown = sorted(set(tensors) - set(INPUT_KEYS))
    if unknown:
        raise UsageError(f"inputs file {path!r} has unknown tensor(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(INPUT_KEYS)}")
    if "input_ids" not in tensors:
        raise UsageError(f"inputs file {path!r} has no 'input_ids' tensor")
    for name, array in tensors.items():
        if name not in ("labels", "mc_labels") and array.dtype.kind not in "iu":
            raise UsageError(f"inputs file {path!r}: {name!r} must be an integer tensor, got {array.dtype}")
    return {k: jnp.asarray(v) for k, v in tensors.items()}


def _tokenizer(checkpoint_dir: str, flag: str):
    from refjax.params import tokenizer as tokenizer_lib

    try:
        return tokenizer_lib.load_tokenizer(checkpoint_dir)
    except FileNotFoundError as e:
        raise UsageError(f"{flag} needs a tokenizer in the checkpoint directory: {e}") from None


def _metadata(ckpt, dtype_name: str) -> dict[str, str]:
    import jax

    return {"family": ckpt.family, "architecture": ckpt.config.architecture, "dtype": dtype_name,
            "matmul_precision": MATMUL_PRECISION, "jax": jax.__version__, "producer": "refjax"}


def cmd_forward(args) -> int:
    _setup_jax()
    import jax.numpy as jnp

    from refjax.params import io
    from refjax.params import tokenizer as tokenizer_lib
    from refjax.tooling.families import FAMILIES

    _check_out_path(args.out)
    ckpt = _load(args.checkpoint, args.dtype)
    options = {k: True for k in ("integer", "propagate_scales") if getattr(args, k)}
    if options and ckpt.family != "ibert":
        flags = " ".join("--" + k.replace("_", "-") for k in options)
        raise UsageError(f"{flags} is for I-BERT quant-mode checkpoints; {args.checkpoint!r} is {ckpt.family}")
    if args.text is not None:
        ids = tokenizer_lib.encode(_tokenizer(args.checkpoint, "--text"), args.text)
        inputs = {"input_ids": jnp.asarray([ids], dtype=jnp.int32)}
    else:
        inputs = _read_inputs(args.inputs)
    out = FAMILIES[ckpt.family].forward(ckpt.params, ckpt.config, **inputs, output_hidden_states=True,
                                        output_attentions=True, taps=args.taps, **options)
    tensors, order = forward_dump(ckpt.family, out)
    extra = {"options": json.dumps(options)} if options else {}
    io.write_safetensors(args.out, tensors, {**_metadata(ckpt, args.dtype), "order": json.dumps(order), **extra})
    print(f"wrote {len(tensors)} tensors to {args.out}", file=sys.stderr)
    return 0


def forward_dump(family: str, out) -> tuple[dict[str, Any], list[str]]:
    """A forward's Output -> (HF-named numpy arrays, their model order): the output fields,
    `hidden_states.{i}`, `attentions.{i}` and, when the forward ran with taps, every tap
    as `ref/<family>.py: TAPS` names it (`h.{i}.attn.q`). The order (ref/diff.py:
    model_order) is what `refjax diff` compares in; it goes into the file's metadata."""
    import numpy as np

    from refjax.tooling import diff
    from refjax.tooling.families import FAMILIES

    tensors: dict[str, Any] = {}
    for field in OUTPUT_FIELDS:
        value = getattr(out, field)
        if value is not None:
            tensors[field] = np.asarray(value)
    for i, hidden in enumerate(out.hidden_states):
        tensors[f"hidden_states.{i}"] = np.asarray(hidden)
    for i, probs in enumerate(out.attentions):
        tensors[f"attentions.{i}"] = np.asarray(probs)
    spec = FAMILIES[family].taps
    n_layers = len(out.attentions)
    if out.taps is not None:
        tensors.update(diff.expand_taps(out.taps, spec, n_layers, FAMILIES[family].optional_taps))
    return tensors, diff.model_order(tensors, spec, n_layers)


def cmd_generate(args) -> int:
    _setup_jax()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from refjax.params import io
    from refjax.params import tokenizer as tokenizer_lib
    from refjax.tooling.families import FAMILIES
    from refjax.generate import Sampling

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    _check_out_path(args.out)
    sampling = Sampling(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    ckpt = _load(args.checkpoint, args.dtype)
    family = FAMILIES[ckpt.family]
    if ckpt.config.architecture not in family.lm_architectures:
        raise UsageError(f"generate needs a language-model head; {args.checkpoint!r} is a "
                         f"{ckpt.config.architecture} (accepted: {', '.join(family.lm_architectures)})")
    tokenizer = None
    if args.prompt is not None:
        tokenizer = _tokenizer(args.checkpoint, "--prompt")
        ids = tokenizer_lib.encode(tokenizer, args.prompt)
        if not ids:
            raise UsageError("--prompt encodes to no tokens")
        input_ids, attention_mask = jnp.asarray([ids], jnp.int32), None
    else:
        inputs = _read_inputs(args.inputs)
        extra = sorted(set(inputs) - {"input_ids", "attention_mask"})
        if extra:
            raise UsageError(f"generate reads only input_ids and attention_mask; got also {', '.join(extra)}")
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        try:
            tokenizer = tokenizer_lib.load_tokenizer(args.checkpoint)
        except FileNotFoundError:
            tokenizer = None
    start = time.perf_counter()
    sequences = family.generate(ckpt.params, ckpt.config, input_ids, attention_mask,
                                max_new_tokens=args.max_new_tokens, sampling=sampling,
                                key=jax.random.PRNGKey(args.seed))
    sequences = np.asarray(sequences).astype(np.int32)
    new = sequences.shape[1] - input_ids.shape[1]
    print(f"generated {new} tokens x {sequences.shape[0]} rows in {time.perf_counter() - start:.2f}s",
          file=sys.stderr)
    if tokenizer is not None:
        mask = None if attention_mask is None else np.asarray(attention_mask)
        for row, seq in enumerate(sequences):
            prompt_len = input_ids.shape[1] if mask is None else int(mask[row].sum())
            text = tokenizer_lib.decode(tokenizer, [int(t) for t in seq[input_ids.shape[1] - prompt_len:]])
            # one row: the text as is; a batch: one JSON string per row, so rows stay one line each
            print(text if len(sequences) == 1 else json.dumps(text, ensure_ascii=False))
    else:
        for seq in sequences:
            print(" ".join(str(int(t)) for t in seq))
    if args.out:
        io.write_safetensors(args.out, {"sequences": sequences}, _metadata(ckpt, args.dtype))
        print(f"wrote sequences {list(sequences.shape)} to {args.out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------


def cmd_diff(args) -> int:
    from refjax.tooling import diff

    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if not value >= 0:  # also rejects NaN
            raise UsageError(f"{flag} must be >= 0, got {value}")
    ref = diff.read_dump(args.ref)
    other = diff.read_dump(args.other)
    if args.map:
        other, unused = diff.rename(other, diff.read_map(args.map))
        if unused:
            print(f"refjax: warning: --map entries that match no name in {args.other}: {', '.join(unused)}",
                  file=sys.stderr)
    rows = diff.diff(ref, other, rtol=args.rtol, atol=args.atol)
    print(f"REF   {args.ref}\nOTHER {args.other}\n{len(rows)} names, {diff.comparison_order(ref, other)[1]}\n")
    print(diff.format_table(rows))
    print()
    print(diff.summary(rows, args.rtol, args.atol, args.allow_missing))
    return 1 if diff.failed(rows, args.allow_missing) else 0


# --------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with refjax's error contract: one line `refjax: error: ...`, exit 2."""

    def error(self, message):
        self.exit(2, f"refjax: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refjax", description="JAX reference implementations of HF transformers, "
                                                                "verified against golden tensors.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="run every golden case and print the error table")
    p.add_argument("--golden", help="golden directory (default: ./golden)")
    p.add_argument("--only", nargs="+", metavar="SUBSTRING", help="run only cases whose name contains one of these")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("forward", help="run a checkpoint's head and write HF-named outputs")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="input text (needs a tokenizer in the checkpoint dir)")
    src.add_argument("--inputs", metavar="IN.safetensors", help="input_ids [batch, seq] and optional extras")
    p.add_argument("--out", required=True, metavar="OUT.safetensors")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--taps", action="store_true", help="also write every named intermediate")
    p.add_argument("--integer", action="store_true",
                   help="I-BERT quant mode: run the integer-only encoder (int8/int32 arithmetic, true scales)")
    p.add_argument("--propagate-scales", action="store_true",
                   help="I-BERT quant mode: hand each layer its input's true scale (HF hands every layer "
                        "the embedding's)")
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("generate", help="decode new tokens with a language-model head")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint dir)")
    src.add_argument("--inputs", metavar="IN.safetensors", help="left-padded input_ids and attention_mask")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy argmax")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="OUT.safetensors", help="write `sequences` (int32) here")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("diff", help="compare two tensor dumps in model order; name the first divergence",
                       description="Compare two tensor dumps (safetensors) name by name, in model order "
                                   "(REF's 'order' metadata, else OTHER's, else natural order), print a table "
                                   "and name the first tensor out of tolerance. A tensor is ok when "
                                   "max|REF - OTHER| <= atol + rtol * max|REF|. Exit 0: all ok; 1: a tensor "
                                   "differs, a name is missing from one side (unless --allow-missing), or "
                                   "no name is common to both.")
    p.add_argument("ref", metavar="REF.safetensors", help="the reference dump (e.g. `refjax forward --taps`)")
    p.add_argument("other", metavar="OTHER.safetensors", help="the dump to check")
    p.add_argument("--rtol", type=float, default=1e-5, help="tolerance relative to max|REF| (default 1e-5)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    p.add_argument("--map", metavar="NAMES.json",
                   help='JSON object renaming OTHER\'s names onto REF\'s: {"their.name": "our.name"}; '
                        '{i} in a key matches a layer index: {"blk.{i}.attn_q": "layers.{i}.self_attn.q_proj"}')
    p.add_argument("--allow-missing", action="store_true",
                   help="names present on one side only are listed but do not fail the diff")
    p.set_defaults(func=cmd_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            ImportError) as e:  # ImportError: an optional extra is missing (the message names the pip command)
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"refjax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
