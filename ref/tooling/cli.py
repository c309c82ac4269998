"""The `refjax` command: the imperative shell around the pure core.

    refjax verify   [--golden DIR] [--only SUBSTRING ...] [--jobs N]
    refjax forward  CHECKPOINT_DIR (--text TEXT | --inputs IN.safetensors) --out OUT.safetensors
                    [--dtype float32|float64|bfloat16] [--taps] [--integer] [--propagate-scales]
    refjax generate CHECKPOINT_DIR (--prompt TEXT | --inputs IN.safetensors) [--max-new-tokens N]
                    [--do-sample] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                    [--out OUT.safetensors] [--dtype ...]
    refjax diff     REF OTHER [--rtol R] [--atol A] [--map NAMES.json] [--allow-missing] [--all-positions]
                    [--max-kl K] [--max-mean-kl K] [--min-top1 F] [--min-topk F] [--top-k K]
                    [--json] [--junit REPORT.xml]
    refjax envelope CHECKPOINT_DIR OTHER --dtype bfloat16|float16 [--reference-dtype float64|float32]
                    [--factor F] [--inputs IN] [--save-reference REF] [and diff's options]
    refjax hf-taps  CHECKPOINT_DIR --inputs IN --out OUT [--dtype ...]   (the `reference` extra)
    refjax convert  CHECKPOINT_DIR OUT_DIR          (.bin -> safetensors; needs torch for .bin)

CHECKPOINT_DIR is a directory, or a model id ("org/name") already in the local HF cache,
read offline at `--revision` (branch, tag or commit; default main) as
`from_pretrained(..., local_files_only=True)` does (refjax/params/hub.py); a path that
exists always wins.

Dumps (REF, OTHER, IN, OUT) are read and written by extension: .safetensors, .npz (and,
read only, .npy or a folder of .npy files; ref/tooling/dumps.py).

Errors in what the user gave (paths, files, configs, inputs) print one line
`refjax: error: ...` and exit 2; `verify` exits 1 when a golden comparison fails, `diff`
when two dumps differ.
Output files are written to a temporary file and renamed, so they are never half-written.
All runs use fp64-capable JAX (`jax_enable_x64`, arrays keep their stated dtypes) and
"highest" matmul precision, recorded in the output metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from refjax.tooling.diff import OUTPUT_FIELDS  # noqa: F401  (re-exported: the fields `forward` writes)
from refjax.tooling.dumps import INPUT_KEYS  # noqa: F401

DTYPES = ("float32", "float64", "bfloat16")
MATMUL_PRECISION = "highest"


class UsageError(ValueError):
    """A problem with the command line itself."""


def _setup_jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISION)
    _compilation_cache(jax)
    return jax


def _compilation_cache(jax) -> None:
    """JAX's persistent compilation cache, so a second `refjax` run reuses the first one's
    compiled programs: $REFJAX_COMPILATION_CACHE, default ~/.cache/refjax/jax ("off": none).
    A directory that cannot be created is not an error: the run just compiles."""
    where = os.environ.get("REFJAX_COMPILATION_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "refjax", "jax"))
    if where.lower() in ("", "0", "off", "none"):
        return
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _default_golden_dir() -> str:
    """The goldens shipped with the package (package data `refjax/golden` after an install;
    the repository's golden/ beside ref/ in a checkout), else ./golden."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # refjax/ (ref/ in a checkout)
    for where in (os.path.join(package, "golden"), os.path.join(os.path.dirname(package), "golden"),
                  os.path.join(os.getcwd(), "golden")):
        if os.path.isfile(os.path.join(where, "MANIFEST.json")):
            return where
    raise FileNotFoundError("no golden/MANIFEST.json in the installed package or the current directory; "
                            "pass --golden DIR")


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------


def _verify_worker(golden_dir: str, case: str) -> tuple[list, float]:
    """One golden case in a `--jobs` worker process: its rows and seconds."""
    from refjax.tooling import verify

    start = time.perf_counter()
    return list(verify.run_case(golden_dir, case)), time.perf_counter() - start


def _verify_rows(golden_dir: str, cases: list[str], jobs: int):
    """Yield (case, rows, seconds) for every case as it finishes: in this process for
    `jobs == 1`, else in `jobs` fresh worker processes (spawned: JAX is not fork-safe). A
    case is a few small programs compiled once each, and XLA compiles on one core, so
    workers on separate cores finish the goldens about `jobs` times sooner."""
    if jobs == 1:
        for case in cases:
            yield (case, *_verify_worker(golden_dir, case))
        return
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_setup_jax) as pool:
        pending = {pool.submit(_verify_worker, golden_dir, case): case for case in cases}
        try:
            for done in concurrent.futures.as_completed(pending):
                yield (pending[done], *done.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def cmd_verify(args) -> int:
    _setup_jax()
    from refjax.tooling import verify

    golden_dir = args.golden or _default_golden_dir()
    cases = verify.golden_cases(golden_dir)
    if args.only:
        cases = [c for c in cases if any(pattern in c for pattern in args.only)]
        if not cases:
            raise UsageError(f"--only {' '.join(args.only)} matches no golden case")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    jobs = min(args.jobs or os.cpu_count() or 1, len(cases))
    print(f"goldens: {golden_dir} ({len(cases)} cases, {jobs} process{'es' if jobs > 1 else ''})", file=sys.stderr)
    started = time.perf_counter()
    by_case = {}
    for n, (case, case_rows, seconds) in enumerate(_verify_rows(golden_dir, cases, jobs), 1):
        print(f"[{n}/{len(cases)}] {case}: {verify.case_summary(case_rows)} ({seconds:.1f}s)", file=sys.stderr)
        by_case[case] = case_rows
    rows = [row for case in cases for row in by_case[case]]  # the table in case order, however they finished
    print(verify.format_table(rows))
    failed = [r for r in rows if not r.ok]
    skipped = [r for r in rows if r.status == "SKIP"]
    print(f"\n{len(rows) - len(failed) - len(skipped)}/{len(rows)} tensors within tolerance"
          f"{f', {len(skipped)} with nothing compared (declared non-finite)' if skipped else ''} over {len(cases)} cases "
          f"(matmul precision {MATMUL_PRECISION}) in {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------
# forward / generate
# --------------------------------------------------------------------------------------


def _check_out_path(path: str | None, flag: str = "--out") -> None:
    from refjax.tooling import dumps

    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory; give a file name")
    if flag != "--junit":
        try:
            dumps.check_writable(path)
        except ValueError as e:
            raise UsageError(f"{flag} {e}") from None


def _load(checkpoint_dir: str, dtype_name: str):
    import jax.numpy as jnp

    from refjax.params.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint_dir, dtype=jnp.dtype(dtype_name))


def _read_inputs(path: str) -> dict[str, Any]:
    import jax.numpy as jnp

    from refjax.tooling import dumps

    return {k: jnp.asarray(v) for k, v in dumps.read_inputs(path).items()}


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

    from refjax.params import tokenizer as tokenizer_lib
    from refjax.tooling import dumps
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
    tensors, order = dumps.forward_dump(ckpt.family, out, inputs)  # the inputs too: a port can rerun them
    extra = {"options": json.dumps(options)} if options else {}
    dumps.write_dump(args.out, tensors, {**_metadata(ckpt, args.dtype), "order": json.dumps(order), **extra})
    print(f"wrote {len(tensors)} tensors to {args.out}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    _setup_jax()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from refjax.generate import Sampling
    from refjax.params import tokenizer as tokenizer_lib
    from refjax.tooling import dumps
    from refjax.tooling.families import FAMILIES

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
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")  # ids in, ids out: no tokenizer
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
        dumps.write_dump(args.out, {"sequences": sequences}, _metadata(ckpt, args.dtype))
        print(f"wrote sequences {list(sequences.shape)} to {args.out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------


def _compare(args, ref, other, **envelope):
    """`refjax.compare` with the report options of `diff` / `envelope`."""
    from refjax.tooling import compare, diff

    names = diff.read_map(args.map) if args.map else None
    report = compare.compare(ref, other, rtol=args.rtol, atol=args.atol, names=names,
                             allow_missing=args.allow_missing, all_positions=args.all_positions,
                             max_kl=args.max_kl, max_mean_kl=args.max_mean_kl, min_top1=args.min_top1,
                             min_topk=args.min_topk, top_k=args.top_k, cli=True, **envelope)
    if report.unused_names:
        print(f"refjax: warning: --map entries that match no name in {report.other}: "
              f"{', '.join(report.unused_names)}", file=sys.stderr)
    return report


def _print_report(args, report) -> int:
    from refjax.params import io

    if args.junit:
        with io.atomic_write(args.junit, "w") as f:
            f.write(report.to_junit())
    print(report.to_json() if args.json else report.text())
    return report.exit_code


def _check_report_args(args) -> None:
    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if not value >= 0:  # also rejects NaN
            raise UsageError(f"{flag} must be >= 0, got {value}")
    _check_out_path(args.junit, "--junit")


def cmd_diff(args) -> int:
    from refjax.tooling import dumps

    _check_report_args(args)
    ref, other = dumps.read_dump(args.ref), dumps.read_dump(args.other)
    return _print_report(args, _compare(args, ref, other))


def cmd_envelope(args) -> int:
    _setup_jax()
    from refjax.tooling import dumps
    from refjax.tooling import envelope as envelope_lib

    _check_report_args(args)
    _check_out_path(args.save_reference, "--save-reference")
    other = dumps.read_dump(args.other)
    if args.inputs:
        inputs = dumps.read_inputs(args.inputs)
    elif "input_ids" in other.tensors:
        inputs = {k: np.asarray(v) for k, v in other.inputs.items()}
    else:
        raise UsageError(f"{args.other} holds no input_ids: pass --inputs IN (the input the port ran)")
    start = time.perf_counter()
    reference, envelope = envelope_lib.measure(args.checkpoint, inputs, args.dtype, args.reference_dtype,
                                               args.all_positions)
    print(f"envelope: refjax in {args.dtype} vs {args.reference_dtype}, {len(envelope.drift)} tensors "
          f"({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    if args.save_reference:
        dumps.write_dump(args.save_reference, reference.tensors, {**reference.metadata,
                                                                  "order": json.dumps(reference.order)})
    reference = dataclasses.replace(reference, path=f"refjax {args.reference_dtype} ({args.checkpoint})")
    return _print_report(args, _compare(args, reference, other, envelope=envelope, factor=args.factor))


def cmd_convert(args) -> int:
    from refjax.params.checkpoint import convert_checkpoint

    start = time.perf_counter()
    names = convert_checkpoint(args.checkpoint, args.out, log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {len(names)} files to {args.out} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    return 0


def cmd_hf_taps(args) -> int:
    from refjax.tooling import dumps, hf_taps

    _check_out_path(args.out)
    try:
        tensors, order, metadata = hf_taps.run(args.checkpoint, args.inputs, args.dtype)
    except (OSError, RuntimeError) as e:  # HF's own refusal (from_pretrained, forward)
        raise UsageError(f"{args.checkpoint}: {e}") from None
    dumps.write_dump(args.out, tensors, {**metadata, "order": json.dumps(order)})
    print(f"wrote {len(tensors)} tensors to {args.out}", file=sys.stderr)
    return 0


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
    p.add_argument("--jobs", "-j", type=int, metavar="N",
                   help="worker processes (default: one per CPU core; 1 runs in this process)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("forward", help="run a checkpoint's head and write HF-named outputs")
    _add_checkpoint(p)
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
    _add_checkpoint(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint dir; prints the text)")
    src.add_argument("--inputs", metavar="IN.safetensors",
                     help="left-padded input_ids and attention_mask (no tokenizer needed; prints the ids)")
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
                       description="Compare two tensor dumps name by name, in model order (REF's 'order' "
                                   "metadata, else OTHER's, else natural order), print a table and name the "
                                   "first tensor out of tolerance. A tensor is ok when max|REF - OTHER| <= "
                                   "atol + rtol * max|REF|, over real positions only (the dump's "
                                   "attention_mask). Exit 0: all ok; 1: a tensor differs, a name is missing "
                                   "from one side (unless --allow-missing), no name is common to both, the "
                                   "inputs differ, or a logits threshold fails; the last line says which.")
    p.add_argument("ref", metavar="REF", help="the reference dump (e.g. `refjax forward --taps`): .safetensors, "
                                              ".npz, .npy or a folder of .npy files")
    p.add_argument("other", metavar="OTHER", help="the dump to check (same formats)")
    _add_report_options(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("envelope", help="judge a low-precision port by refjax's own drift in its dtype",
                       description="Run refjax on the port's input in --dtype and in --reference-dtype, take "
                                   "per tensor how far refjax itself drifts (max abs and rel L2 at real "
                                   "positions), and judge OTHER against the reference run: ok when its max abs "
                                   "and rel L2 are both within --factor times refjax's (or within the plain "
                                   "tolerance). The table adds the drift and the ratio (the larger of the "
                                   "two). Exit codes as `diff`.")
    _add_checkpoint(p)
    p.add_argument("other", metavar="OTHER", help="the port's dump, with its inputs (or give --inputs)")
    p.add_argument("--dtype", required=True, choices=("bfloat16", "float16", "float32"),
                   help="the port's dtype: refjax runs in it to measure the drift")
    p.add_argument("--reference-dtype", default="float64", choices=("float64", "float32"),
                   help="what the drift and the port are measured against (default float64)")
    p.add_argument("--factor", type=float, default=None,
                   help="allowed multiple of refjax's drift per tensor (default 4)")
    p.add_argument("--inputs", metavar="IN", help="the input the port ran (default: the inputs in OTHER)")
    p.add_argument("--save-reference", metavar="REF", help="also write the reference run's dump here")
    _add_report_options(p)
    p.set_defaults(func=cmd_envelope)

    p = sub.add_parser("hf-taps", help="run a checkpoint in HF PyTorch and dump the same names (reference extra)",
                       description="Run the checkpoint in Hugging Face PyTorch (eager attention, eval mode) and "
                                   "write its outputs and taps under refjax's names, from forward hooks, so "
                                   "that `refjax diff` compares refjax with HF op by op. Needs the `reference` "
                                   "extra: pip install 'refjax[reference]'.")
    _add_checkpoint(p)
    p.add_argument("--inputs", required=True, metavar="IN",
                   help="input_ids [batch, seq] and optional extras (or a refjax dump: its inputs)")
    p.add_argument("--out", required=True, metavar="OUT.safetensors")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.set_defaults(func=cmd_hf_taps)

    p = sub.add_parser("convert", help="write the safetensors version of a checkpoint (e.g. pytorch_model.bin)",
                       description="Read a checkpoint's weights (pytorch_model.bin or its shards, with torch and "
                                   "torch.load(weights_only=True) only; or safetensors) and write them as "
                                   "safetensors into the new directory OUT_DIR, one file per shard with HF's names "
                                   "and index, every other file (config, tokenizer) copied. Atomic: OUT_DIR "
                                   "appears complete or not at all.")
    _add_checkpoint(p)
    p.add_argument("out", metavar="OUT_DIR", help="a new (or empty) directory")
    p.set_defaults(func=cmd_convert)
    return parser


def _add_checkpoint(p) -> None:
    """The CHECKPOINT_DIR argument (a directory or a cached model id) and its --revision."""
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                   help="a checkpoint directory, or a model id (org/name) in the local HF cache")
    p.add_argument("--revision", help="with a model id: the branch, tag or commit in the HF cache (default main)")


def _add_report_options(p) -> None:
    """The options of a comparison report (diff, envelope)."""
    p.add_argument("--rtol", type=float, default=1e-5, help="tolerance relative to max|REF| (default 1e-5)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    p.add_argument("--map", metavar="NAMES.json",
                   help='JSON object renaming OTHER\'s names onto REF\'s: {"their.name": "our.name"}; '
                        '{i} in a key matches a layer index: {"blk.{i}.attn_q": "layers.{i}.self_attn.q_proj"}')
    p.add_argument("--allow-missing", action="store_true",
                   help="names present on one side only are listed but do not fail the diff")
    p.add_argument("--all-positions", action="store_true",
                   help="compare padded positions too (default: only where attention_mask is 1)")
    p.add_argument("--max-kl", type=float, metavar="K", help="fail when the largest KL(REF||OTHER) of the "
                                                              "logits over positions exceeds K (nats)")
    p.add_argument("--max-mean-kl", type=float, metavar="K", help="fail when the mean KL exceeds K")
    p.add_argument("--min-top1", type=float, metavar="F",
                   help="fail when fewer than this fraction of positions agree on the argmax")
    p.add_argument("--min-topk", type=float, metavar="F", help="fail when the mean top-k overlap is below F")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="k of the top-k overlap (default 5)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--junit", metavar="REPORT.xml", help="also write the report as JUnit XML")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "checkpoint", None) is not None:  # a model id -> its snapshot in the HF cache
            from refjax.params import hub

            args.checkpoint = hub.resolve(args.checkpoint, args.revision)
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, ImportError) as e:  # ImportError: an optional extra is missing (the message names the pip command)
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"refjax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
