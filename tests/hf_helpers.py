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

# Tolerances of the live comparison: |refjax - hf| <= TOL * max(max|hf|, 1), per tensor.
TOL = {"float32": 1e-5, "float64": 1e-10}


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
    """max |ours - theirs| / max(max |theirs|, 1); NaNs must sit at the same places."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    nan_ours, nan_theirs = np.isnan(ours), np.isnan(theirs)
    if not np.array_equal(nan_ours, nan_theirs):
        raise AssertionError(f"NaN pattern differs: ours has {nan_ours.sum()} NaN(s), HF has {nan_theirs.sum()}")
    finite = ~nan_theirs
    if not finite.any():
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


def hf_generate(model, ids, mask, max_new_tokens, pad, eos):
    import torch

    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=eos, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences.numpy(), np.stack([t.float().numpy() for t in out.logits], 1)  # [B, n, V]


def assert_same_tokens(ours: np.ndarray, theirs: np.ndarray, hf_logits: np.ndarray, T0: int) -> bool:
    """True when equal. A difference is accepted (False) only where HF's top two logits
    are within float32 rounding at the first differing step (a near-tie argmax)."""
    if ours.shape == theirs.shape and np.array_equal(ours, theirs):
        return True
    n = min(ours.shape[1], theirs.shape[1])
    diff = np.argwhere(ours[:, :n] != theirs[:, :n])
    assert diff.size, f"refjax generated {ours.shape[1] - T0} tokens, HF {theirs.shape[1] - T0}:\n{ours}\n{theirs}"
    row, col = diff[np.argmin(diff[:, 1])]
    step_logits = np.sort(hf_logits[row, col - T0])
    gap = step_logits[-1] - step_logits[-2]
    assert col >= T0 and gap < 1e-4 * max(1.0, abs(step_logits[-1])), (
        f"first difference at row {row}, step {col - T0} (HF top-2 logit gap {gap:.3g}):\n{ours}\n{theirs}")
    return False
