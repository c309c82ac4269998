"""Golden-case verification: run refjax on every golden case and compare with HF's tensors.

Used by `refjax verify` and by the golden tests (tests/test_golden.py). A golden case is a
directory written by tools/make_golden.py: an HF checkpoint plus `golden.safetensors`
holding the inputs and HF's outputs under `{dtype}/{field}` (see docs/golden.md).

Tolerances (a row is ok when max|ours - hf| <= tol * max(max|hf|, 1)):
  float32: 1e-5, float64: 1e-12; token ids: exact.
Stated exceptions, each an HF behaviour rather than ours:
  - HF's causal-LM and token-classification losses run `logits.float()`, downcasting an
    fp64 model's loss to fp32; those float64 losses are compared at the float32 tolerance.
  - HF's Arcee computes RMSNorm, RoPE cos/sin and the softmax in float32 even in a float64
    model, so its float64 outputs are only float32-accurate: compared at 1e-5.
  - HF's Arcee in float64 turns a fully padded query row into NaN (its float32 softmax sees
    the float64 mask value as -inf), and the NaN spreads along that row. The Arcee goldens
    feed float64 right-padded rows instead (`float64.*` inputs), except arcee/causal-lm,
    kept to show the NaN. Non-finite HF entries are skipped only where a case's metadata
    declares them (`declared_nonfinite`: {key: count}, the count must match exactly);
    refjax must be finite there. Every row counts its skipped entries; a field whose
    entries were all skipped is reported SKIP, never ok.
  - HF's MEGA casts both operands of its EMA FFT convolution to float32 (`.float()`) and
    computes the rotary-bias sinusoids in float32, whatever the model dtype, so its float64
    outputs are only float32-accurate too: compared at 1e-5 (refjax does the same casts).
  - Quantized models (I-BERT quant_mode): hidden states and integer-softmax probabilities
    are integers times scaling factors and must equal HF's exactly (tol 0); the float heads
    on top keep the float32 tolerance (`exact_note`). Calibration goldens (`calibrate.*`)
    are replayed with the family's `calibrate` and the state compared with HF's buffers.
Outputs are compared at every position, padded ones included: refjax reproduces HF's
masking of fully padded rows (see ref/attention.py).

Gradients (`grad.safetensors`, a few cases per family, tools/golden_grads.py): `jax.grad` of
the loss w.r.t. every parameter and inputs_embeds against HF autograd's, each tensor relative
to its own largest entry (`compare_gradient`: zero-by-symmetry gradients and one-entry
parameters are the two stated exceptions, with measured reasons).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from refjax.params import checkpoint as checkpoint_lib
from refjax.params import io
from refjax.params import tokenizer as tokenizer_lib
from refjax import rotary
from refjax.tooling import families

TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
# Families whose HF float64 path computes internals in float32 (see above), and why.
FLOAT64_IS_FLOAT32_ACCURATE = {
    "arcee": "HF Arcee computes RMSNorm, RoPE and softmax in fp32 in fp64 models",
    "mega": "HF MEGA runs the EMA's FFT convolution (`.float()`) and builds the rotary sinusoids in fp32 "
            "in fp64 models",
}


def exact_note(config, field: str) -> str | None:
    """Quantized (integer-only) models, e.g. I-BERT with quant_mode: hidden states (and
    attention probabilities where the softmax is quantized) are integers times scaling
    factors, reproduced bit for bit, so they are compared with tolerance 0. Float modules
    on top (heads, pooler, losses) and dequantized softmax probabilities keep the float
    tolerance: their float32 sums are rounded in another order than torch's."""
    quantized = getattr(config, "quantized", None)
    if not getattr(config, "quant_mode", False) or quantized is None:
        return None
    if field in ("last_hidden_state", "hidden_states") or (field == "attentions" and quantized("softmax")):
        return "quant mode: integers x scaling factors, exact"
    return None
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
               "mc_token_ids", "mc_labels", "start_positions", "end_positions")


