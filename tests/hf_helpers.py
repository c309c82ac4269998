"""Helpers for the reference tier: build small Hugging Face models, run them, compare.

Imported only by reference-tier test files, after they have checked that torch and
transformers are installed (`pytest.importorskip`); nothing here imports torch at module
level, so importing this file never fails on a machine without the `reference` extra.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import numpy as np

# The six GPT-2 classes of transformers, all of which refjax implements.
GPT2_ARCHITECTURES = (
    "GPT2Model",
    "GPT2LMHeadModel",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
)

# Tolerances of the live comparison: |refjax - hf| <= TOL * max(max|hf|, 1), per tensor;
# the goldens' (refjax.tooling.verify.TOLERANCE). float64 is used by the families whose HF
# float64 path is float64 throughout: measured (HYPOTHESIS_PROFILE=ci, torch 2.13.0 CPU)
# worst scaled errors GPT-2 8e-16 (every head; train: outputs and every gradient), RoFormer 2e-15
# (every head; rotary_value / embeddings_project), so 1e-12 leaves a margin of ~500x.
# Arcee and MEGA compute parts in float32 inside float64 models and use the float32 value;
# I-BERT is compared in float32.
TOL = {"float32": 1e-5, "float64": 1e-12}


@contextlib.contextmanager
def quiet_torch(threads: int = 1):
    """One torch thread (deterministic, CI-friendly) and transformers warnings off; restores both."""
    import torch
    import transformers

    old_threads = torch.get_num_threads()
    old_verbosity = transformers.logging.get_verbosity()
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        transformers.logging.set_verbosity(old_verbosity)


def supported_activations() -> list[str]:
    """Activation names both refjax and this transformers' ACT2FN implement."""
    from transformers.activations import ACT2FN

    from refjax.params.config import ACTIVATIONS

    return [a for a in ACTIVATIONS if a in ACT2FN]


def reinit_(model, seed: int, scale: float = 0.2) -> None:
    """Re-initialise every parameter with a large scale so attention is peaked and every
    config flag changes the outputs visibly: weights and biases ~ N(0, scale), LayerNorm
    weights ~ 1 + N(0, scale). Tied parameters appear once and stay tied."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if isinstance(owner, torch.nn.LayerNorm) and name.endswith(".weight"):
                p.copy_(1.0 + scale * noise)
            else:
                p.copy_(scale * noise)
    model.tie_weights()


def build_hf_model(architecture: str, config_kwargs: Mapping[str, Any], seed: int):
    """A randomly initialised HF GPT-2 model of `architecture` in eval mode, eager attention."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**config_kwargs)
    model = getattr(transformers, architecture)._from_config(config, attn_implementation="eager")
    model.eval()
    reinit_(model, seed)
    return model


def hf_outputs(model, inputs: Mapping[str, np.ndarray], dtype) -> dict[str, Any]:
    """One no-grad forward with every output. Floating inputs are cast to `dtype` (a torch
    dtype); the model must already be in that dtype. Tuple fields become lists of arrays.

    `use_cache` is left at HF's default (config.use_cache = True) and the returned cache is
    dropped. Not `use_cache=False`: in transformers 4.57, a call with use_cache=False and no
    attention_mask treats non-consecutive position_ids as *packed sequences* (block-diagonal
    mask, masking_utils.find_packed_sequence_indices); the default call does not, and
    refjax follows the default call."""
    import torch

    kwargs = {}
    for k, v in inputs.items():
        t = torch.from_numpy(np.asarray(v))
        kwargs[k] = t.to(dtype) if t.is_floating_point() else t
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True, output_attentions=True, return_dict=True)
    result: dict[str, Any] = {}
    for field, value in out.items():
        if field == "past_key_values":
            continue
        if isinstance(value, torch.Tensor):
            result[field] = value.detach().numpy().copy()
        elif isinstance(value, tuple):
            result[field] = [t.detach().numpy().copy() for t in value]
        else:
            raise TypeError(f"unexpected HF output field {field}: {type(value).__name__}")
    return result


