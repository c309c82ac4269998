"""I-BERT invariants: jit == eager (float and quant mode), float-mode padding invariance,
calibrate is a pure function, quant-mode softmax gives masked keys probability 0."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import GOLDEN
from ibert_helpers import calibrate, forward
from refjax.params import ibert as ibert_params
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors
from refjax import ibert

FLOAT = load_checkpoint(os.path.join(GOLDEN, "ibert", "seqcls"), dtype=jnp.float64)
QUANT = load_checkpoint(os.path.join(GOLDEN, "ibert", "quant-seqcls"), dtype=jnp.float32)


def test_jit_equals_eager_in_both_modes():
    """Quant mode: bit for bit. Float mode (fp64): within 1e-12, since under jit XLA rewrites
    the float LayerNorm's y / sqrt(eps + var) as y * rsqrt(eps + var): the embedding
    LayerNorm, run op by op when eager, differs by an ulp (measured 4.4e-16; the layer
    scan is compiled either way)."""
    ids = np.array([[5, 6, 7, 8], [9, 10, 1, 1]])
    mask = (ids != 1).astype(np.int64)
    for ck, tol in ((FLOAT, 1e-12), (QUANT, 0.0)):
        eager = ibert.forward(ck.params, ck.config, ids, mask, output_hidden_states=True)
        jitted = jax.jit(ibert.forward, static_argnames=("config", "output_hidden_states"))(
            ck.params, ck.config, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
        np.testing.assert_allclose(np.asarray(eager.hidden_states), np.asarray(jitted.hidden_states), rtol=0, atol=tol)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(1, 8), st.integers(1, 6))
def test_float_mode_trailing_pads_do_not_change_real_tokens(seed, T, extra):
    """RoBERTa positions skip pads and pads are masked: appending pad tokens leaves every
    real token's hidden state unchanged (fp64, 1e-12)."""
    c = FLOAT.config
    T = min(T, c.max_tokens - extra)
    ids = np.random.default_rng(seed).integers(3, c.vocab_size, size=(2, T))
    short = forward(FLOAT.params, c, ids, np.ones_like(ids), output_hidden_states=True)
    padded_ids = np.concatenate([ids, np.full((2, extra), c.pad_token_id)], axis=1)
    mask = (padded_ids != c.pad_token_id).astype(np.int64)
    long = forward(FLOAT.params, c, padded_ids, mask, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(long.hidden_states)[:, :, :T], np.asarray(short.hidden_states),
                               rtol=0, atol=1e-12)


def test_calibrate_is_pure():
    golden, _ = read_safetensors(os.path.join(GOLDEN, "ibert", "quant-seqcls", "golden.safetensors"))
    state = ibert_params.initial_state(QUANT.config)
    before = jax.tree.map(np.asarray, state)
    batch = {k: golden[f"calibrate.{k}.0"] for k in ("input_ids", "attention_mask")}
    a = calibrate(QUANT.params, QUANT.config, state, **batch)
    b = calibrate(QUANT.params, QUANT.config, state, **batch)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    assert not np.array_equal(np.asarray(a.layer["pre_output_act.x_max"]), before.layer["pre_output_act.x_max"])


def test_quant_softmax_gives_masked_keys_zero_probability():
    """A masked key's score is ~ -inf; i-exp clamps it at 30 * x0_int (2^-30 of the row's
    max), which the 16-bit requantization and the 8-bit output round to exactly 0: masked
    keys get probability 0 in HF's golden and in ours (bit for bit)."""
    golden, _ = read_safetensors(os.path.join(GOLDEN, "ibert", "quant-seqcls", "golden.safetensors"))
    mask = np.asarray(golden["attention_mask"])
    ours = forward(QUANT.params, QUANT.config, golden["input_ids"], mask, output_attentions=True)
    for i in range(QUANT.config.num_hidden_layers):
        probs = np.asarray(golden[f"float32/attentions.{i}"])  # [B, N, T, S]
        np.testing.assert_array_equal(np.asarray(ours.attentions[i]), probs)
        for row in range(mask.shape[0]):
            masked = probs[row][:, :, mask[row] == 0]
            assert np.all(masked == 0)
        assert probs.sum(-1).min() > 0.9  # the 8-bit floors lose at most a few 1/256 steps per row
