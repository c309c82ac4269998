"""MEGA property tests (core tier, no torch): the EMA's FFT convolution is the step-by-step
recurrence (unidirectional, bidirectional, truncated), cached decoding equals the full
forward, causality, padding and batch independence, jit == eager, the relative-bias
formula against HF's tile construction, generation, finite gradients.

Tolerances: float64 with a float64 FFT: 1e-12; anything through the model's FFT (float32,
as HF): 1e-5 relative (mega_helpers.FP32_TOL).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mega_helpers import (FP32_TOL, FP64_TOL, FWD, assert_close, ema_recurrence, make_inputs, random_params, raw_configs,
                          seq_lengths)
from refjax.params.mega import MegaEma, MegaRelativeBias, parse_mega_config
from refjax import mega, mega_attention, mega_ema
from refjax.tooling.families import FAMILIES

SETTINGS = settings(max_examples=4, deadline=None)
FEW = settings(max_examples=2, deadline=None)


def ema_params(key, kernels: int, n: int, dtype=jnp.float64) -> MegaEma:
    k = jax.random.split(key, 5)
    return MegaEma(damping_factor=jax.random.normal(k[0], (kernels, n, 1), dtype),
                   decay_factor=jax.random.normal(k[1], (kernels, n, 1), dtype),
                   ema_expansion_matrix=jax.random.normal(k[2], (kernels, n, 1), dtype),
                   kernel_projection_matrix=jax.random.normal(k[3], (kernels, n), dtype),
                   residual_weight=jax.random.normal(k[4], (kernels,), dtype))


def config_for(**overrides):
    raw = dict(model_type="mega", architectures=["MegaForCausalLM"], vocab_size=40, hidden_size=6,
               num_hidden_layers=1, intermediate_size=8, ema_projection_size=3, shared_representation_size=4,
               nffn_hidden_size=8, max_positions=24, bidirectional=False, is_decoder=True)
    raw.update(overrides)
    return parse_mega_config(raw)


def half(p: MegaEma, rows: slice) -> MegaEma:
    return jax.tree.map(lambda a: a[rows], p)


@SETTINGS
@given(st.sampled_from([1, 5, 12]), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_fft_convolution_equals_the_recurrence(T, N, seed):
    D = 6
    config = config_for(hidden_size=D, ema_projection_size=N)
    key = jax.random.PRNGKey(seed)
    p = ema_params(key, D, N)
    u = jax.random.normal(jax.random.fold_in(key, 1), (2, D, T), jnp.float64)
    by_fft = mega_ema.full(p, config, u, fft_dtype=jnp.float64)
    by_steps, state = ema_recurrence(p, u, jnp.zeros((2, D, N), jnp.float64))
    assert_close(by_fft, by_steps, FP64_TOL, "fft (float64) vs recurrence")
    assert_close(mega_ema.full(p, config, u), by_steps, FP32_TOL, "fft (float32, as HF) vs recurrence")
    # the cached multi-token step (HF ema_step) gives the same outputs and the same final state
    steps_out, steps_state = mega_ema.steps(p, u, jnp.zeros((2, D, N), jnp.float64))
    assert_close(steps_out, by_steps, FP32_TOL, "ema_steps vs recurrence")
    assert_close(steps_state, state, FP64_TOL, "ema_steps state vs recurrence state")


@SETTINGS
@given(st.sampled_from([1, 5, 12]), st.integers(0, 2**31 - 1))
def test_bidirectional_fft_is_a_forward_plus_a_backward_recurrence(T, seed):
    D, N = 4, 2
    config = config_for(hidden_size=D, ema_projection_size=N, bidirectional=True, is_decoder=False)
    key = jax.random.PRNGKey(seed)
    p = ema_params(key, 2 * D, N)
    u = jax.random.normal(jax.random.fold_in(key, 1), (2, D, T), jnp.float64)
    zeros = jnp.zeros((2, D, N), jnp.float64)
    forward, _ = ema_recurrence(half(p, slice(0, D)), u, zeros)
    backward, _ = ema_recurrence(half(p, slice(D, 2 * D)), u[..., ::-1], zeros)
    assert_close(mega_ema.full(p, config, u, fft_dtype=jnp.float64), forward + backward[..., ::-1], FP64_TOL)


@SETTINGS
@given(st.sampled_from([1, 7]), st.integers(1, 10), st.booleans(), st.integers(0, 2**31 - 1))
def test_truncation_keeps_only_the_first_taps(T, truncation, bidirectional, seed):
    D, N = 4, 2
    config = config_for(hidden_size=D, ema_projection_size=N, truncation=truncation, bidirectional=bidirectional,
                        is_decoder=False)
    key = jax.random.PRNGKey(seed)
    p = ema_params(key, 2 * D if bidirectional else D, N)
    u = jax.random.normal(jax.random.fold_in(key, 1), (1, D, T), jnp.float64)
    size = min(truncation, T)
    kernel = np.asarray(mega_ema.kernel(p, size))  # [K, size]
    un = np.asarray(u)[0]
    want = np.zeros((D, T))
    for t in range(T):
        for lag in range(size):
            if t - lag >= 0:
                want[:, t] += kernel[:D, lag] * un[:, t - lag]
            if bidirectional and t + lag < T:
                want[:, t] += kernel[D:, lag] * un[:, t + lag]
    assert_close(mega_ema.full(p, config, u, fft_dtype=jnp.float64)[0], want, FP64_TOL)


def hf_simple_bias(w: np.ndarray, M: int, n: int) -> np.ndarray:
    """HF MegaSimpleRelativePositionalBias.forward, transcribed with numpy."""
    bias = w[M - n: M + n - 1]
    tile = np.pad(bias, (0, n))
    tile = np.tile(tile, n)[:-n].reshape(n, 3 * n - 2)
    start = (2 * n - 1) // 2
    return tile[:, start: tile.shape[1] - start]


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_simple_bias_matches_hf_tile_construction(n):
    config = config_for(relative_positional_bias="simple", max_positions=8)
    w = np.arange(2 * 8 - 1, dtype=np.float64) * 1.5 + 0.25
    ours = mega_attention.relative_bias(MegaRelativeBias(rel_pos_bias=jnp.asarray(w)), config, jnp.arange(n), n)
    np.testing.assert_array_equal(np.asarray(ours), hf_simple_bias(w, 8, n))


@pytest.mark.parametrize("bias", ["simple", "rotary"])
def test_one_query_bias_row_is_that_row_of_the_full_bias(bias):
    """Decoding asks for one query slot's row of the relative bias; it is the full table's row
    (to 1e-12 in float64: the rotary row is a [1, Z] x [Z, S] product, the table [S, Z] x [Z, S],
    and XLA:CPU sums them in different orders, 1 ulp apart)."""
    config = config_for(relative_positional_bias=bias, max_positions=8)
    key = jax.random.PRNGKey(0)
    p = MegaRelativeBias(rel_pos_bias=jax.random.normal(key, (15,), jnp.float64)) if bias == "simple" else \
        MegaRelativeBias(alpha=jax.random.normal(key, (1, 4), jnp.float64),
                         b_param=jax.random.normal(jax.random.fold_in(key, 1), (1, 4), jnp.float64))
    n = 6
    table = np.asarray(mega_attention.relative_bias(p, config, jnp.arange(n, dtype=jnp.int32), n))
    for i in range(n):
        row = mega_attention.relative_bias(p, config, jnp.asarray([i], jnp.int32), n)
        assert_close(np.asarray(row)[0], table[i], FP64_TOL, f"row {i}")


def decoder_configs():
    return raw_configs(architecture="MegaForCausalLM", decoder=True).map(
        lambda raw: {**raw, "use_chunking": False, "chunk_size": -1, "attention_activation": "softmax",
                     "truncation": None})  # HF's cached EMA never truncates; its full forward does


@FEW
@given(decoder_configs(), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_cached_decoding_equals_full_forward(raw, prompt_len, new, seed):
    config = parse_mega_config(raw)
    params = random_params(config, seed, jnp.float64)
    total = prompt_len + new
    ids = jnp.asarray(np.random.default_rng(seed).integers(3, 40, size=(2, total)), jnp.int32)
    full = FWD(params, config, ids).logits
    cache = mega.init_cache(config, 2, total, jnp.float64)
    out = FWD(params, config, ids[:, :prompt_len], cache=cache)
    steps = [out.logits]
    for t in range(prompt_len, total):
        out = FWD(params, config, ids[:, t:t + 1], cache=out.cache)
        steps.append(out.logits)
    assert int(out.cache.length) == total
    assert_close(jnp.concatenate(steps, axis=1), full, FP32_TOL, "cached vs full (HF's FFT is float32)")


@FEW
@given(raw_configs(architecture="MegaForCausalLM", decoder=True), st.data(), st.integers(0, 2**31 - 1))
def test_decoder_is_causal(raw, data, seed):
    config = parse_mega_config(raw)
    T = data.draw(seq_lengths(raw))
    params = random_params(config, seed, jnp.float64)
    rng = np.random.default_rng(seed)
    x = make_inputs(raw, T, "none", rng)
    cut = data.draw(st.integers(0, T - 1))
    changed = x["input_ids"].copy()
    changed[:, cut:] = rng.integers(3, 40, size=changed[:, cut:].shape)
    a = FWD(params, config, **x).logits[:, :cut]
    b = FWD(params, config, **{**x, "input_ids": changed}).logits[:, :cut]
    assert_close(a, b, FP32_TOL, "past logits after changing the future")


@FEW
@given(raw_configs(decoder=False), st.data(), st.integers(0, 2**31 - 1))
def test_pad_tokens_do_not_change_real_positions_and_rows_are_independent(raw, data, seed):
    config = parse_mega_config(raw)
    T = data.draw(seq_lengths(raw))
    params = random_params(config, seed, jnp.float64)
    rng = np.random.default_rng(seed)
    x = make_inputs(raw, T, data.draw(st.sampled_from(["left", "right"])), rng)
    other = x["input_ids"].copy()
    mask = x["attention_mask"]
    other[mask == 0] = rng.integers(3, 40, size=int((mask == 0).sum()))
    a = FWD(params, config, **x, output_hidden_states=True).hidden_states
    b = FWD(params, config, **{**x, "input_ids": other}, output_hidden_states=True).hidden_states
    flat_mask = mask.reshape(-1, T).astype(bool)
    assert_close(np.asarray(a)[:, flat_mask], np.asarray(b)[:, flat_mask], FP32_TOL, "real positions")
    # batch independence: the first row alone gives the first row
    alone = FWD(params, config, **{k: v[:1] for k, v in x.items()}, output_hidden_states=True).hidden_states
    assert_close(np.asarray(alone)[:, 0], np.asarray(a)[:, 0], FP32_TOL, "row 0 alone vs in the batch")


@settings(max_examples=1, deadline=None)
@given(raw_configs(), st.data(), st.integers(0, 2**31 - 1))
def test_jit_equals_eager(raw, data, seed):
    config = parse_mega_config(raw)
    T = data.draw(seq_lengths(raw))
    params = random_params(config, seed, jnp.float64)
    x = make_inputs(raw, T, "right", np.random.default_rng(seed))
    eager = mega.forward(params, config, **x, output_hidden_states=True)
    jitted = FWD(params, config, **x, output_hidden_states=True)
    assert_close(jitted.hidden_states, eager.hidden_states, FP64_TOL, "jit vs eager")


def test_generate_equals_greedy_full_forward():
    config = config_for(num_hidden_layers=2, relative_positional_bias="simple")
    params = random_params(config, 3, jnp.float32)
    prompt = jnp.asarray([[5, 6, 7], [8, 9, 10]], jnp.int32)
    seqs = np.asarray(FAMILIES["mega"].generate(params, config, prompt, max_new_tokens=5))
    ids = np.asarray(prompt)
    for _ in range(seqs.shape[1] - 3):
        nxt = np.asarray(FWD(params, config, jnp.asarray(ids)).logits[:, -1]).argmax(-1)
        finished = (ids[:, 3:] == config.eos_token_id).any(-1) if ids.shape[1] > 3 else np.zeros(2, bool)
        ids = np.concatenate([ids, np.where(finished, config.pad_token_id, nxt)[:, None]], 1)
    np.testing.assert_array_equal(seqs, ids)
    # the unstacked layout (a loop over per-layer params) decodes the same tokens
    unstacked = FAMILIES["mega"].unstack_layers(params)
    np.testing.assert_array_equal(np.asarray(FAMILIES["mega"].generate(unstacked, config, prompt, max_new_tokens=5)),
                                  seqs)


def test_gradients_are_finite():
    for arch in ("MegaForMaskedLM",):
        config = dataclasses.replace(config_for(normalization_type="batchnorm", bidirectional=True,
                                                is_decoder=False), architecture=arch)
        params = random_params(config, 0, jnp.float64)
        ids = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10]], jnp.int32)
        kwargs = {"MegaForMaskedLM": dict(labels=ids), "MegaForQuestionAnswering": dict(start_positions=jnp.asarray([0, 1]),
                                                   end_positions=jnp.asarray([2, 3]))}[arch]
        grads = jax.jit(jax.grad(lambda p: mega.forward(p, config, ids, **kwargs).loss))(params)
        leaves = jax.tree_util.tree_leaves(grads)
        assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), arch
        assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_remat_gives_the_same_loss_and_gradients():
    """remat=True (jax.checkpoint per layer) changes memory, not math: float64, within 1e-12."""
    config = dataclasses.replace(config_for(num_hidden_layers=2, bidirectional=True, is_decoder=False),
                                 architecture="MegaForMaskedLM")
    params = random_params(config, 0, jnp.float64)
    ids = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10]], jnp.int32)

    def loss(p, remat):
        return mega.forward(p, config, ids, labels=ids, remat=remat).loss

    plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, False)
    rematted = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, True)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(rematted)):
        assert_close(b, a, FP64_TOL, "remat vs plain")


def test_unsupported_cache_combinations_raise():
    for overrides, match in ((dict(is_decoder=False), "is_decoder"), (dict(bidirectional=True), "bidirectional"),
                             (dict(use_chunking=True, chunk_size=2), "use_chunking")):
        with pytest.raises(ValueError, match=match):
            mega.init_cache(config_for(**overrides), 1, 4, jnp.float32)
