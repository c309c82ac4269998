"""Shared helpers for the GPT-2 property tests: small random configs, random params,
a jitted forward, and the tolerance convention of ref/verify.py.

Tolerances (relative, as ref.verify: max|a - b| <= tol * max(max|b|, 1)):
    FP32_TOL = 1e-5, FP64_TOL = 1e-12.
"""

from __future__ import annotations

from numerics import assert_close, rel_err  # noqa: F401  (re-exported to the tests)

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from refjax.params import gpt2 as gpt2_params
from refjax.params.gpt2 import parse_gpt2_config
from refjax import gpt2

FP32_TOL = 1e-5
FP64_TOL = 1e-12
TOL = {jnp.dtype(jnp.float32): FP32_TOL, jnp.dtype(jnp.float64): FP64_TOL}

ARCHITECTURES = ("GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
                 "GPT2ForTokenClassification", "GPT2ForQuestionAnswering")
LM_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2DoubleHeadsModel")
# A few HF ACT2FN names with different shapes (smooth, saturating, piecewise linear).
ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu", "tanh", "quick_gelu")
SMOOTH_ACTIVATIONS = ("gelu_new", "gelu", "silu", "tanh", "quick_gelu")  # for finite-difference checks

# One jitted forward for every test: jit caches per (config, shapes, dtypes), so a config
# is compiled once per input shape and reused by every call with that shape.
FWD = jax.jit(gpt2.forward, static_argnames=("config", "output_hidden_states", "output_attentions", "taps"))


def build_config(architecture: str = "GPT2LMHeadModel", *, n_layer: int = 2, n_head: int = 2, head_dim: int = 4,
                 vocab_size: int = 32, n_positions: int = 32, activation_function: str = "gelu_new",
                 scale_attn_weights: bool = True, scale_attn_by_inverse_layer_idx: bool = False,
                 reorder_and_upcast_attn: bool = False, num_labels: int = 2, pad_token_id: int | None = None,
                 eos_token_id: int | None = None, tie_word_embeddings: bool = True, **extra):
    """A GPT2Config built through the public config.json parser."""
    raw = dict(model_type="gpt2", architectures=[architecture], n_layer=n_layer, n_head=n_head,
               n_embd=n_head * head_dim, vocab_size=vocab_size, n_positions=n_positions,
               activation_function=activation_function, scale_attn_weights=scale_attn_weights,
               scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx,
               reorder_and_upcast_attn=reorder_and_upcast_attn, num_labels=num_labels,
               pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
               tie_word_embeddings=tie_word_embeddings, **extra)
    return parse_gpt2_config(raw)


@st.composite
def configs(draw, architecture: str = "GPT2LMHeadModel", activations=ACTIVATIONS, n_layer=(1, 3), n_head=(1, 4),
            head_dim=(2, 8), vocab=(16, 64), n_positions=(16, 48), **fixed):
    """Random small GPT-2 configs: every attention flag and a few activations."""
    kwargs = dict(
        n_layer=draw(st.integers(*n_layer)),
        n_head=draw(st.integers(*n_head)),
        head_dim=draw(st.integers(*head_dim)),
        vocab_size=draw(st.integers(*vocab)),
        n_positions=draw(st.integers(*n_positions)),
        activation_function=draw(st.sampled_from(activations)),
        scale_attn_weights=draw(st.booleans()),
        scale_attn_by_inverse_layer_idx=draw(st.booleans()),
        reorder_and_upcast_attn=draw(st.booleans()),
    )
    kwargs.update(fixed)
    return build_config(architecture, **kwargs)


def random_params(config, seed: int, dtype=jnp.float64, std: float = 0.3):
    """Random params for `config`: every leaf N(0, std) (std 0.3: peaked attention), except
    LayerNorm scales, which are 1 + N(0, std) so the norms stay well conditioned.
    Drawn with numpy (jax.random would compile one kernel per leaf shape: seconds per config)."""
    skeleton = gpt2_params.skeleton(config, dtype)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, leaf in paths_leaves:
        value = rng.normal(0.0, std, leaf.shape)
        name = jax.tree_util.keystr(path)
        if ".ln_" in name and name.endswith(".scale"):
            value = value + 1.0
        leaves.append(jnp.asarray(value, dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def with_head(params, config, architecture: str, seed: int, num_labels: int | None = None, dtype=jnp.float64):
    """(config, params) for another head on the same body: head params are random."""
    import dataclasses

    kw = {"architecture": architecture}
    if num_labels is not None:
        kw["num_labels"] = num_labels
    new_config = dataclasses.replace(config, **kw)
    fresh = random_params(new_config, seed, dtype)
    return new_config, type(fresh)(transformer=params.transformer, lm_head=fresh.lm_head,
                                   multiple_choice_head=fresh.multiple_choice_head, score=fresh.score,
                                   classifier=fresh.classifier, qa_outputs=fresh.qa_outputs)


def prompt_positions_np(mask: np.ndarray) -> np.ndarray:
    """HF generate's position ids: cumsum(mask) - 1, pads 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int32)


def left_padded_mask(lengths, total: int) -> np.ndarray:
    """[B, total] int32 mask with lengths[b] real tokens at the right end of each row."""
    mask = np.zeros((len(lengths), total), np.int32)
    for b, n in enumerate(lengths):
        mask[b, total - n:] = 1
    return mask


def count_gpt2_params(config) -> int:
    """Number of parameters of the GPT-2 body (tied LM head adds none), counted by hand from the
    sizes: an independent check of the skeleton (tests/test_io.py)."""
    d, inner, L = config.n_embd, config.inner_dim, config.n_layer
    per_layer = (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (inner * d + inner) + (inner * d + d)
    return config.vocab_size * d + config.n_positions * d + L * per_layer + 2 * d