@dataclasses.dataclass(frozen=True)
class Row:
    case: str
    dtype: str
    field: str
    max_abs: float
    max_rel: float
    tol: float
    ok: bool
    note: str = ""
    compared: int = 0  # entries compared
    skipped: int = 0   # HF entries skipped as declared non-finite (metadata `declared_nonfinite`)

    @property
    def status(self) -> str:
        """FAIL, SKIP (nothing compared: every entry declared non-finite) or ok."""
        if not self.ok:
            return "FAIL"
        return "SKIP" if self.skipped and not self.compared else "ok"


def compare(case: str, dtype: str, field: str, ours: Any, ref: np.ndarray, tol: float, note: str = "",
            declared_nonfinite: int = 0) -> Row:
    """One tensor against HF's. `declared_nonfinite`: how many of HF's entries the case's
    metadata declares non-finite; exactly that many must be, they are skipped (refjax must be
    finite there) and counted. Undeclared non-finite HF entries fail the row. An empty tensor
    (e.g. the ids of an empty text) is checked by its shape alone."""
    ours = np.asarray(ours)
    if ours.shape != ref.shape and ours.size == ref.size:
        ours = ours.reshape(ref.shape)  # HF returns some multiple-choice tensors flattened
    if ours.shape != ref.shape:
        return Row(case, dtype, field, float("inf"), float("inf"), tol, False,
                   f"shape {list(ours.shape)} vs HF {list(ref.shape)}")
    finite = np.isfinite(ref) if ref.dtype.kind == "f" else np.ones(ref.shape, bool)
    nonfinite = int((~finite).sum())
    if nonfinite != declared_nonfinite:
        return Row(case, dtype, field, float("inf"), float("inf"), tol, False,
                   f"HF has {nonfinite} non-finite entries, the case's metadata declares {declared_nonfinite}")
    if nonfinite:
        if not np.all(np.isfinite(ours)):
            return Row(case, dtype, field, float("inf"), float("inf"), tol, False, "refjax output is not finite",
                       skipped=nonfinite)
        note = (note + "; " if note else "") + f"{nonfinite} declared non-finite HF entries skipped"
        ours, ref = ours[finite], ref[finite]
    if ref.size == 0:  # an empty tensor (shape checked), or every entry skipped: status SKIP, not ok
        return Row(case, dtype, field, 0.0, 0.0, tol, True, note or "empty: shape checked", 0, nonfinite)
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(np.max(diff)) if np.all(np.isfinite(diff)) else float("inf")
    scale = float(np.max(np.abs(ref.astype(np.float64))))
    max_rel = max_abs / scale if scale > 0 else max_abs
    return Row(case, dtype, field, max_abs, max_rel, tol, max_abs <= tol * max(scale, 1.0), note, int(ref.size),
               nonfinite)


def golden_cases(golden_dir: str) -> list[str]:
    """Case directories (relative to golden_dir) listed in MANIFEST.json."""
    manifest = os.path.join(golden_dir, "MANIFEST.json")
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"no MANIFEST.json in golden directory {golden_dir!r}")
    with open(manifest, encoding="utf-8") as f:
        return sorted(json.load(f)["cases"])


def case_inputs(golden: dict, dtype: str) -> dict:
    """The model inputs HF's `dtype` forward of a case was given: the shared ones, or
    `{dtype}.{name}` where that dtype had its own (Arcee float64: right-padded rows, where
    HF's float64 path gives no NaN); inputs_embeds in `dtype`."""
    inputs = {k: jnp.asarray(golden.get(f"{dtype}.{k}", golden.get(k))) for k in INPUT_NAMES if k in golden}
    if "inputs_embeds" in inputs:
        inputs["inputs_embeds"] = inputs["inputs_embeds"].astype(dtype)
    return inputs


