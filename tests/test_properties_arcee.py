"""Core-tier (no torch) property tests for Arcee (AFM-4.5B): hypothesis-drawn small random
configs (GQA head ratios, head_dim independent of hidden_size, every rope_scaling type,
biases, tying, relu2/silu/gelu) with random params, plus the real AFM-4.5B config.

Tolerances are stated where used; the convention is ref.verify's relative error
max|a - b| / max(max|b|, 1): FP64_TOL = 1e-12, FP32_TOL = 1e-5 (arcee_helpers). Properties
that hold bit for bit by construction (causality, rows of one compiled batch) use exact
equality.

HF semantics these tests pin down (see the Arcee section of the API brief):
- One additive finfo.min mask for pad and future keys: a query with no real key at or
  before it (a leading pad) attends uniformly to ALL keys, future ones included.
- dynamic and longrope RoPE take their frequencies from the call's L = max(position_ids) + 1,
  one value for the whole batch: rows of a batch share them, and cached decoding equals
  a full forward only when every call has the same frequencies.

Random params are N(0, 0.3) (RMSNorm scales 1 + N(0, 0.3)), so attention is peaked and a
wrong mask, head mapping or rotation moves outputs far beyond the tolerances.
Runtime: each drawn config compiles the forward once per input shape (~0.4 s with XLA's
optimisations off); max_examples are small to keep the file near two minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from arcee_helpers import (ARCHITECTURES, FIXED_FREQ_ROPE_TYPES, FP32_TOL, FP64_TOL, FWD, SEEDS, assert_close,
                           configs, fields, i32, left_padded_mask, parse, prompt_positions_np, random_params,
                           raw_configs, rel_err, rope_switch_length, with_head)
from conftest import DATA
from refjax.params import arcee as arcee_params
from refjax.params.arcee import parse_arcee_config
from refjax.params.io import count_params
from refjax import arcee, nn, rotary
from refjax.attention import FUTURE_FINFO_MIN, FUTURE_NEG_INF, causal_mask, mask_for, softmax_attention
from refjax.tooling.families import FAMILIES
from refjax.generate import Sampling

GENERATE = FAMILIES["arcee"].generate


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """Most time here is XLA compiling one tiny program per drawn config; skipping XLA's
    optimisation passes halves that. The properties are of the math, not of XLA's optimiser."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(autouse=True)
def release_executables():
    """Free this test's compiled programs afterwards. XLA:CPU maps ~6 memory regions per
    executable and never unmaps them while the jit caches hold them; this file alone
    compiles ~2,500 programs (~16,000 maps), and one pytest process running many such files
    reaches the kernel's vm.max_map_count (65,530) and segfaults inside the next compile.
    Drawn configs rarely repeat across tests, so clearing costs almost no recompilation."""
    yield
    jax.clear_caches()


def hsettings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


KW = dict(output_hidden_states=True, output_attentions=True)


# ---------------------------------------------------------------------------------------
# 1. Grouped-query attention == multi-head attention with K/V repeated (HF repeat_kv)
# ---------------------------------------------------------------------------------------

def np_attention(q, k, v, key_valid, causal, scale, future_fill):
    """Plain numpy fp64 multi-head eager attention as HF computes it: pad keys finfo.min,
    future keys -inf (GPT-2) or finfo.min (Llama-style). q [B,T,N,H], k/v [B,S,N,H]."""
    scores = np.einsum("btnh,bsnh->bnts", q, k) * scale
    lowest = np.finfo(np.float64).min
    masked = np.where(key_valid[:, None, None, :], scores, lowest)
    if causal is not None:
        masked = np.where(causal, masked, -np.inf if future_fill == FUTURE_NEG_INF else lowest)
    e = np.exp(masked - masked.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v), probs, scores


@st.composite
def gqa_shapes(draw):
    K = draw(st.integers(1, 4))
    G = draw(st.integers(1, 4))
    return dict(B=draw(st.integers(1, 2)), T=draw(st.integers(1, 6)), K=K, G=G, H=draw(st.integers(1, 8)))


@hsettings(12)
@given(shape=gqa_shapes(), causal_kind=st.sampled_from(["causal", "none"]),
       future_fill=st.sampled_from([FUTURE_FINFO_MIN, FUTURE_NEG_INF]), seed=SEEDS)
def test_gqa_equals_repeated_kv_attention(shape, causal_kind, future_fill, seed):
    """softmax_attention with K < N kv heads == the same call with K/V repeated to N heads in
    HF's repeat_kv order (query head n uses kv head n // (N // K)) == numpy MHA. fp64, 1e-12.
    The other repeat order (tile) gives different outputs whenever K > 1 and G > 1."""
    B, T, K, G, H = shape["B"], shape["T"], shape["K"], shape["G"], shape["H"]
    N, S = K * G, shape["T"]
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(B, T, N, H)), rng.normal(size=(B, S, K, H)), rng.normal(size=(B, S, K, H))
    key_valid = rng.random((B, S)) < 0.7  # fully padded rows and leading pads included
    causal = np.asarray(causal_mask(jnp.arange(T, dtype=jnp.int32), S)) if causal_kind == "causal" else None
    scale = H ** -0.5
    f64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
    cz = None if causal is None else jnp.asarray(causal)

    def run(kk, vv):
        return [np.asarray(a) for a in softmax_attention(f64(q), f64(kk), f64(vv), jnp.asarray(key_valid), cz, scale,
                                                         future_fill=future_fill)]

    gqa = run(k, v)
    k_rep, v_rep = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # repeat_kv: [k0 k0 k1 k1 ...]
    mha = run(k_rep, v_rep)
    ref = np_attention(q, k_rep, v_rep, key_valid, causal, scale, future_fill)
    for name, a, b, c in zip(("context", "probs", "scores"), gqa, mha, ref):
        assert a.shape == b.shape == c.shape
        assert_close(a, b, FP64_TOL, f"GQA vs repeated-KV {name}")
        assert_close(b, c, FP64_TOL, f"MHA vs numpy {name}")
    if K > 1 and G > 1:
        wrong = run(np.tile(k, (1, 1, G, 1)), np.tile(v, (1, 1, G, 1)))  # [k0 k1 k0 k1 ...]
        assert rel_err(wrong[0], gqa[0]) > 1e-6, "head mapping not pinned down"