def scaled_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max(max |theirs|, 1); NaNs must sit at the same places, and a
    non-empty tensor must have at least one entry that is not NaN (NaN on both sides
    everywhere compares nothing and fails)."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    nan_ours, nan_theirs = np.isnan(ours), np.isnan(theirs)
    if not np.array_equal(nan_ours, nan_theirs):
        raise AssertionError(f"NaN pattern differs: ours has {nan_ours.sum()} NaN(s), HF has {nan_theirs.sum()}")
    finite = ~nan_theirs
    if not finite.any():
        if theirs.size:
            raise AssertionError(f"every one of the {theirs.size} entries is NaN on both sides: nothing compared")
        return 0.0
    scale = max(float(np.max(np.abs(theirs[finite]))), 1.0)
    return float(np.max(np.abs(ours[finite] - theirs[finite]))) / scale


def assert_close(name: str, ours, theirs, tol: float) -> float:
    """Shapes equal and scaled_error <= tol; returns the error. The message names the
    tensor and the worst index."""
    ours = np.asarray(ours)
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} (refjax) vs {theirs.shape} (HF)"
    err = scaled_error(ours, theirs)
    if not err <= tol:
        diff = np.abs(np.nan_to_num(ours.astype(np.float64)) - np.nan_to_num(theirs.astype(np.float64)))
        where = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.ndim else ()
        raise AssertionError(
            f"{name}: scaled error {err:.3g} > {tol:.1g} at {where}: refjax {ours[where]!r} vs HF {theirs[where]!r}")
    return err


LABEL_KINDS = ("lm", "token", "single", "regression", "multi", "choice", "span")


def random_labels(kind: str, rng, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                  num_labels: int = 3) -> dict[str, np.ndarray]:
    """One head's labels for a batch, including what HF ignores. "lm": the ids, -100 at pads
    and position 0; "token": [B, T] classes, -100 at pads; "single" [B] int; "regression"
    [B] float32 (num_labels 1); "multi" [B, num_labels] 0/1 float32; "choice" [B] over the C
    of [B, C, T] ids; "span": start/end positions [B] with one of each beyond T (HF clamps
    it to T, its ignore_index)."""
    B, T = input_ids.shape[0], input_ids.shape[-1]
    real = np.ones(input_ids.shape, bool) if attention_mask is None else attention_mask == 1
    if kind == "lm":
        labels = np.where(real, input_ids, -100)
        labels[..., 0] = -100
        return {"labels": labels.astype(np.int64)}
    if kind == "token":
        return {"labels": np.where(real, rng.integers(0, num_labels, input_ids.shape), -100).astype(np.int64)}
    if kind == "single":
        return {"labels": rng.integers(0, num_labels, (B,)).astype(np.int64)}
    if kind == "regression":
        return {"labels": rng.normal(size=(B,)).astype(np.float32)}
    if kind == "multi":
        return {"labels": (rng.random((B, num_labels)) < 0.5).astype(np.float32)}
    if kind == "choice":
        return {"labels": rng.integers(0, input_ids.shape[1], (B,)).astype(np.int64)}
    if kind == "span":
        start, end = rng.integers(0, T, (B,)), rng.integers(0, T, (B,))
        start[0], end[-1] = T + 2, T + 5  # clamped to T: ignored
        return {"start_positions": start.astype(np.int64), "end_positions": end.astype(np.int64)}
    raise ValueError(f"unknown label kind {kind!r} (one of {LABEL_KINDS})")


def hf_generate(model, ids, mask, max_new_tokens, pad, eos):
    import torch

    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=eos, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences.numpy(), np.stack([t.float().numpy() for t in out.logits], 1)  # [B, n, V]


# A generated token may differ from HF's only at a near-tie: HF's top two float32 logits
# within NEAR_TIE_ULPS units in the last place of the larger one. Both sides compute the
# logits in float32 with sums in different orders; the last rounding alone moves a logit by
# half an ulp, a 2-layer tiny model's chain by a few. Larger gaps are real disagreements.
NEAR_TIE_ULPS = 4


def near_tie_bound(top: float) -> float:
    """NEAR_TIE_ULPS float32 ulps at the magnitude of the top logit."""
    return NEAR_TIE_ULPS * float(np.spacing(np.float32(abs(top))))