def run_case(golden_dir: str, case: str) -> Iterator[Row]:
    """Compare every recorded HF output of one case; yields one Row per tensor."""
    case_dir = os.path.join(golden_dir, case)
    golden, metadata = io.read_safetensors(os.path.join(case_dir, "golden.safetensors"))
    declared = json.loads(metadata.get("declared_nonfinite", "{}"))  # {"float64/loss": 1, ...}
    if set(declared) - set(golden):
        raise KeyError(f"{case}: declared_nonfinite names keys that are not recorded: {sorted(set(declared) - set(golden))}")
    dtypes = sorted({k.split("/")[0] for k in golden if "/" in k})
    for dtype in dtypes:
        ckpt = checkpoint_lib.load_checkpoint(case_dir, dtype=jnp.dtype(dtype))
        family = families.FAMILIES[ckpt.family]
        inputs = case_inputs(golden, dtype)
        # a case may name the forward options it was made for (e.g. I-BERT's propagate_scales,
        # integer): each variant is compared against the same HF tensors, its options in the name
        for options in json.loads(metadata.get("forward_variants", "[{}]")):
            forward = family.forward
            if family.jit:
                forward = jax.jit(forward, static_argnames=("config", "output_hidden_states", "output_attentions",
                                                            *options))
            with jax.default_matmul_precision("highest"):
                out = forward(ckpt.params, ckpt.config, **inputs, **options, output_hidden_states=True,
                              output_attentions=True)
            tag = "".join(f" [{k}={v}]" for k, v in options.items())
            for key in sorted(k for k in golden if k.startswith(dtype + "/")):
                field = key.split("/", 1)[1]
                name, _, index = field.partition(".")
                ours = getattr(out, name)
                if index:
                    ours = ours[int(index)]
                tol, note = TOLERANCE[dtype], ""
                if exact_note(ckpt.config, name):
                    tol, note = 0.0, exact_note(ckpt.config, name)
                if dtype == "float64" and ckpt.family in FLOAT64_IS_FLOAT32_ACCURATE:
                    tol, note = TOLERANCE["float32"], FLOAT64_IS_FLOAT32_ACCURATE[ckpt.family]
                elif name == "loss" and dtype == "float64" and golden[key].dtype == np.float32:
                    tol, note = TOLERANCE["float32"], "HF computes this loss in fp32"
                yield compare(case, dtype, field + tag, ours, np.asarray(golden[key]), tol, note,
                              declared.get(key, 0))
    if "calibrate.input_ids.0" in golden:
        yield from _check_calibration(case_dir, case, golden, json.loads(metadata.get("calibrate_kwargs", "{}")))
    if "rope.inv_freq" in golden:
        yield from _check_rope(case_dir, case, golden)
    if "generate.sequences" in golden:
        yield from _check_generation(golden_dir, case, golden)
    if "texts" in metadata:
        yield from _check_tokenizer(case_dir, case, golden, json.loads(metadata["texts"]))
    if os.path.isfile(os.path.join(case_dir, GRADIENTS)):
        yield from _check_gradients(case_dir, case, golden)


GRADIENTS = "grad.safetensors"  # HF autograd's gradients of the loss (tools/golden_grads.py)


