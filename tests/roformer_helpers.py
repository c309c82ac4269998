"""Shared helpers for the RoFormer tests: random raw configs over the options, random params,
one jitted forward. No torch here (the core-tier property tests import this file).

A drawn config is a *raw* config.json dict that both `parse_roformer_config` and HF's
`transformers.RoFormerConfig(**raw)` accept, so the reference tier draws the same space.
Tolerances (relative, as ref.verify): FP32_TOL = 1e-5, FP64_TOL = 1e-12.
"""

from __future__ import annotations

from numerics import assert_close, rel_err  # noqa: F401  (re-exported to the tests)

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from refjax.params import roformer as roformer_params
from refjax import roformer

FP32_TOL = 1e-5
FP64_TOL = 1e-12
ARCHITECTURES = roformer_params.ROFORMER_ARCHITECTURES
ACTIVATIONS = ("gelu", "relu", "gelu_new", "silu")

FWD = jax.jit(roformer.forward, static_argnames=("config", "output_hidden_states", "output_attentions", "taps",
                                                 "fast", "remat"))
SEEDS = st.integers(0, 2**31 - 1)


@st.composite
def raw_configs(draw, architecture: str | None = None, is_decoder: bool | None = None) -> dict:
    """A tiny RoFormer config.json dict: heads 1-4 of even head_dim, embedding_size equal to or
    different from hidden_size, rotary_value, is_decoder, activations, tying."""
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    hidden = heads * head_dim
    arch = architecture or draw(st.sampled_from(ARCHITECTURES))
    raw = dict(
        model_type="roformer", architectures=[arch], vocab_size=draw(st.integers(8, 40)), hidden_size=hidden,
        embedding_size=draw(st.sampled_from([hidden, max(2, hidden // 2), hidden + 4])),
        num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
        intermediate_size=draw(st.integers(4, 24)), hidden_act=draw(st.sampled_from(ACTIVATIONS)),
        max_position_embeddings=draw(st.integers(16, 40)), type_vocab_size=draw(st.integers(1, 3)),
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5])), rotary_value=draw(st.booleans()),
        is_decoder=draw(st.booleans()) if is_decoder is None else is_decoder,
        tie_word_embeddings=draw(st.booleans()), pad_token_id=0, num_labels=draw(st.integers(1, 4)),
    )
    if arch == "RoFormerForCausalLM" and is_decoder is None:
        raw["is_decoder"] = True
    return raw


def random_params(config, key, dtype=jnp.float32, scale: float = 0.3):
    """Random weights for every leaf (LayerNorm scales around 1); the sinusoidal table is HF's."""
    tree = roformer_params.skeleton(config, dtype)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    params = jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, dtype) * scale for k, l in zip(keys, leaves)])
    table = jnp.asarray(roformer_params.sinusoidal_table(config.max_position_embeddings, config.head_dim), dtype)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: table if "embed_positions" in jax.tree_util.keystr(path) else
        (x + 1 if "LayerNorm" in jax.tree_util.keystr(path) and "scale" in jax.tree_util.keystr(path) else x),
        params)


def random_inputs(config, rng: np.random.Generator, batch: int, seq: int, pad: str = "right"):
    """(input_ids, attention_mask, token_type_ids) [B, T] with one padded row (B > 1)."""
    ids = rng.integers(1, config.vocab_size, size=(batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    if batch > 1 and seq > 2:
        n = int(rng.integers(1, seq - 1))
        if pad == "right":
            mask[-1, seq - n:] = 0
        else:
            mask[-1, :n] = 0
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    types = rng.integers(0, config.type_vocab_size, size=(batch, seq)).astype(np.int32)
    return ids, mask, types