def repeat_kv_params(params, config):
    """The MHA-equivalent params: k/v projections (kernel [L, D, K*H], bias [L, K*H])
    repeated per group in repeat_kv order, so query head n reads copy n of kv head n // G."""
    K, H = config.num_key_value_heads, config.head_dim
    G = config.num_attention_heads // K
    attn = params.model.layers.self_attn

    def rep(lin):
        kernel = lin.kernel.reshape(*lin.kernel.shape[:-1], K, H)
        kernel = jnp.repeat(kernel, G, axis=-2).reshape(*lin.kernel.shape[:-1], K * G * H)
        bias = None if lin.bias is None else jnp.repeat(lin.bias.reshape(-1, K, H), G, axis=-2).reshape(-1, K * G * H)
        return type(lin)(kernel=kernel, bias=bias)

    new_attn = type(attn)(q_proj=attn.q_proj, k_proj=rep(attn.k_proj), v_proj=rep(attn.v_proj), o_proj=attn.o_proj)
    layers = dataclasses.replace(params.model.layers, self_attn=new_attn)
    model = dataclasses.replace(params.model, layers=layers)
    return dataclasses.replace(params, model=model)


@hsettings(6)
@given(raw=raw_configs(heads=(2, 4)), data=st.data())
def test_gqa_model_equals_mha_with_repeated_kv_weights(raw, data):
    """A config with K < N kv heads == the MHA config (K = N) whose k/v projection weights
    are repeated per group: logits, every hidden state and attention map. fp64, 1e-12."""
    N = raw["num_attention_heads"]
    raw["num_key_value_heads"] = data.draw(st.sampled_from([k for k in range(1, N) if N % k == 0]))
    config = parse(raw)
    mha_config = dataclasses.replace(config, num_key_value_heads=N)
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    mha_params = repeat_kv_params(params, config)
    B, T = 2, 7
    ids = rng.integers(0, config.vocab_size, (B, T))
    mask = (rng.random((B, T)) < 0.8).astype(np.int32)
    a = fields(FWD(params, config, i32(ids), i32(mask), **KW))
    b = fields(FWD(mha_params, mha_config, i32(ids), i32(mask), **KW))
    assert a.keys() == b.keys()
    for name in a:
        assert_close(a[name], b[name], FP64_TOL, name)


# ---------------------------------------------------------------------------------------
# 2. Causality, padding invariance, batch independence, fully padded rows
# ---------------------------------------------------------------------------------------

@hsettings(8)
@given(config=configs(), data=st.data())
def test_causality(config, data):
    """Changing token t of one row changes nothing at positions s < t of that row that have
    a real key at or before s, and nothing at all in the other row. Exact (same program).

    Documented HF semantics: a query with no real key at or before it (a leading pad)
    attends uniformly to every key, future ones included, so its outputs DO change; that
    never reaches a real token (real queries give pad keys exactly zero weight)."""
    B, T, V = 2, 8, config.vocab_size
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.75).astype(np.int32)
    row, t = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, T - 1))
    ids2 = ids.copy()
    ids2[row, t] = (ids[row, t] + data.draw(st.integers(1, V - 1))) % V
    # default positions 0..T-1 in both calls, so dynamic/longrope frequencies are the same too
    a = fields(FWD(params, config, i32(ids), i32(mask), **KW))
    b = fields(FWD(params, config, i32(ids2), i32(mask), **KW))
    seen = np.cumsum(mask[row]) > 0  # [T]: a real key at or before s
    causal_part = np.flatnonzero(seen[:t])
    np.testing.assert_array_equal(a["logits"][row, causal_part], b["logits"][row, causal_part])
    np.testing.assert_array_equal(a["hidden_states"][:, row, causal_part], b["hidden_states"][:, row, causal_part])
    np.testing.assert_array_equal(a["attentions"][:, row, :, causal_part], b["attentions"][:, row, :, causal_part])
    other = 1 - row
    np.testing.assert_array_equal(a["logits"][other], b["logits"][other])
    np.testing.assert_array_equal(a["hidden_states"][:, other], b["hidden_states"][:, other])
    np.testing.assert_array_equal(a["attentions"][:, other], b["attentions"][:, other])
    assert not np.array_equal(a["logits"][row, t], b["logits"][row, t]), "change invisible at t"
    leading_pads = np.flatnonzero(~seen[:t])
    if leading_pads.size:  # they see the future (uniform attention over all T keys)
        assert not np.array_equal(a["hidden_states"][1, row, leading_pads], b["hidden_states"][1, row, leading_pads])


@hsettings(5)
@given(config=configs(), data=st.data())
def test_padding_invariance_and_batch_independence(config, data):
    """A row of n real tokens gives the same real-token outputs unpadded ([1, n]), with right
    padding, and with extra left padding whose position ids are shifted (real tokens at
    0..n-1); real queries give pad keys exactly zero attention; each row alone (same mask,
    same positions) equals its row of the batch. fp64, 1e-12.

    Every row's max position is n - 1 (pads get position 0, the unrelated row has n - 1
    somewhere), because dynamic/longrope take one set of frequencies per call from
    max(position_ids) + 1 over the whole batch (HF does the same; see
    test_position_dependent_rope_couples_batch_rows)."""
    T, V = 8, config.vocab_size
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    n = data.draw(st.integers(1, T))
    left = data.draw(st.integers(0, T - n))
    real = rng.integers(0, V, n).astype(np.int32)
    ids = rng.integers(0, V, (3, T)).astype(np.int32)  # pad slots hold arbitrary ids
    mask = np.zeros((3, T), np.int32)
    ids[0, :n], mask[0, :n] = real, 1  # right padding
    ids[1, left:left + n], mask[1, left:left + n] = real, 1  # left (and right) padding
    mask[2] = (rng.random(T) < 0.7).astype(np.int32)  # an unrelated row
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0) * mask  # real tokens at 0..n-1, pads at 0
    pos[2] = rng.integers(0, n, T)
    pos[2, rng.integers(0, T)] = n - 1
    pos = pos.astype(np.int32)
    base = fields(FWD(params, config, i32(real[None]), **KW))
    out = fields(FWD(params, config, i32(ids), i32(mask), position_ids=i32(pos), **KW))
    for row, start in ((0, 0), (1, left)):
        sl = slice(start, start + n)
        assert_close(out["logits"][row, sl], base["logits"][0], FP64_TOL, f"logits row {row}")
        assert_close(out["hidden_states"][:, row, sl], base["hidden_states"][:, 0], FP64_TOL, f"hidden row {row}")
        probs = out["attentions"][:, row, :, sl]  # [L, N, n, T]
        assert_close(probs[..., sl], base["attentions"][:, 0], FP64_TOL, f"attentions row {row}")
        outside = np.ones(T, bool)
        outside[sl] = False
        assert np.all(probs[..., outside] == 0.0), "a real query attends to a pad key"
    for row in range(3):
        alone = fields(FWD(params, config, i32(ids[row:row + 1]), i32(mask[row:row + 1]),
                           position_ids=i32(pos[row:row + 1]), **KW))
        for name in ("logits", "hidden_states", "attentions"):
            axis = 0 if name == "logits" else 1
            assert_close(np.take(out[name], [row], axis), alone[name], FP64_TOL, f"batch independence {name} {row}")


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_position_dependent_rope_couples_batch_rows(rope_type):
    """Documented HF semantics: dynamic/longrope frequencies come from max(position_ids) + 1
    over the whole batch, so a short row batched with a row past the threshold is rotated
    with the long-context frequencies and differs from the same row alone; with both rows
    below the threshold it does not."""
    raw = dict(model_type="arcee", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=8)
    raw["rope_scaling"] = ({"rope_type": "dynamic", "factor": 2.0} if rope_type == "dynamic" else
                           {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0, 1.5, 2.0, 3.0],
                            "long_factor": [2.0, 3.0, 5.0, 9.0]})
    config = parse_arcee_config(raw, "ArceeForCausalLM")
    params = random_params(config, 3)
    T = 12
    ids = np.random.default_rng(3).integers(0, 32, (2, T)).astype(np.int32)
    pos = np.stack([np.minimum(np.arange(T), 5), np.arange(T)]).astype(np.int32)  # row 0 stays below 8
    batch = np.asarray(FWD(params, config, i32(ids), position_ids=i32(pos)).logits)
    alone = np.asarray(FWD(params, config, i32(ids[:1]), position_ids=i32(pos[:1])).logits)
    assert rel_err(batch[:1], alone) > 1e-3, "row 0 should be rotated with the batch's long-context frequencies"
    short = np.stack([pos[0], pos[0]])
    batch_short = np.asarray(FWD(params, config, i32(ids), position_ids=i32(short)).logits)
    assert_close(batch_short[:1], alone, FP64_TOL, "both rows below the threshold")