def assert_same_tokens(ours: np.ndarray, theirs: np.ndarray, hf_logits: np.ndarray, T0: int,
                       hf_continue=None, pad: int | None = None) -> int:
    """refjax's greedy tokens [B, T0 + n] against HF's, row by row; returns the number of
    accepted near-ties (0: identical).

    A row may first differ from HF's at a generated step only where HF's top two logits are
    within `near_tie_bound`, and refjax's token must be HF's runner-up there. The row's
    remaining tokens are then still checked: `hf_continue(row, ids [1, t], n)` (HF's greedy
    generation of n tokens from refjax's prefix of that row, returning (sequences, step
    logits) like `hf_generate`; see `hf_continuation`) must give refjax's continuation,
    again up to near-ties. Without
    `hf_continue` a near-tie fails. Where one side's sequences are longer (HF stops when
    every row has finished), the extra tokens must be `pad`."""
    accepted = 0
    for row in range(ours.shape[0]):
        accepted += _same_row(ours[row], theirs[row], hf_logits[row], T0, hf_continue, pad, row, f"row {row}")
    return accepted


def _same_row(ours: np.ndarray, theirs: np.ndarray, hf_logits: np.ndarray, T0: int, hf_continue, pad,
              row: int, where: str) -> int:
    n = min(len(ours), len(theirs))
    for extra in (ours[n:], theirs[n:]):
        assert pad is not None and np.all(extra == pad) or not extra.size, (
            f"{where}: refjax generated {len(ours) - T0} tokens, HF {len(theirs) - T0}:\n{ours}\n{theirs}")
    diff = np.flatnonzero(ours[:n] != theirs[:n])
    if not diff.size:
        return 0
    col = int(diff[0])
    assert col >= T0, f"{where}: prompt differs at {col}:\n{ours}\n{theirs}"
    step = hf_logits[col - T0].astype(np.float32)
    order = np.argsort(step, kind="stable")
    top, second = step[order[-1]], step[order[-2]]
    gap, bound = float(top) - float(second), near_tie_bound(top)
    context = f"{where}, step {col - T0}: refjax {ours[col]}, HF {theirs[col]}"
    assert gap <= bound, f"{context}; HF top-2 logit gap {gap:.3g} > {bound:.3g} ({NEAR_TIE_ULPS} ulps):\n{ours}\n{theirs}"
    runner_up = np.flatnonzero(step == second)  # exactly equal logits: any of them
    assert ours[col] in runner_up, f"{context}: not HF's runner-up {runner_up.tolist()} (near-tie gap {gap:.3g})"
    assert hf_continue is not None, f"{context}: near-tie (gap {gap:.3g}) but no hf_continue to check what follows"
    if col + 1 == len(ours):
        return 1
    more, more_logits = hf_continue(row, ours[None, :col + 1], len(ours) - col - 1)
    return 1 + _same_row(ours, more[0], more_logits[0], col + 1, hf_continue, pad, row,
                         where + f" after step {col - T0}")


def hf_continuation(make_model, prompt_mask: np.ndarray, pad, eos):
    """`hf_continue` for `assert_same_tokens`: HF greedy generation from one row's prefix
    (prompt mask of that row, ones over the generated part) on `make_model()`."""
    def run(row: int, ids: np.ndarray, n: int):
        T0 = prompt_mask.shape[1]
        mask = np.concatenate([prompt_mask[row], np.ones(ids.shape[1] - T0, prompt_mask.dtype)])[None]
        return hf_generate(make_model(), ids, mask, n, pad, eos)
    return run


def leaves_by_path(tree) -> dict[str, Any]:
    """{keystr(path): leaf} of a pytree (paths are unique, so nothing is lost)."""
    import jax

    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_tree(got, want, check) -> int:
    """Pair two pytrees' leaves by path: the same non-empty set of paths (a missing or extra
    leaf fails, naming it), then `check(path, got_leaf, want_leaf)` on each pair. Returns
    the number of leaves compared."""
    got, want = leaves_by_path(got), leaves_by_path(want)
    assert want, "the expected tree has no leaves: nothing to compare"
    assert got.keys() == want.keys(), (f"leaves differ: missing {sorted(want.keys() - got.keys())}, "
                                       f"extra {sorted(got.keys() - want.keys())}")
    for path in want:
        check(path, got[path], want[path])
    return len(want)