def _check_gradients(case_dir: str, case: str, golden) -> Iterator[Row]:
    """`jax.grad` of the case's loss against HF autograd's, w.r.t. every parameter (by HF
    name, through the checkpoint's name rules) and w.r.t. inputs_embeds.

    Each gradient tensor is compared relative to its own largest HF entry (a gradient's
    scale is not 1; the forward rows' floor of 1 would hide a wrong small gradient), at the
    dtype's tolerance; float32 where HF's float64 loss or forward is float32-accurate (the
    same exceptions as the forward rows). A parameter HF records and refjax lacks, or one
    refjax differentiates that HF neither records nor declares (`not_recorded`: buffers,
    tied aliases, frozen tables), fails the case."""
    grads, metadata = io.read_safetensors(os.path.join(case_dir, GRADIENTS))
    not_recorded = set(json.loads(metadata["not_recorded"]))
    loss_dtype = json.loads(metadata["loss_dtype"])
    for dtype in sorted({k.split("/")[0] for k in grads if "/" in k}):
        ckpt = checkpoint_lib.load_checkpoint(case_dir, dtype=jnp.dtype(dtype))
        family = families.FAMILIES[ckpt.family]
        rules = checkpoint_lib.FAMILIES[ckpt.family].module.name_rules(ckpt.config)
        inputs = case_inputs(golden, dtype)
        embeds = jnp.asarray(grads[f"{dtype}.inputs_embeds"])
        tol, note = TOLERANCE[dtype], ""
        if dtype == "float64" and ckpt.family in FLOAT64_IS_FLOAT32_ACCURATE:
            tol, note = TOLERANCE["float32"], FLOAT64_IS_FLOAT32_ACCURATE[ckpt.family]
        elif loss_dtype[dtype] != dtype:
            tol, note = TOLERANCE[loss_dtype[dtype]], f"HF computes this loss in {loss_dtype[dtype]}"
        trainable, frozen = _split_trainable(ckpt.params)
        with jax.default_matmul_precision("highest"):
            (loss, param_grads), (embeds_loss, embeds_grad) = _loss_gradients(family, ckpt.config, inputs)(
                trainable, frozen, embeds)
        ours = io.tensors_from_tree(param_grads, rules)
        recorded = {k.split("/", 2)[2]: np.asarray(v) for k, v in grads.items() if k.startswith(f"{dtype}/param/")}
        model_scale = max(float(np.max(np.abs(v))) for v in recorded.values())
        yield compare(case, dtype, "grad.loss", loss, np.asarray(grads[f"{dtype}/loss"]), tol, note)
        yield compare(case, dtype, "grad.embeds_loss", embeds_loss, np.asarray(grads[f"{dtype}/embeds_loss"]), tol,
                      note)
        for name in sorted(set(recorded) | set(ours)):
            field = f"grad.{name}"
            if name not in ours:
                yield Row(case, dtype, field, float("inf"), float("inf"), tol, False, "HF has it, refjax has none")
            elif name not in recorded and name not in not_recorded:
                yield Row(case, dtype, field, float("inf"), float("inf"), tol, False,
                          "refjax differentiates it, HF neither records nor declares it")
            elif name in recorded:
                yield compare_gradient(case, dtype, field, ours[name], recorded[name], tol, note, model_scale)
        yield compare_gradient(case, dtype, "grad.inputs_embeds", embeds_grad,
                               np.asarray(grads[f"{dtype}/inputs_embeds"]), tol, note, model_scale)


CANCELLED = 1e-4  # an HF gradient below this fraction of the model's largest is zero up to rounding
# A one-entry parameter (MEGA's ScaleNorm gain) has one gradient summed over every position and
# feature: float32 rounding of that sum reached 2.6e-5 relative (mega/causal-lm), so x10.
SCALAR_FACTOR = 10


def compare_gradient(case: str, dtype: str, field: str, ours: Any, ref: np.ndarray, tol: float, note: str,
                     model_scale: float) -> Row:
    """`compare` for one gradient tensor, relative to its own largest HF entry rather than
    max(that, 1): a gradient's scale is not 1, and the floor would hide a wrong small one.
    A gradient that is zero by symmetry (e.g. a QA head's bias: the start/end softmax is
    shift-invariant) is HF's and ours rounding noise, ~1e-8 here: when its largest entry is
    below CANCELLED x the model's largest gradient (`model_scale`), it is compared on that
    scale instead, and the row says so."""
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if ref.size == 1:
        tol, note = tol * SCALAR_FACTOR, (note + "; " if note else "") + f"one entry, a sum over everything: x{SCALAR_FACTOR}"
    if scale < CANCELLED * model_scale:
        scale = model_scale
        note = (note + "; " if note else "") + "zero up to rounding: relative to the model's largest gradient"
    if scale == 0.0:
        return compare(case, dtype, field, ours, ref, 0.0, note)
    row = compare(case, dtype, field, np.asarray(ours, np.float64) / scale, ref.astype(np.float64) / scale, tol, note)
    return dataclasses.replace(row, max_abs=row.max_abs * scale, max_rel=row.max_abs)