def head_inputs(config, rng, ids, mask):
    """Forward kwargs for config.architecture with labels (fully padded rows: all -100)."""
    arch, L = config.architecture, config.num_labels
    B, T = ids.shape
    kw = dict(input_ids=i32(ids), attention_mask=i32(mask))
    if arch == "ArceeForCausalLM":
        kw["labels"] = i32(np.where(mask == 1, ids, -100))
    elif arch == "ArceeForSequenceClassification":
        kw["labels"] = jnp.asarray(rng.normal(size=B), jnp.float64) if L == 1 else i32(rng.integers(0, L, B))
    elif arch == "ArceeForTokenClassification":
        kw["labels"] = i32(np.where(mask == 1, rng.integers(0, L, (B, T)), -100))
    elif arch == "ArceeForQuestionAnswering":
        kw["start_positions"] = i32(rng.integers(0, T, B))
        kw["end_positions"] = i32(rng.integers(0, T, B))
    return kw


def head_batch(config, rng, B, T):
    """Row 0 full, row 1 fully padded (ids = pad id), row 2 left-padded by T // 2."""
    ids = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    ids[ids == config.pad_token_id] = (config.pad_token_id + 1) % config.vocab_size
    mask = np.ones((B, T), np.int32)
    mask[1] = 0
    ids[1] = config.pad_token_id
    mask[2, : T // 2] = 0
    ids[2, : T // 2] = config.pad_token_id
    return ids, mask


@hsettings(10)
@given(config=configs(), arch=st.sampled_from(ARCHITECTURES), dtype=st.sampled_from([jnp.float32, jnp.float64]),
       data=st.data())
def test_fully_padded_rows_are_finite(config, arch, dtype, data):
    """A row with attention_mask all 0 gives finite outputs in every head and both dtypes
    (losses included). Its attention is uniform over ALL T keys (HF's single finfo.min mask:
    future keys are no more masked than pad keys), as is that of the leading pads of a
    left-padded row; every attention row sums to 1."""
    B, T = 3, 6
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    config = dataclasses.replace(config, pad_token_id=data.draw(st.integers(0, config.vocab_size - 1)))
    config, params = with_head(random_params(config, seed, dtype), config, arch, seed + 1, dtype=dtype)
    ids, mask = head_batch(config, rng, B, T)
    kw = head_inputs(config, rng, ids, mask)
    if dtype == jnp.float32 and "labels" in kw and jnp.issubdtype(kw["labels"].dtype, jnp.floating):
        kw["labels"] = kw["labels"].astype(jnp.float32)
    out = fields(FWD(params, config, **kw, **KW))
    for name, value in out.items():
        assert np.all(np.isfinite(value)), f"{arch} {jnp.dtype(dtype).name}: {name} has NaN/inf"
    probs = out["attentions"]  # [L, B, N, T, S]
    tol = 1e-6 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=tol)
    np.testing.assert_allclose(probs[:, 1], 1.0 / T, rtol=0, atol=tol)
    np.testing.assert_allclose(probs[:, 2, :, : T // 2], 1.0 / T, rtol=0, atol=tol)
    assert np.all(probs[:, 2, :, T // 2:, : T // 2] == 0.0)  # real queries ignore the pads


# ---------------------------------------------------------------------------------------
# 3. KV cache
# ---------------------------------------------------------------------------------------

def cached_run(params, config, ids, mask, pos, T0, chunks):
    """Prefill the first T0 tokens in `chunks` calls, then decode the rest one token per
    call. Returns (logits [B, T, V], cache after the prefill, final cache)."""
    B, T = ids.shape
    cache = arcee.init_cache(config, B, T + 1, jnp.float64)  # one spare slot: unfilled slots must not count
    logits, start = [], 0
    for c in chunks:
        sl = slice(start, start + c)
        out = FWD(params, config, i32(ids[:, sl]), i32(mask[:, sl]), position_ids=i32(pos[:, sl]), cache=cache)
        logits.append(np.asarray(out.logits))
        cache, start = out.cache, start + c
    assert start == T0
    prefill_cache = cache
    for t in range(T0, T):
        out = FWD(params, config, i32(ids[:, t:t + 1]), i32(mask[:, t:t + 1]), position_ids=i32(pos[:, t:t + 1]),
                  cache=cache)
        logits.append(np.asarray(out.logits))
        cache = out.cache
    return np.concatenate(logits, axis=1), prefill_cache, cache


def check_cache_equals_full(params, config, ids, mask, pos, T0, what):
    """Cached prefill (one shot and in two chunks) + token-by-token decoding == one full
    forward: logits at every position that has a real key at or before it, and the cache
    at those slots == a one-call cached forward's.

    Leading pads (no real key at or before them) are excluded by HF's semantics: they
    attend uniformly to every key that exists in the call, so a full forward lets them see
    tokens that a prefill chunk has not seen yet (HF differs there too). Their hidden
    states never reach a real token: real queries give pad keys exactly zero weight."""
    B, T = ids.shape
    seen = np.cumsum(mask, -1) > 0  # [B, T]
    slots = np.concatenate([seen, np.zeros((B, 1), bool)], 1)  # [B, S]: the spare slot stays empty
    full = np.asarray(FWD(params, config, i32(ids), i32(mask), position_ids=i32(pos)).logits)
    one_shot = FWD(params, config, i32(ids), i32(mask), position_ids=i32(pos),
                   cache=arcee.init_cache(config, B, T + 1, jnp.float64)).cache
    logits, prefill_cache, cache = cached_run(params, config, ids, mask, pos, T0, [T0])
    assert_close(logits[seen], full[seen], FP64_TOL, f"{what}: cached prefill + decode vs full forward")
    assert int(cache.length) == T
    np.testing.assert_array_equal(np.asarray(cache.key_valid)[:, :T], mask.astype(bool))
    assert not np.asarray(cache.key_valid)[:, T:].any()
    assert_close(np.asarray(cache.keys)[:, slots], np.asarray(one_shot.keys)[:, slots], FP64_TOL,
                 f"{what}: cached keys")
    assert_close(np.asarray(cache.values)[:, slots], np.asarray(one_shot.values)[:, slots], FP64_TOL,
                 f"{what}: cached values")
    c = T0 // 2
    chunked, chunk_cache, _ = cached_run(params, config, ids, mask, pos, T0, [c, T0 - c])
    assert_close(chunked[seen], full[seen], FP64_TOL, f"{what}: chunked prefill + decode vs full forward")
    for name in ("keys", "values"):
        a, b = np.asarray(getattr(chunk_cache, name)), np.asarray(getattr(prefill_cache, name))
        assert_close(a[:, slots], b[:, slots], FP64_TOL, f"{what}: chunked prefill {name}")
    return full, logits


def left_padded_batch(config, rng, lengths, T0, N):
    """ids/mask/positions for left-padded prompts of `lengths` followed by N decoded tokens
    (HF generate's positions: cumsum(mask) - 1, pads 1)."""
    B = len(lengths)
    ids = rng.integers(0, config.vocab_size, (B, T0 + N)).astype(np.int32)
    mask = np.concatenate([left_padded_mask(lengths, T0), np.ones((B, N), np.int32)], axis=1)
    return ids, mask, prompt_positions_np(mask)


@hsettings(4)
@given(config=configs(rope_types=FIXED_FREQ_ROPE_TYPES), data=st.data())
def test_kv_cache_matches_full_forward(config, data):
    """default/linear/yarn/llama3 (frequencies independent of the positions): left-padded
    prefill (one shot or two chunks) then token-by-token decoding with the cache gives the
    logits of one full forward at every position, and the same cache. fp64, 1e-12."""
    T0, N = 4, 4
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    ids, mask, pos = left_padded_batch(config, rng, [data.draw(st.integers(1, T0)) for _ in range(2)], T0, N)
    check_cache_equals_full(params, config, ids, mask, pos, T0, config.rope_scaling.rope_type)


def call_lengths(pos, T0):
    """L = max(position_ids) + 1 of the prefill call and of each decode call."""
    return [int(pos[:, :T0].max()) + 1] + [int(pos[:, t].max()) + 1 for t in range(T0, pos.shape[1])]


@hsettings(4)
@given(config=configs(rope_types=("dynamic", "longrope"), max_positions=(3, 12)), data=st.data())
def test_kv_cache_position_dependent_rope(config, data):
    """dynamic/longrope: each call uses the frequencies of its own L = max(position_ids) + 1,
    as HF's dynamic_rope_update does (keys are cached already rotated). Hence:
    (a) with an extra "anchor" row whose positions are all A > threshold in every call, every
        call (prefill chunks, each decode step, the full forward) has L = A + 1, and cached
        decoding == the full forward exactly (a decode step beyond the threshold equals a
        full forward with the same max position). fp64, 1e-12.
    (b) without it, cached decoding == the full forward of the whole sequence only when every
        call has the full forward's frequencies; when the sequence crosses the threshold
        (and the frequencies differ) the full forward differs: that is HF's behaviour too."""
    T0, N = 4, 5
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    ids, mask, pos = left_padded_batch(config, rng, [data.draw(st.integers(1, T0)) for _ in range(2)], T0, N)
    switch = rope_switch_length(config)
    # (a) the anchored batch
    A = max(switch, T0 + N) + 1
    a_ids = np.concatenate([ids, rng.integers(0, config.vocab_size, (1, T0 + N)).astype(np.int32)])
    a_mask = np.concatenate([mask, np.ones((1, T0 + N), np.int32)])
    a_pos = np.concatenate([pos, np.full((1, T0 + N), A, np.int32)])
    assert set(call_lengths(a_pos, T0)) == {A + 1}
    anchored_full, _ = check_cache_equals_full(params, config, a_ids, a_mask, a_pos, T0, "anchored")
    # (b) the plain batch
    full = np.asarray(FWD(params, config, i32(ids), i32(mask), position_ids=i32(pos)).logits)
    cached, _, _ = cached_run(params, config, ids, mask, pos, T0, [T0])
    seen = np.cumsum(mask, -1) > 0  # leading pads excluded (see check_cache_equals_full)
    full, cached, anchored_full = full[seen], cached[seen], anchored_full[:2][seen]
    L_full = int(pos.max()) + 1

    def freqs(L):
        inv, scaling = rotary.rope_frequencies(config, jnp.asarray([[L - 1]], jnp.int32))
        return np.asarray(inv), scaling

    def regime(L):  # which frequencies a call of length L uses, by HF's rule
        if config.rope_scaling.rope_type == "dynamic":
            return "original" if L <= switch else f"grown({L})"
        return "long" if L > switch else "short"

    lengths = call_lengths(pos, T0)
    note(f"switch={switch} call lengths={lengths} full={L_full}")
    if all(regime(L) == regime(L_full) for L in lengths):
        event(f"{config.rope_scaling.rope_type}: every call in one regime (cached == full)")
        assert_close(cached, full, FP64_TOL, "same frequencies in every call")
    elif any(not np.array_equal(freqs(L)[0], freqs(L_full)[0]) for L in lengths):
        event(f"{config.rope_scaling.rope_type}: crosses the threshold (cached != full)")
        err = rel_err(cached, full)
        assert err > 1e-9, f"frequencies differ between calls, yet cached == full ({err:.2e})"
    # the anchor changes nothing but the shared frequencies: with frequencies equal to the
    # plain full forward's (same regime), the real rows agree with it
    if regime(A + 1) == regime(L_full):
        assert_close(anchored_full, full, FP64_TOL, "anchor row leaks into the other rows")


# ---------------------------------------------------------------------------------------
# 4. scan == Python loop; jit == eager
# ---------------------------------------------------------------------------------------

def loop_forward(params, config, ids, mask, pos):
    """Test-only ArceeModel: embeddings, rotary tables, arcee.decoder_layer per layer on
    sliced params, final RMSNorm. Returns (last_hidden_state, hidden_states as HF)."""
    body = params.model
    x = body.embed_tokens.table[ids]
    T = ids.shape[1]
    inv_freq, scaling = rotary.rope_frequencies(config, pos)
    cos, sin = rotary.rope_cos_sin(inv_freq, scaling, pos, x.dtype)
    attn_mask = mask_for(jnp.asarray(mask), ids.shape[0], T)
    hidden = [x]
    for i in range(config.num_hidden_layers):
        p_layer = jax.tree.map(lambda a: a[i], body.layers)
        x = arcee.decoder_layer(p_layer, config, x, cos, sin, attn_mask).x
        hidden.append(x)
    last = nn.rms_norm(body.norm, x, config.rms_norm_eps)
    return last, hidden[:-1] + [last]


@hsettings(6)
@given(config=configs(), data=st.data())
def test_scan_equals_python_loop(config, data):
    """forward's lax.scan over stacked layers == an eager loop of arcee.decoder_layer. fp64, 1e-12."""
    B, T = 2, 7
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    ids = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.8).astype(np.int32)
    pos = rng.integers(0, 2 * config.max_position_embeddings, (B, T)).astype(np.int32)  # crosses thresholds
    out = FWD(params, config, i32(ids), i32(mask), position_ids=i32(pos), output_hidden_states=True)
    last, hidden = loop_forward(params, config, i32(ids), i32(mask), i32(pos))  # eager, op by op
    assert_close(out.last_hidden_state, last, FP64_TOL, "last_hidden_state")
    assert out.hidden_states.shape[0] == config.num_hidden_layers + 1
    for i, h in enumerate(hidden):
        assert_close(out.hidden_states[i], h, FP64_TOL, f"hidden_states[{i}]")


EXPECTED_FIELDS = {
    "ArceeModel": set(),
    "ArceeForCausalLM": {"logits", "loss"},
    "ArceeForSequenceClassification": {"logits", "loss"},
    "ArceeForTokenClassification": {"logits", "loss"},
    "ArceeForQuestionAnswering": {"start_logits", "end_logits", "loss"},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@hsettings(2)
@given(config=configs(layers=(1, 2), max_positions=(3, 8)), data=st.data())
def test_jit_equals_eager_forward(arch, config, data):
    """Every head: jax.jit(forward) == eager forward on every output field (losses included).
    max_position_embeddings 3-8 < T = 6 sometimes, so dynamic/longrope run past their
    threshold (dynamic's traced length: test_rope_dynamic_frequencies_jit_equals_eager). fp64, 1e-12."""
    B, T = 3, 6
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    config = dataclasses.replace(config, pad_token_id=0)
    config, params = with_head(random_params(config, seed), config, arch, seed + 1,
                               num_labels=data.draw(st.integers(1, 4)))
    ids, mask = head_batch(config, rng, B, T)
    kw = head_inputs(config, rng, ids, mask)
    jitted = fields(FWD(params, config, **kw, **KW))
    eager = fields(arcee.forward(params, config, **kw, **KW))
    assert jitted.keys() == eager.keys() == EXPECTED_FIELDS[arch] | {"last_hidden_state", "hidden_states",
                                                                     "attentions"}
    for name in jitted:
        assert_close(jitted[name], eager[name], FP64_TOL, name)


@hsettings(2)
@given(config=configs(layers=(1, 2)), keep=st.integers(1, 6), seed=SEEDS)
def test_logits_to_keep(config, keep, seed):
    """ArceeForCausalLM(logits_to_keep=n) == the last n positions of the full logits (HF);
    n = 0 keeps all; with labels, n must be 0 (ValueError). fp64, 1e-12."""
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    ids = rng.integers(0, config.vocab_size, (2, 6)).astype(np.int32)
    full = np.asarray(FWD(params, config, i32(ids)).logits)
    kept = np.asarray(FWD(params, config, i32(ids), logits_to_keep=keep).logits)
    assert_close(kept, full[:, -keep:], FP64_TOL, f"logits_to_keep={keep}")
    with pytest.raises(ValueError, match="logits_to_keep"):
        arcee.forward(params, config, i32(ids), labels=i32(ids), logits_to_keep=keep)


@hsettings(2)
@given(config=configs(layers=(1, 2), max_positions=(3, 6)), do_sample=st.booleans(), data=st.data())
def test_jit_equals_eager_generate(config, do_sample, data):
    """generate (a jitted lax.while_loop) == the same code under jax.disable_jit (a Python
    loop of eager forwards): tokens exact, step logits (fp32) within 1e-5. Short
    max_position_embeddings, so dynamic/longrope cross their threshold while decoding."""
    B, T0, N = 2, 3, 2
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    mask = left_padded_mask([T0, data.draw(st.integers(1, T0))], T0)
    prompt = rng.integers(0, config.vocab_size, (B, T0)).astype(np.int32)
    sampling = Sampling(do_sample=do_sample, temperature=1.5, top_k=5 if do_sample else None)
    key = jax.random.PRNGKey(seed)
    seqs, logits = GENERATE(params, config, prompt, mask, max_new_tokens=N, sampling=sampling, key=key,
                            return_logits=True)
    with jax.disable_jit():
        seqs_e, logits_e = GENERATE(params, config, prompt, mask, max_new_tokens=N, sampling=sampling, key=key,
                                    return_logits=True)
    np.testing.assert_array_equal(np.asarray(seqs), np.asarray(seqs_e))
    assert_close(logits, logits_e, FP32_TOL, "step logits")


@hsettings(3)
@given(config=configs(max_positions=(3, 8)), data=st.data())
def test_greedy_generate_equals_cached_forwards(config, data):
    """Greedy generate == argmax over the same calls made by hand (left-padded prefill with
    HF's prompt positions, then one cached forward per token): tokens exact, fp32 logits
    1e-5. Holds for every rope type, dynamic/longrope included (per-call frequencies)."""
    B, T0, N = 3, 4, 4
    seed = data.draw(SEEDS)
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    mask = left_padded_mask([data.draw(st.integers(1, T0)) for _ in range(B)], T0)
    prompt = rng.integers(0, config.vocab_size, (B, T0)).astype(np.int32)
    seqs, logits = GENERATE(params, config, prompt, mask, max_new_tokens=N, return_logits=True)
    cache = arcee.init_cache(config, B, T0 + N, jnp.float64)
    out = FWD(params, config, i32(prompt), i32(mask), position_ids=i32(prompt_positions_np(mask)), cache=cache)
    tokens, step_logits, next_pos = [], [], mask.sum(-1)
    for _ in range(N):
        step = np.asarray(out.logits[:, -1].astype(jnp.float32))
        step_logits.append(step)
        tokens.append(np.argmax(step, -1).astype(np.int32))
        out = FWD(params, config, i32(tokens[-1][:, None]), i32(np.ones((B, 1))), position_ids=i32(next_pos[:, None]),
                  cache=out.cache)
        next_pos = next_pos + 1
    np.testing.assert_array_equal(np.asarray(seqs), np.concatenate([prompt, np.stack(tokens, 1)], 1))
    assert_close(logits, np.stack(step_logits, 1), FP32_TOL, "step logits")


# ---------------------------------------------------------------------------------------
# 5. Rotary embeddings
# ---------------------------------------------------------------------------------------

def positions(rng, B=2, T=6, hi=200):
    return jnp.asarray(rng.integers(0, hi, (B, T)), jnp.int32)


@hsettings(20)
@given(config=configs(), seed=SEEDS)
def test_rope_pythagoras_and_pair_norms(config, seed):
    """cos^2 + sin^2 == attention_scaling^2, and rotating x scales the norm of every rotated
    pair (i, i + H/2) by exactly attention_scaling^2 (rotate-half layout). fp64, 1e-12."""
    rng = np.random.default_rng(seed)
    pos = positions(rng)
    inv_freq, scaling = rotary.rope_frequencies(config, pos)
    H = config.head_dim
    assert inv_freq.shape == (H // 2,)
    cos, sin = rotary.rope_cos_sin(inv_freq, scaling, pos, jnp.float64)
    assert cos.shape == sin.shape == (*pos.shape, H)
    np.testing.assert_allclose(np.asarray(cos**2 + sin**2), scaling**2, rtol=1e-12, atol=0)
    x = rng.normal(size=(*pos.shape, 3, H))
    y = np.asarray(rotary.apply_rotary(jnp.asarray(x, jnp.float64), cos, sin))
    pair = lambda a: a[..., : H // 2] ** 2 + a[..., H // 2:] ** 2  # noqa: E731
    np.testing.assert_allclose(pair(y), scaling**2 * pair(x), rtol=1e-12, atol=1e-12 * np.max(pair(x)))


@hsettings(15)
@given(config=configs(rope_types=FIXED_FREQ_ROPE_TYPES), seed=SEEDS)
def test_rope_relative_position(config, seed):
    """default/linear/yarn/llama3: <rope(q, p + d), rope(k, p)> depends only on d (the
    frequencies do not depend on the positions). Checked for 5 offsets p up to 150 against
    p = 0. fp64, 1e-12 relative to |q||k| scaling^2."""
    rng = np.random.default_rng(seed)
    H = config.head_dim
    q, k = rng.normal(size=H), rng.normal(size=H)
    d = int(rng.integers(-20, 21))
    ps = np.array([max(0, -d)] + list(rng.integers(max(0, -d), 150, 5)))
    pos_q, pos_k = jnp.asarray((ps + d)[None], jnp.int32), jnp.asarray(ps[None], jnp.int32)
    inv_freq, scaling = rotary.rope_frequencies(config, pos_q)

    def rot(x, pos):
        cos, sin = rotary.rope_cos_sin(inv_freq, scaling, pos, jnp.float64)
        xs = jnp.broadcast_to(jnp.asarray(x, jnp.float64), (1, pos.shape[1], 1, H))
        return np.asarray(rotary.apply_rotary(xs, cos, sin))[0, :, 0]

    dots = np.sum(rot(q, pos_q) * rot(k, pos_k), -1)
    bound = 1e-12 * np.linalg.norm(q) * np.linalg.norm(k) * scaling**2
    np.testing.assert_allclose(dots, dots[0], rtol=0, atol=bound)


def rope_config(head_dim=8, theta=10000.0, max_pos=32, **rope):
    raw = dict(model_type="arcee", vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
               num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=max_pos,
               rope_theta=theta, rope_scaling=rope or None)
    return parse_arcee_config(raw)


def np_default_inv_freq(theta, dim):
    return 1.0 / theta ** (np.arange(0, dim, 2) / dim)  # fp64


HEAD_DIMS = st.sampled_from([2, 4, 6, 8, 16, 64])
THETAS = st.sampled_from([100.0, 10000.0, 500000.0])


@hsettings(15)
@given(head_dim=HEAD_DIMS, theta=THETAS, factor=st.floats(1.0, 16.0), seed=SEEDS)
def test_rope_linear_is_default_at_scaled_positions(head_dim, theta, factor, seed):
    """linear with factor f at position p == default at position p / f: inv_freq is exactly
    fp32(default / f), and cos/sin agree within the angle error of that fp32 rounding
    (|d cos| <= |d angle| <= 2^-23 * angle)."""
    lin = rope_config(head_dim, theta, rope_type="linear", factor=factor)
    dflt = rope_config(head_dim, theta)
    pos = positions(np.random.default_rng(seed), hi=1000)
    inv_lin, s_lin = rotary.rope_frequencies(lin, pos)
    inv_def, s_def = rotary.rope_frequencies(dflt, pos)
    assert s_lin == s_def == 1.0
    np.testing.assert_array_equal(np.asarray(inv_lin), np.asarray(inv_def) / np.float32(factor))
    scaled = pos.astype(jnp.float64) / factor
    a = rotary.rope_cos_sin(inv_lin, 1.0, pos, jnp.float64)
    b = rotary.rope_cos_sin(inv_def, 1.0, scaled, jnp.float64)
    max_angle = float(np.max(np.asarray(pos))) * float(np.max(np.asarray(inv_def)))
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=2.0**-23 * max_angle + 1e-12)


@hsettings(20)
@given(head_dim=HEAD_DIMS, theta=THETAS, factor=st.floats(1.0, 32.0), original=st.integers(4, 8192),
       beta_fast=st.floats(4.0, 64.0), beta_slow=st.floats(0.25, 4.0), truncate=st.booleans())
def test_rope_yarn_blends_extrapolation_and_interpolation(head_dim, theta, factor, original, beta_fast, beta_slow,
                                                          truncate):
    """YaRN: a dimension that turns more than beta_fast times over the original context keeps
    its default frequency exactly (extrapolation); one that turns fewer than beta_slow times
    is divided by factor (interpolation; within 1 fp32 ulp); dims in between lie between the
    two. With factor 1 YaRN is default RoPE (1 ulp) with attention scaling 1. Default
    attention scaling: 0.1 ln(factor) + 1.

    Only for a sane correction range: HF clamps the range's low end to dim 0, so when even
    dim 0 turns fewer than beta_slow times (a tiny original context) the ramp degenerates
    and HF (and refjax) extrapolate dim 0 instead; such draws are skipped."""
    def correction_dim(turns):  # the (fractional) dim that turns `turns` times over `original`
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    d_fast, d_slow = correction_dim(beta_fast), correction_dim(beta_slow)
    assume(d_slow > max(d_fast, 0.0))
    dims = np.arange(head_dim // 2)
    assume(np.min(np.abs(dims - d_fast)) > 1e-9 and np.min(np.abs(dims - d_slow)) > 1e-9)
    kw = dict(original_max_position_embeddings=original, beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate)
    cfg = rope_config(head_dim, theta, rope_type="yarn", factor=factor, **kw)
    pos = jnp.zeros((1, 1), jnp.int32)
    inv, scaling = rotary.rope_frequencies(cfg, pos)
    inv = np.asarray(inv, np.float64)
    default = np.asarray(rotary.rope_frequencies(rope_config(head_dim, theta), pos)[0], np.float64)
    assert scaling == pytest.approx(0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0, rel=1e-15)
    ulp = 2.0**-23
    fast, slow = dims < d_fast, dims > d_slow  # turn more than beta_fast / fewer than beta_slow times
    np.testing.assert_array_equal(inv[fast], default[fast])
    np.testing.assert_allclose(inv[slow], default[slow] / factor, rtol=2 * ulp, atol=0)
    assert np.all(inv <= default * (1 + ulp)) and np.all(inv >= default / factor * (1 - 2 * ulp))
    one = rope_config(head_dim, theta, rope_type="yarn", factor=1.0, **kw)
    inv_one, scaling_one = rotary.rope_frequencies(one, pos)
    assert scaling_one == 1.0
    np.testing.assert_allclose(np.asarray(inv_one, np.float64), default, rtol=2 * ulp, atol=0)


@hsettings(20)
@given(head_dim=HEAD_DIMS, theta=THETAS, factor=st.floats(1.0, 16.0), original=st.integers(4, 8192),
       low=st.floats(0.5, 2.0), gap=st.floats(0.5, 4.0))
def test_rope_llama3_keeps_high_and_divides_low_frequencies(head_dim, theta, factor, original, low, gap):
    """llama3: wavelengths shorter than original/high_freq_factor keep their frequency
    exactly; longer than original/low_freq_factor are divided by factor (exact fp32
    division); those in between lie between the two. Attention scaling 1."""
    high = low + gap
    cfg = rope_config(head_dim, theta, rope_type="llama3", factor=factor, low_freq_factor=low,
                      high_freq_factor=high, original_max_position_embeddings=original)
    pos = jnp.zeros((1, 1), jnp.int32)
    inv, scaling = rotary.rope_frequencies(cfg, pos)
    inv = np.asarray(inv)
    default = np.asarray(rotary.rope_frequencies(rope_config(head_dim, theta), pos)[0])
    assert scaling == 1.0
    wavelen = 2 * math.pi / np_default_inv_freq(theta, head_dim)
    margin = 1e-5  # skip dims within fp32 rounding of a boundary
    high_freq = wavelen < original / high * (1 - margin)
    low_freq = wavelen > original / low * (1 + margin)
    np.testing.assert_array_equal(inv[high_freq], default[high_freq])
    np.testing.assert_array_equal(inv[low_freq], default[low_freq] / np.float32(factor))
    mid = ~high_freq & ~low_freq
    ulp = 2.0**-23
    assert np.all(inv[mid] <= default[mid] * (1 + 2 * ulp)) and np.all(inv[mid] >= default[mid] / factor * (1 - 2 * ulp))


@hsettings(15)
@given(head_dim=st.sampled_from([4, 6, 8, 16, 64]), theta=THETAS, factor=st.floats(1.0, 8.0),
       max_pos=st.integers(2, 64), extra=st.integers(1, 100))
def test_rope_dynamic_ntk(head_dim, theta, factor, max_pos, extra):
    """dynamic == default exactly while max(position_ids) + 1 <= max_position_embeddings; past
    it, the NTK base theta * (f L / P - (f - 1))^(d / (d - 2)) with L = max position + 1
    (numpy fp64 formula; fp32 computation, 1e-5), which differs from default."""
    cfg = rope_config(head_dim, theta, max_pos, rope_type="dynamic", factor=factor)
    default = np.asarray(rotary.rope_frequencies(rope_config(head_dim, theta, max_pos), jnp.zeros((1, 1), jnp.int32))[0])
    inside = jnp.asarray([[0, max_pos - 1]], jnp.int32)
    inv, scaling = rotary.rope_frequencies(cfg, inside)
    assert scaling == 1.0
    np.testing.assert_array_equal(np.asarray(inv), default)
    L = max_pos + extra
    inv_long, _ = rotary.rope_frequencies(cfg, jnp.asarray([[L // 2, L - 1, 0]], jnp.int32))
    base = theta * (factor * L / max_pos - (factor - 1)) ** (head_dim / (head_dim - 2))
    np.testing.assert_allclose(np.asarray(inv_long, np.float64), np_default_inv_freq(base, head_dim), rtol=1e-5)
    assert not np.array_equal(np.asarray(inv_long), default)


def test_rope_dynamic_frequencies_jit_equals_eager():
    """Past max_position_embeddings the dynamic-NTK inv_freq depends on the traced length.
    A traced float32 chain is compiled differently under jit than op by op (XLA rewrites
    x / P as x * (1 / P)), which once made jit and eager differ by up to 5 ulps; refjax now
    runs one numpy float32 chain through a host callback in both. Expected: the same bits."""
    cfg = rope_config(4, 10000.0, 13, rope_type="dynamic", factor=3.7)
    pos = jnp.asarray([[13]], jnp.int32)  # L = 14 > 13
    eager = np.asarray(rotary.rope_frequencies(cfg, pos)[0])
    jitted = np.asarray(jax.jit(lambda p: rotary.rope_frequencies(cfg, p)[0])(pos))
    np.testing.assert_array_equal(jitted, eager)


@hsettings(15)
@given(half=st.integers(1, 8), theta=THETAS, max_pos=st.integers(4, 64), original=st.none() | st.integers(2, 64),
       factor=st.floats(1.0, 8.0), data=st.data())
def test_rope_longrope_switch_and_attention_factor(half, theta, max_pos, original, factor, data):
    """longrope: inv_freq = 1 / (ext * theta^(2i/d)) with ext = short_factor while
    max(position_ids) + 1 <= the top-level original_max_position_embeddings (else
    max_position_embeddings), long_factor beyond; attention scaling
    sqrt(1 + ln(f) / ln(original)) with f = max_position_embeddings / original when the
    top-level original is given (else rope_scaling.factor), 1 when f <= 1. fp32, 1e-6."""
    factors = st.lists(st.floats(1.0, 8.0), min_size=half, max_size=half)
    short, long = data.draw(factors), data.draw(factors)
    raw = dict(model_type="arcee", vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
               num_attention_heads=1, num_key_value_heads=1, head_dim=2 * half, max_position_embeddings=max_pos,
               rope_theta=theta, rope_scaling={"rope_type": "longrope", "short_factor": short,
                                               "long_factor": long, "factor": factor})
    if original is not None:
        raw["original_max_position_embeddings"] = original
    cfg = parse_arcee_config(raw)
    switch = original or max_pos
    f = max_pos / original if original else factor
    expected_scaling = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(switch))
    base = np_default_inv_freq(theta, 2 * half)
    for L, ext in ((switch, short), (switch + 1, long)):
        inv, scaling = rotary.rope_frequencies(cfg, jnp.asarray([[0, L - 1]], jnp.int32))
        np.testing.assert_allclose(np.asarray(inv, np.float64), base / np.asarray(ext), rtol=1e-6)
        assert scaling == pytest.approx(expected_scaling, rel=1e-12)


# ---------------------------------------------------------------------------------------
# 6. Gradients (fp64 finite differences)
# ---------------------------------------------------------------------------------------

# Central differences in fp64 with eps 1e-6: truncation ~eps^2 |f'''| / 6, rounding ~1e-16 / eps.
# eps 1e-5 is not enough: tiny RMS-normed models have large third derivatives (a drawn
# case: error 3.6e-7 at eps 1e-5, shrinking exactly as eps^2 to 3.8e-9 at eps 1e-6).
# Smooth activations only: relu2 is C1 with a jump in its second derivative at 0, where a
# central difference is off by O(eps).
GRAD_EPS, GRAD_TOL = 1e-6, 1e-7
TINY = dict(activations=("silu", "gelu"), layers=(1, 2), heads=(1, 2), half_head_dim=(1, 2), hidden=(4, 8),
            vocab=(16, 20), max_positions=(3, 8))


@hsettings(2)
@given(config=configs(**TINY), seed=SEEDS)
def test_lm_loss_gradients(config, seed):
    """check_grads (reverse mode, order 1) of the causal-LM loss w.r.t. every parameter
    (biases and untied head included when drawn), left-padded batch. fp64."""
    rng = np.random.default_rng(seed)
    params = random_params(config, seed)
    ids = rng.integers(0, config.vocab_size, (2, 5)).astype(np.int32)
    mask = left_padded_mask([5, 3], 5)
    labels = np.where(mask == 1, ids, -100)
    # The first real token's label is predicted by the last pad query, which sees no real key
    # and attends uniformly: its scores + finfo.min all round to finfo.min, so a finite
    # difference sees a flat function, while autodiff (HF's, and refjax's since the mask is
    # added as HF adds it) differentiates the unrounded softmax. Leave that label out here;
    # tests/test_reference_train.py checks those gradients against HF autograd instead.
    labels[:, 1:][mask[:, :-1] == 0] = -100
    loss = jax.jit(lambda p: arcee.forward(p, config, i32(ids), i32(mask), labels=i32(labels)).loss)
    check_grads(loss, (params,), order=1, modes=["rev"], eps=GRAD_EPS, atol=GRAD_TOL, rtol=GRAD_TOL)


# ---------------------------------------------------------------------------------------
# 7. The cache holds only the key/value heads
# ---------------------------------------------------------------------------------------

@hsettings(4)
@given(config=configs(heads=(2, 4)), dtype=st.sampled_from([jnp.float32, jnp.float64]))
def test_cache_holds_only_kv_heads(config, dtype):
    """init_cache: keys/values [L, B, S, K, H] with K = num_key_value_heads (not N), in the
    requested dtype; a cached forward keeps those shapes and returns attentions over all
    N query heads [L, B, N, T, S]."""
    B, S, T = 2, 7, 3
    L, K, N, H = config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads, config.head_dim
    cache = arcee.init_cache(config, B, S, dtype)
    assert cache.keys.shape == cache.values.shape == (L, B, S, K, H)
    assert cache.keys.dtype == cache.values.dtype == jnp.dtype(dtype)
    assert cache.key_valid.shape == (B, S) and cache.key_valid.dtype == jnp.bool_ and int(cache.length) == 0
    params = random_params(config, 0, dtype)
    out = FWD(params, config, i32(np.ones((B, T))), cache=cache, output_attentions=True)
    assert out.cache.keys.shape == out.cache.values.shape == (L, B, S, K, H)
    assert out.cache.keys.dtype == jnp.dtype(dtype) and int(out.cache.length) == T
    assert out.attentions.shape == (L, B, N, T, S)


# ---------------------------------------------------------------------------------------
# 8. The real AFM-4.5B config
# ---------------------------------------------------------------------------------------

def afm_raw() -> dict:
    with open(os.path.join(DATA, "configs", "AFM-4.5B.json"), encoding="utf-8") as f:
        return json.load(f)


def test_afm_config_parses():
    config = parse_arcee_config(afm_raw())
    assert config.architecture == "ArceeForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2560, 18432, 36)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (20, 4, 128)
    assert (config.vocab_size, config.max_position_embeddings, config.hidden_act) == (128005, 65536, "relu2")
    assert not config.tie_word_embeddings and not config.attention_bias and not config.mlp_bias
    s = config.rope_scaling
    assert s.rope_type == "yarn"
    assert s.factor == 20.0 and s.original_max_position_embeddings == 4096
    assert s.beta_fast == 32.0 and s.beta_slow == 1.0 and s.mscale == 1.0
    assert s.mscale_all_dim is None and s.attention_factor is None and s.truncate is True


def test_afm_legacy_type_key_is_accepted():
    """HF copies the legacy rope_scaling "type" key into "rope_type": a config with only
    "type" parses to the same config."""
    raw = afm_raw()
    legacy = dict(raw, rope_scaling={k: v for k, v in raw["rope_scaling"].items() if k != "rope_type"})
    assert "rope_type" not in legacy["rope_scaling"] and legacy["rope_scaling"]["type"] == "yarn"
    assert parse_arcee_config(legacy) == parse_arcee_config(raw)


def test_afm_param_count_without_allocating():
    """count_params of the skeleton (ShapeDtypeStruct leaves, nothing allocated):
    4,619,189,760 in all; 3,963,804,160 without the input embedding and the untied lm_head."""
    config = parse_arcee_config(afm_raw())
    skeleton = arcee_params.skeleton(config)
    leaves = jax.tree_util.tree_leaves(skeleton)
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    total = count_params(skeleton)
    assert total == 4_619_189_760
    embeddings = count_params(skeleton.model.embed_tokens) + count_params(skeleton.lm_head)
    assert embeddings == 2 * 128005 * 2560
    assert total - embeddings == 3_963_804_160
    assert skeleton.model.layers.self_attn.k_proj.kernel.shape == (36, 2560, 4 * 128)


def test_afm_rope_frequencies():
    """YaRN for AFM-4.5B: 64 frequencies (head_dim 128), attention scaling 0.1 ln(20) + 1."""
    config = parse_arcee_config(afm_raw())
    inv_freq, scaling = rotary.rope_frequencies(config, jnp.zeros((1, 1), jnp.int32))
    assert inv_freq.shape == (64,)
    assert scaling == pytest.approx(0.1 * math.log(20.0) + 1.0, rel=1e-15)
    default = np_default_inv_freq(10000.0, 128)
    inv = np.asarray(inv_freq, np.float64)
    assert inv[0] == 1.0 and np.all(np.diff(inv) < 0)
    np.testing.assert_allclose(inv[-1], default[-1] / 20.0, rtol=2**-22)  # lowest frequency fully interpolated
