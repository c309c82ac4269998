"""Shared helpers for the MEGA tests: random raw configs over every option, inputs that
respect HF's length rules, random params and one jitted forward.

No torch here: the core-tier property tests import this file too. A drawn config is a raw
config.json dict that both refjax's `parse_mega_config` and HF's `MegaConfig(**raw)` accept.

Tolerances (relative, as ref.verify: max|a - b| <= tol * max(max|b|, 1)): FP32_TOL = 1e-5
against HF in both dtypes (HF's float64 EMA FFT runs in float32); refjax against itself in
float64: FP64_TOL = 1e-12.
"""

from __future__ import annotations

from numerics import assert_close, rel_err  # noqa: F401  (re-exported to the tests)

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from refjax.params import mega as mega_params
from refjax.params.mega import MegaEma
from refjax import mega, mega_ema

FP32_TOL = 1e-5
FP64_TOL = 1e-12

ARCHITECTURES = mega_params.MEGA_ARCHITECTURES
ACTIVATIONS = ("silu", "gelu", "relu", "tanh")

FWD = jax.jit(mega.forward, static_argnames=("config", "output_hidden_states", "output_attentions", "taps", "fast",
                                             "remat"))
SEEDS = st.integers(0, 2**31 - 1)


@st.composite
def raw_configs(draw, architecture: str | None = None, decoder: bool | None = None) -> dict:
    """A small raw MEGA config dict over every option of issue 7."""
    arch = architecture or draw(st.sampled_from(ARCHITECTURES))
    is_decoder = draw(st.booleans()) if decoder is None else decoder
    norm = draw(st.sampled_from(mega_params.NORMALIZATION_TYPES))
    chunking = draw(st.booleans())
    raw = dict(
        model_type="mega", architectures=[arch], vocab_size=40, hidden_size=draw(st.sampled_from([8, 16])),
        num_hidden_layers=draw(st.integers(1, 2)), intermediate_size=draw(st.sampled_from([12, 24])),
        ema_projection_size=draw(st.integers(1, 4)), shared_representation_size=draw(st.sampled_from([4, 8])),
        nffn_hidden_size=draw(st.sampled_from([12, 20])), max_positions=24,
        bidirectional=False if is_decoder else draw(st.booleans()), is_decoder=is_decoder,
        normalization_type=norm, norm_affine=True if norm == "layernorm" else draw(st.booleans()),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        attention_activation=draw(st.sampled_from(mega_params.ATTENTION_ACTIVATIONS)),
        relative_positional_bias=draw(st.sampled_from(mega_params.RELATIVE_POSITIONAL_BIASES)),
        normalize_before_mega=draw(st.booleans()), normalize_before_ffn=draw(st.booleans()),
        use_normalized_ffn=draw(st.booleans()), use_feature_dropout=draw(st.booleans()),
        add_token_type_embeddings=draw(st.booleans()), add_lm_hidden_dense_layer=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        truncation=draw(st.one_of(st.none(), st.integers(1, 10))),
        use_chunking=chunking, chunk_size=draw(st.sampled_from([2, 4])) if chunking else -1,
        use_cache=False, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    if arch == "MegaForSequenceClassification":
        raw["num_labels"] = draw(st.sampled_from([1, 3]))
    elif arch == "MegaForTokenClassification":
        raw["num_labels"] = 3
    return raw


@st.composite
def seq_lengths(draw, raw: dict) -> int:
    """A length HF accepts: with chunking, at most or a multiple of chunk_size (decoders: a multiple)."""
    if raw["use_chunking"]:
        C = raw["chunk_size"]
        options = [C, 2 * C] if raw["is_decoder"] else [1, C - 1, C, 2 * C, 3 * C]
        return draw(st.sampled_from([t for t in options if t >= 1]))
    return draw(st.integers(1, 10))


def make_inputs(raw: dict, T: int, padding: str, rng: np.random.Generator, batch: int = 2) -> dict[str, np.ndarray]:
    """input_ids (+ attention_mask, token_type_ids) for a config; padding: none/left/right/empty."""
    shape = (batch, 2, T) if raw["architectures"][0] == "MegaForMultipleChoice" else (batch, T)
    ids = rng.integers(3, raw["vocab_size"], size=shape).astype(np.int64)
    x = {"input_ids": ids}
    if padding != "none":
        mask = np.ones(shape, np.int64)
        n = max(1, T // 3)
        if padding == "left":
            mask[-1, ..., :n] = 0
        elif padding == "right":
            mask[-1, ..., T - n:] = 0
        elif padding == "empty":
            mask[-1] = 0
        x["attention_mask"] = mask
        x["input_ids"] = np.where(mask == 1, ids, 1)
    if raw["add_token_type_embeddings"]:
        x["token_type_ids"] = rng.integers(0, 2, size=shape).astype(np.int64)
    return x


def random_params(config, seed: int, dtype=np.float32, scale: float = 0.3):
    return mega_params.random_params(config, jax.random.PRNGKey(seed), dtype, scale)


def ema_recurrence(p: MegaEma, u: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The EMA as a plain step-by-step recurrence (a `lax.scan` of `mega_ema.one_step`), what
    the FFT convolution is tested against. u [B, D, T], state [B, D, N] -> (y [B, D, T], state)."""
    def step(s, u_t):
        y, s = mega_ema.one_step(p, u_t[..., None], s)
        return s, y[..., 0]
    state, ys = jax.lax.scan(step, state, jnp.moveaxis(u, -1, 0))
    return jnp.moveaxis(ys, 0, -1), state