def _split_trainable(params):
    """(floating leaves, the rest): gradients are taken w.r.t. the first."""
    import equinox as eqx

    return eqx.partition(params, eqx.is_inexact_array)


def _loss_gradients(family, config, inputs: dict):
    """One jitted function (one compile per case and dtype) of (trainable params, frozen
    params, inputs_embeds): the case's loss and its gradient w.r.t. the floating params, and
    the loss with inputs_embeds in place of input_ids (all else unchanged) and its gradient
    w.r.t. inputs_embeds."""
    import equinox as eqx

    without_ids = {k: v for k, v in inputs.items() if k != "input_ids"}

    @jax.jit
    def gradients(trainable, frozen, embeds):
        params = eqx.combine(trainable, frozen)
        of_params = jax.value_and_grad(lambda t: family.forward(eqx.combine(t, frozen), config, **inputs).loss)
        of_embeds = jax.value_and_grad(lambda e: family.forward(params, config, inputs_embeds=e, **without_ids).loss)
        return of_params(trainable), of_embeds(embeds)

    return gradients


def _check_generation(golden_dir: str, case: str, golden) -> Iterator[Row]:
    """Greedy tokens must equal HF's exactly; the cached step logits must equal HF's full
    forward over the generated sequence (cached decoding == full forward)."""
    ckpt = checkpoint_lib.load_checkpoint(os.path.join(golden_dir, case), dtype=jnp.float32)
    family = families.FAMILIES[ckpt.family]
    prompt = golden["generate.input_ids"]
    expected = np.asarray(golden["generate.sequences"])
    new_tokens = expected.shape[1] - prompt.shape[1]
    with jax.default_matmul_precision("highest"):
        sequences, step_logits = family.generate(
            ckpt.params, ckpt.config, prompt, golden["generate.attention_mask"], max_new_tokens=new_tokens,
            return_logits=True)
    sequences = np.asarray(sequences)
    if sequences.shape != expected.shape:
        yield Row(case, "float32", "generate.sequences", float("inf"), float("inf"), 0.0, False,
                  f"shape {list(sequences.shape)} vs HF {list(expected.shape)}")
        return
    yield compare(case, "float32", "generate.sequences", sequences, expected, 0.0)
    full_logits = np.asarray(golden["generate.logits"])[:, prompt.shape[1] - 1: -1]
    yield compare(case, "float32", "generate.step_logits", step_logits, full_logits, TOLERANCE["float32"],
                  "cached decoding vs HF full forward")


def _check_calibration(case_dir: str, case: str, golden, options: dict) -> Iterator[Row]:
    """Activation ranges: the family's `calibrate(..., **options)` from the initial state
    over the recorded train-mode batches must give exactly the state HF saved (its
    calibrated buffers)."""
    import importlib

    ckpt = checkpoint_lib.load_checkpoint(case_dir, dtype=jnp.float32)
    family = families.FAMILIES[ckpt.family]
    calibrate = importlib.import_module(family.forward.__module__).calibrate
    if family.jit:
        calibrate = jax.jit(calibrate, static_argnames=("config", *options))
    params_module = checkpoint_lib.FAMILIES[ckpt.family].module
    state = params_module.initial_state(ckpt.config)
    k = 0
    while f"calibrate.input_ids.{k}" in golden:
        batch = {name: jnp.asarray(golden[f"calibrate.{name}.{k}"]) for name in INPUT_NAMES
                 if f"calibrate.{name}.{k}" in golden}
        state = calibrate(ckpt.params, ckpt.config, state, **batch, **options)
        k += 1
    ours = dict(io.tree_paths(state))
    tol, note = calibration_tolerance(ckpt.config)
    for path, saved in io.tree_paths(ckpt.params.state):
        yield compare(case, "float32", f"calibrate.{path}", ours[path], np.asarray(saved), tol, note)


