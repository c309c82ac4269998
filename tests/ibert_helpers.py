"""Shared helpers for the I-BERT tests: build a seeded HF I-BERT (optionally calibrated in
train mode, as tools/golden_ibert.py does), save it, and load it with refjax; jitted
forward and calibrate; the integer encoder on raw ids; IntSoftmax with a fixed range."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from refjax import ibert, ibert_int, quant
from refjax.shell import Tokens

# Jitted once per (config, shapes, options): an eager quant-mode call recompiles the layer
# scan and its summation scans every time. The library's forward stays a plain function.
forward = jax.jit(ibert.forward, static_argnames=("config", "output_hidden_states", "output_attentions", "taps",
                                                  "propagate_scales", "integer"))
calibrate = jax.jit(ibert.calibrate, static_argnames=("config", "propagate_scales"))


def integer_encoder(params, config, state, input_ids, attention_mask=None, taps=False) -> ibert_int.IntEncoding:
    """`ibert_int.integer_encoder` on [B, T] ids, with HF's default positions and token types."""
    tokens = Tokens(input_ids=jnp.asarray(input_ids),
                    attention_mask=None if attention_mask is None else jnp.asarray(attention_mask))
    return ibert_int.integer_encoder(params.ibert, config, state, ibert.with_defaults(config, tokens), taps=taps)


def int_softmax(x, scale, act_min, act_max):
    """HF's `IntSoftmax` (eval) with its 16-bit QuantAct's range fixed: i-exp, requantize,
    normalize -> (probs q * 2^-8, scale [1])."""
    exp_int, exp_scale = quant.int_softmax_exp(x, scale)
    exp, exp_scale = quant.quant_act(exp_int, 16, act_min, act_max, pre_scale=exp_scale)
    return quant.int_softmax_normalize(exp, exp_scale)


def build_and_save(arch: str, config_kwargs: dict, seed: int, calibration: list[dict] | None = None,
                   patch=None):
    """HF model (eval mode) saved to a temp dir -> (model, directory). `patch(model)` is
    applied before calibration (e.g. `propagate_hf_scales`). One torch thread and
    transformers warnings off while building (quiet_torch), both restored after."""
    from hf_helpers import quiet_torch

    with quiet_torch():
        return _build_and_save(arch, config_kwargs, seed, calibration, patch)


def _build_and_save(arch: str, config_kwargs: dict, seed: int, calibration: list[dict] | None, patch):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.IBertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config_kwargs)
    model = getattr(transformers, arch)(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            ln = name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight")
            p.copy_((1.0 if ln else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    model.tie_weights()
    if patch is not None:
        patch(model)
    if calibration:
        model.train()
        with torch.no_grad():
            for batch in calibration:
                model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    model.eval()
    directory = tempfile.mkdtemp(prefix="ibert-")
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def propagate_hf_scales(model):
    """tools/golden_ibert.py's patch (HF I-BERT handing each layer its true input scale),
    the one the `quant-propagated-*` goldens were made with."""
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    return importlib.import_module("golden_ibert").propagate_hf_scales(model)


def padded_batch(rng, shape, vocab, pad):
    """ids with pad_token_id where the mask is 0: one right-padded and one left-padded row."""
    mask = np.ones(shape, np.int64)
    flat = mask.reshape(-1, shape[-1])
    if flat.shape[0] > 1 and shape[-1] > 3:
        flat[0, -2:] = 0
        flat[-1, :2] = 0
    low = pad + 1
    ids = np.where(mask == 1, rng.integers(low, vocab, size=shape), pad).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


# The requantized activations of a layer, in the order the model computes them
REQUANTIZED = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.self.softmax",
               "attention.self", "attention.output", "pre_intermediate_act", "intermediate", "")


def first_divergence(fake_taps, int_taps, n_layers):
    """Fake-quant taps (ibert.forward(..., taps=True)) against the integer path's
    (ibert_int.integer_encoder(..., taps=True)): (layer, module, max |int - fake| in
    integer steps) at the first requantized activation where they differ, or None."""
    for layer in range(n_layers):
        for module in REQUANTIZED:
            name = f"encoder.layer.{module}" if module else "encoder.layer"
            ints, scale = int_taps[name]
            q = np.asarray(ints[layer], np.float64)
            fake = np.round(np.asarray(quant.div(jnp.asarray(fake_taps[name][layer]), scale[layer]), np.float64))
            if not np.array_equal(fake, q):
                return layer, module, float(np.abs(fake - q).max())
    return None
