"""RoFormer invariants (core tier, no torch): the rotary layout against ref/rotary.py's Llama
form, relative-position scores, padding and causality, cached decoding == full forward,
jit == eager, scan == loop over layers, batch independence, the sinusoidal table of the
golden checkpoints, and finite gradients. Tolerances: fp64 1e-12 unless stated.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import GOLDEN
from refjax.params import roformer as roformer_params
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_checkpoint_tensors
from refjax.params.roformer import parse_roformer_config
from refjax import roformer, rotary
from refjax.attention import mask_for
from refjax.shell import Tokens
from refjax.tooling.families import FAMILIES
from roformer_helpers import FP64_TOL, FWD, SEEDS, assert_close, random_inputs, random_params, raw_configs


def hsettings(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def build(raw, seed, dtype=jnp.float64):
    config = parse_roformer_config(raw)
    return config, random_params(config, jax.random.PRNGKey(seed % 2**31), dtype)


@hsettings(5)
@given(half=st.integers(1, 8), positions=st.lists(st.integers(0, 47), min_size=1, max_size=6), seed=SEEDS)
def test_pairwise_rotation_is_rotate_half_after_deinterleaving(half, positions, seed):
    """RoFormer rotates (x_2i, x_2i+1); Llama (ref/rotary.py) rotates (x_i, x_i+d/2) with
    cos/sin laid out [f | f]: the same rotation once features are permuted to [even | odd]."""
    H = 2 * half
    table = jnp.asarray(roformer_params.sinusoidal_table(48, H), jnp.float64)
    pos = jnp.asarray(positions, jnp.int32)
    x = jax.random.normal(jax.random.PRNGKey(seed), (1, len(positions), 3, H), jnp.float64)
    sin, cos = roformer.sinusoidal_positions(table, pos)
    ours = roformer.apply_rotary(x, sin, cos)
    perm = jnp.concatenate([jnp.arange(0, H, 2), jnp.arange(1, H, 2)])
    half_sin, half_cos = sin[:, ::2], cos[:, ::2]  # [T, H/2]
    llama = rotary.apply_rotary(x[..., perm], jnp.concatenate([half_cos] * 2, -1)[None],
                                jnp.concatenate([half_sin] * 2, -1)[None])
    assert_close(ours[..., perm], llama, 1e-15, "rotation")


@hsettings(5)
@given(m=st.integers(0, 30), n=st.integers(0, 30), shift=st.integers(0, 16), seed=SEEDS)
def test_rotated_scores_depend_only_on_relative_position(m, n, shift, seed):
    """<R_m q, R_n k> = <R_{m+s} q, R_{n+s} k> (the RoFormer property, float32-rounded table:
    equal to ~1e-6)."""
    table = jnp.asarray(roformer_params.sinusoidal_table(48, 8), jnp.float64)
    q, k = jax.random.normal(jax.random.PRNGKey(seed), (2, 1, 1, 1, 8), jnp.float64)

    def score(a, b):
        sa, ca = roformer.sinusoidal_positions(table, jnp.asarray([a]))
        sb, cb = roformer.sinusoidal_positions(table, jnp.asarray([b]))
        return jnp.sum(roformer.apply_rotary(q, sa, ca) * roformer.apply_rotary(k, sb, cb))

    assert abs(float(score(m, n) - score(m + shift, n + shift))) < 1e-5 * float(jnp.sum(q * q) + jnp.sum(k * k))


def test_golden_tables_equal_hf_recomputed_and_a_missing_table_is_recomputed(tmp_path):
    case = os.path.join(GOLDEN, "roformer", "mlm")
    ckpt = load_checkpoint(case)
    want = roformer_params.sinusoidal_table(ckpt.config.max_position_embeddings, ckpt.config.head_dim)
    np.testing.assert_array_equal(np.asarray(ckpt.params.roformer.encoder.embed_positions.table), want)
    tensors = {k: np.asarray(v) for k, v in read_checkpoint_tensors(case).items()
               if not k.endswith("embed_positions.weight")}
    from refjax.params.io import write_safetensors
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(case, "config.json")).read())
    again = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(np.asarray(again.params.roformer.encoder.embed_positions.table), want)


@hsettings(2)
@given(raw=raw_configs(is_decoder=False), seed=SEEDS)
def test_encoder_right_padding_invariance_and_batch_independence(raw, seed):
    """Extra right pads (mask 0) change no real token's output; each row alone equals its row
    in the batch."""
    config, params = build(dict(raw, architectures=["RoFormerModel"]), seed)
    rng = np.random.default_rng(seed)
    ids, mask, types = random_inputs(config, rng, 2, 6)
    mask[:] = 1
    full = FWD(params, config, ids, mask, token_type_ids=types).last_hidden_state
    pad = 3
    ids_p = np.concatenate([ids, np.zeros((2, pad), np.int32)], 1)
    mask_p = np.concatenate([mask, np.zeros((2, pad), np.int32)], 1)
    types_p = np.concatenate([types, np.zeros((2, pad), np.int32)], 1)
    padded = FWD(params, config, ids_p, mask_p, token_type_ids=types_p).last_hidden_state
    assert_close(padded[:, :6], full, FP64_TOL, "right padding")
    alone = FWD(params, config, ids[1:], mask[1:], token_type_ids=types[1:]).last_hidden_state
    assert_close(alone, full[1:], FP64_TOL, "batch row")


@hsettings(3)
@given(raw=raw_configs(is_decoder=True), seed=SEEDS)
def test_decoder_causality(raw, seed):
    config, params = build(dict(raw, architectures=["RoFormerModel"]), seed)
    rng = np.random.default_rng(seed)
    ids, mask, types = random_inputs(config, rng, 2, 7)
    out = FWD(params, config, ids, mask, token_type_ids=types).last_hidden_state
    ids2 = ids.copy()
    ids2[:, 4:] = rng.integers(1, config.vocab_size, size=(2, 3))
    out2 = FWD(params, config, ids2, mask, token_type_ids=types).last_hidden_state
    assert_close(out2[:, :4], out[:, :4], FP64_TOL, "past must not see the future")


@hsettings(2)
@given(raw=raw_configs("RoFormerForCausalLM", is_decoder=True), seed=SEEDS, split=st.integers(1, 6))
def test_cached_decoding_equals_full_forward(raw, seed, split):
    config, params = build(raw, seed)
    rng = np.random.default_rng(seed)
    ids, mask, types = random_inputs(config, rng, 2, 7, pad="left")
    full = FWD(params, config, ids, mask, token_type_ids=types).logits
    cache = roformer.init_cache(config, 2, 10, jnp.float64)
    a = FWD(params, config, ids[:, :split], mask[:, :split], token_type_ids=types[:, :split], cache=cache)
    pieces = [a.logits]
    cache = a.cache
    for t in range(split, 7):  # then one token at a time
        step = FWD(params, config, ids[:, t:t + 1], mask[:, t:t + 1], token_type_ids=types[:, t:t + 1], cache=cache)
        pieces.append(step.logits)
        cache = step.cache
    # at real tokens; a left-pad query attends uniformly to whatever keys exist, which differ
    # between one call and chunks (HF alike), and no real token reads a pad query's output
    real = mask.astype(bool)
    assert_close(np.asarray(jnp.concatenate(pieces, 1))[real], np.asarray(full)[real], FP64_TOL, "cached vs full")


@hsettings(1)
@given(raw=raw_configs("RoFormerForCausalLM", is_decoder=True), seed=SEEDS)
def test_greedy_generate_equals_repeated_full_forwards(raw, seed):
    raw = dict(raw, max_position_embeddings=40)
    config, params = build(raw, seed, jnp.float32)
    rng = np.random.default_rng(seed)
    ids, mask, _ = random_inputs(config, rng, 2, 5, pad="left")
    seqs = np.asarray(FAMILIES["roformer"].generate(params, config, ids, mask, max_new_tokens=4))
    cur, cur_mask = ids, mask
    for _ in range(4):
        with jax.default_matmul_precision("highest"):
            logits = roformer.forward(params, config, cur, cur_mask).logits
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1)).astype(np.int32)
        cur = np.concatenate([cur, nxt[:, None]], 1)
        cur_mask = np.concatenate([cur_mask, np.ones((2, 1), np.int32)], 1)
    np.testing.assert_array_equal(seqs, cur)


@hsettings(1)
@given(raw=raw_configs("RoFormerForCausalLM", is_decoder=True), seed=SEEDS)
def test_unstacked_layers_give_the_same_outputs_cache_and_tokens(raw, seed):
    """`unstack_layers` (a loop over per-layer params instead of a scan over the stack) is a
    re-layout, not new math: logits, hidden states, attentions and the cache equal the
    stacked forward's (fp64, 1e-12: XLA may schedule reductions differently), eager and
    jitted; greedy generation decodes the same tokens."""
    raw = dict(raw, max_position_embeddings=40)
    config, params = build(raw, seed)
    unstacked = roformer.unstack_layers(params)
    assert isinstance(unstacked.roformer.encoder.layer, tuple)
    ids, mask, types = random_inputs(config, np.random.default_rng(seed), 2, 6, pad="left")
    kw = dict(token_type_ids=types, cache=roformer.init_cache(config, 2, 8, jnp.float64), output_hidden_states=True,
              output_attentions=True)
    stacked = roformer.forward(params, config, ids, mask, **kw)
    for out in (roformer.forward(unstacked, config, ids, mask, **kw), FWD(unstacked, config, ids, mask, **kw)):
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(stacked), strict=True):
            assert_close(a, b, FP64_TOL, "unstacked vs stacked")
    seqs = [FAMILIES["roformer"].generate(p, config, ids, mask, max_new_tokens=2) for p in (unstacked, params)]
    np.testing.assert_array_equal(np.asarray(seqs[0]), np.asarray(seqs[1]))


@hsettings(2)
@given(raw=raw_configs(), seed=SEEDS)
def test_jit_equals_eager_and_scan_equals_layer_loop(raw, seed):
    config, params = build(raw, seed)
    rng = np.random.default_rng(seed)
    ids, mask, types = random_inputs(config, rng, 2, 5)
    kw = {}
    if config.architecture == "RoFormerForMultipleChoice":
        ids, mask, types = ids[None], mask[None], types[None]
    jitted = FWD(params, config, ids, mask, token_type_ids=types, output_hidden_states=True, **kw)
    eager = roformer.forward(params, config, ids, mask, token_type_ids=types, output_hidden_states=True)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):  # XLA may fuse differently: 1e-12
        assert_close(a, b, FP64_TOL, "jit vs eager")
    # the scan over stacked layers equals applying roformer.layer one layer at a time
    flat_ids, flat_mask, flat_types = (np.reshape(a, (-1, a.shape[-1])) for a in (ids, mask, types))
    tokens = Tokens(input_ids=jnp.asarray(flat_ids), token_type_ids=jnp.asarray(flat_types))
    x = roformer.embed(params.roformer.embeddings, params.roformer.embeddings_project, config, tokens)
    B, T = flat_ids.shape
    mask_ = mask_for(jnp.asarray(flat_mask), B, T, causal=config.is_decoder)
    sin, cos = roformer.sinusoidal_positions(params.roformer.encoder.embed_positions.table,
                                             jnp.arange(T, dtype=jnp.int32))
    for i in range(config.num_hidden_layers):
        layer = jax.tree.map(lambda a: a[i], params.roformer.encoder.layer)
        x = roformer.layer(layer, config, x, sin, cos, mask_).x
    assert_close(x, eager.hidden_states[-1], FP64_TOL, "layer loop")


@hsettings(1)
@given(raw=raw_configs("RoFormerForMaskedLM"), seed=SEEDS)
def test_rotary_value_changes_outputs_and_grads_are_finite(raw, seed):
    assume(raw["hidden_size"] >= 4)  # a LayerNorm over 2 features outputs only +-1 patterns: may hide the change
    config, params = build(dict(raw, rotary_value=False), seed)
    rng = np.random.default_rng(seed)
    ids, mask, types = random_inputs(config, rng, 2, 6)
    a = FWD(params, config, ids, mask, token_type_ids=types).logits
    b = FWD(params, dataclasses.replace(config, rotary_value=True), ids, mask, token_type_ids=types).logits
    assert float(jnp.max(jnp.abs(a - b))) > 1e-6
    labels = np.where(mask == 1, ids, -100)
    grads = jax.grad(lambda p: roformer.forward(p, config, ids, mask, token_type_ids=types, labels=labels).loss)(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_fast_attention_path_equals_readable_path_on_real_tokens():
    """`fast=True` (jax.nn.dot_product_attention) for the encoder and decoder masks (with a
    cache too), in float32 within 1e-5 as tests/test_fast_path.py (JAX's fused attention mixes
    fp32 into fp64); compared at real tokens (a fully padded query row is implementation-defined)."""
    for is_decoder, pad in ((False, "right"), (True, "left")):
        raw = dict(model_type="roformer", architectures=["RoFormerForCausalLM" if is_decoder else "RoFormerModel"],
                   vocab_size=30, hidden_size=16, embedding_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=20, max_position_embeddings=24, rotary_value=True, is_decoder=is_decoder)
        config, params = build(raw, 3, jnp.float32)
        ids, mask, types = random_inputs(config, np.random.default_rng(3), 3, 7, pad=pad)
        real = mask.astype(bool)
        with jax.default_matmul_precision("highest"):
            slow = roformer.forward(params, config, ids, mask, token_type_ids=types)
            fast = roformer.forward(params, config, ids, mask, token_type_ids=types, fast=True)
        assert_close(np.asarray(fast.last_hidden_state)[real], np.asarray(slow.last_hidden_state)[real], 1e-5,
                     "fast path")
        if is_decoder:  # with a cache: prefill 4 tokens, then the rest
            cache = roformer.init_cache(config, 3, 7, jnp.float32)
            with jax.default_matmul_precision("highest"):
                first = roformer.forward(params, config, ids[:, :4], mask[:, :4], token_type_ids=types[:, :4],
                                         cache=cache, fast=True)
                rest = roformer.forward(params, config, ids[:, 4:], mask[:, 4:], token_type_ids=types[:, 4:],
                                        cache=first.cache, fast=True)
            cached = np.concatenate([np.asarray(first.last_hidden_state), np.asarray(rest.last_hidden_state)], 1)
            assert_close(cached[real], np.asarray(slow.last_hidden_state)[real], 1e-5, "fast path with a cache")