def calibration_tolerance(config) -> tuple[float, str]:
    """How closely a quantized model's `calibrate` reproduces HF's calibrated buffers:
    exactly while softmax, GELU and LayerNorm are integer-only. A float one (I-BERT's
    force_dequant) feeds its float32 output's min/max into the next range (a float softmax:
    through the context probs @ v), and torch's exp / erf / mean and its matmul summation
    round differently from XLA's in the last bit: relative 1e-5 there."""
    if config.quantized("softmax") and config.quantized("gelu") and config.quantized("layernorm"):
        return 0.0, "calibrated ranges, exact"
    return 1e-5, "float softmax/GELU/LayerNorm (force_dequant) feed the ranges: torch's float32 rounding differs"


def _check_rope(case_dir: str, case: str, golden) -> Iterator[Row]:
    """RoPE parameters against HF's rope init functions: inv_freq bit for bit (we emulate
    torch's float32 chain), the attention scaling, and cos/sin for the recorded input."""
    _, config, _ = checkpoint_lib.load_config(case_dir)
    at_init, scaling = rotary.rope_frequencies(config, jnp.zeros((1, 1), jnp.int32))  # HF: seq_len unset
    yield compare(case, "float32", "rope.inv_freq", np.asarray(at_init, np.float32), np.asarray(golden["rope.inv_freq"]), 0.0)
    yield compare(case, "float64", "rope.attention_scaling", np.float64(scaling),
                  np.asarray(golden["rope.attention_scaling"]), TOLERANCE["float64"])
    T = golden["input_ids"].shape[-1]
    used, scaling = rotary.rope_frequencies(config, jnp.arange(T, dtype=jnp.int32)[None])  # this call's length
    if "rope.inv_freq_used" in golden:
        yield compare(case, "float32", "rope.inv_freq_used", np.asarray(used, np.float32),
                      np.asarray(golden["rope.inv_freq_used"]), 0.0, "dynamic/longrope at the input's length")
    if "rope.cos" in golden:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), golden["rope.cos"].shape[:2])
        cos, sin = rotary.rope_cos_sin(used, scaling, positions, jnp.float32)
        yield compare(case, "float32", "rope.cos", cos, np.asarray(golden["rope.cos"]), TOLERANCE["float32"])
        yield compare(case, "float32", "rope.sin", sin, np.asarray(golden["rope.sin"]), TOLERANCE["float32"])


def _check_tokenizer(case_dir: str, case: str, golden, texts: list[str]) -> Iterator[Row]:
    try:
        tokenizer = tokenizer_lib.load_tokenizer(case_dir)
    except tokenizer_lib.MissingDependencyError as e:  # an optional extra is absent: a failed row, not a crash
        yield Row(case, "ids", "tokenizer", float("inf"), float("inf"), 0.0, False, str(e))
        return
    for i, text in enumerate(texts):
        ours = np.asarray(tokenizer_lib.encode(tokenizer, text), dtype=np.int64)
        yield compare(case, "ids", f"text.ids.{i}", ours, np.asarray(golden[f"text.ids.{i}"]), 0.0)


def format_table(rows: list[Row]) -> str:
    header = f"{'case':<28} {'dtype':<8} {'field':<22} {'max abs err':>12} {'max rel err':>12} {'tol':>8}  ok"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.case:<28} {r.dtype:<8} {r.field:<22} {r.max_abs:>12.3e} {r.max_rel:>12.3e} "
                     f"{r.tol:>8.0e}  {r.status}{'  (' + r.note + ')' if r.note else ''}")
    return "\n".join(lines)


def case_summary(rows: list[Row]) -> str:
    """One case's line for `refjax verify`: tensors, failures, and the HF entries skipped
    (always printed; nonzero only where the case's metadata declares non-finite entries)."""
    bad = sum(r.status == "FAIL" for r in rows)
    empty = sum(r.status == "SKIP" for r in rows)
    return (f"{len(rows)} tensors, {'ok' if not bad else f'{bad} FAILED'}, "
            f"{sum(r.skipped for r in rows)} HF entries skipped (declared)"
            + (f", {empty} field(s) with nothing compared (SKIP)" if empty else ""))
