"""Shared helpers for the Arcee tests: small random configs (every rope_scaling type),
random params, a jitted forward, and the tolerance convention of ref/verify.py.

No torch here: the core-tier property tests import this file too. A drawn config is a
*raw* config.json dict (`raw_configs`) that both refjax's `parse_arcee_config` and HF's
`transformers.ArceeConfig(**raw)` accept, so the reference tier draws the same space.

Tolerances (relative, as ref.verify: max|a - b| <= tol * max(max|b|, 1)):
    FP32_TOL = 1e-5, FP64_TOL = 1e-12.
"""

from __future__ import annotations

from numerics import assert_close, rel_err  # noqa: F401  (re-exported to the tests)

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from refjax.params import arcee as arcee_params
from refjax.params.arcee import parse_arcee_config
from refjax import arcee

FP32_TOL = 1e-5
FP64_TOL = 1e-12

ARCHITECTURES = ("ArceeModel", "ArceeForCausalLM", "ArceeForSequenceClassification", "ArceeForTokenClassification",
                 "ArceeForQuestionAnswering")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
FIXED_FREQ_ROPE_TYPES = ("default", "linear", "yarn", "llama3")  # inv_freq independent of the positions
ACTIVATIONS = ("relu2", "silu", "gelu")

# One jitted forward for every test: jit caches per (config, shapes, dtypes).
FWD = jax.jit(arcee.forward, static_argnames=("config", "logits_to_keep", "output_hidden_states",
                                             "output_attentions", "taps"))

SEEDS = st.integers(0, 2**31 - 1)


def _float(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda x: round(x, 3))


@st.composite
def rope_scalings(draw, rope_type: str, head_dim: int, max_positions: int) -> tuple[dict | None, dict]:
    """(rope_scaling dict or None, extra top-level config keys) with valid params for
    `rope_type`, as HF 4.57.6 reads them. longrope's `original_max_position_embeddings`
    goes to the top level of the config (HF's longrope reads it there, not in rope_scaling);
    without it HF needs rope_scaling.factor."""
    half = head_dim // 2
    extra: dict = {}
    if rope_type == "default":
        return draw(st.sampled_from([None, {"rope_type": "default"}])), extra
    if rope_type in ("linear", "dynamic"):
        return {"rope_type": rope_type, "factor": draw(_float(1.0, 8.0))}, extra
    if rope_type == "yarn":
        s = {"rope_type": "yarn", "factor": draw(_float(1.0, 32.0))}
        optional = {
            "original_max_position_embeddings": st.integers(4, 64),
            "attention_factor": _float(0.5, 2.0),
            "beta_fast": _float(4.0, 64.0),
            "beta_slow": _float(0.25, 4.0),
            "mscale": _float(0.5, 2.0),
            "mscale_all_dim": _float(0.5, 2.0),
            "truncate": st.booleans(),
        }
        for key, strategy in optional.items():
            if draw(st.booleans()):
                s[key] = draw(strategy)
        return s, extra
    if rope_type == "longrope":
        factors = st.lists(_float(1.0, 8.0), min_size=half, max_size=half)
        s = {"rope_type": "longrope", "short_factor": draw(factors), "long_factor": draw(factors)}
        if draw(st.booleans()):
            s["attention_factor"] = draw(_float(0.5, 2.0))
        original = draw(st.none() | st.integers(4, max(4, max_positions)))
        if original is not None:
            extra["original_max_position_embeddings"] = original
        if original is None or draw(st.booleans()):
            s["factor"] = draw(_float(1.0, 8.0))
        return s, extra
    if rope_type == "llama3":
        low = draw(_float(0.5, 2.0))
        return {"rope_type": "llama3", "factor": draw(_float(1.0, 8.0)), "low_freq_factor": low,
                "high_freq_factor": round(low + draw(_float(0.5, 4.0)), 3),
                "original_max_position_embeddings": draw(st.integers(4, 64))}, extra
    raise ValueError(rope_type)


@st.composite
def raw_configs(draw, architecture: str = "ArceeForCausalLM", rope_types=ROPE_TYPES, activations=ACTIVATIONS,
                layers=(1, 3), heads=(1, 4), half_head_dim=(1, 4), hidden=(4, 24), vocab=(16, 64),
                max_positions=(8, 48), **fixed) -> dict:
    """A config.json dict (HF ArceeConfig kwargs) with every field refjax reads drawn:
    num_attention_heads 1-4 with num_key_value_heads a divisor of it, head_dim 2-8 even and
    independent of hidden_size, every rope_scaling type, biases, tying, activations."""
    n_heads = draw(st.integers(*heads))
    kv_heads = draw(st.sampled_from([k for k in range(1, n_heads + 1) if n_heads % k == 0]))
    rope_type = draw(st.sampled_from(rope_types))
    lo = half_head_dim[0] if rope_type != "dynamic" else max(2, half_head_dim[0])  # NTK: d / (d - 2)
    head_dim = 2 * draw(st.integers(lo, half_head_dim[1]))
    max_pos = draw(st.integers(*max_positions))
    rope_scaling, extra = draw(rope_scalings(rope_type, head_dim, max_pos))
    vocab_size = draw(st.integers(*vocab))
    raw = dict(
        model_type="arcee",
        architectures=[architecture],
        vocab_size=vocab_size,
        hidden_size=draw(st.integers(*hidden)),
        intermediate_size=draw(st.integers(4, 32)),
        num_hidden_layers=draw(st.integers(*layers)),
        num_attention_heads=n_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=draw(st.sampled_from(activations)),
        max_position_embeddings=max_pos,
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6, 0.1])),
        rope_theta=draw(st.sampled_from([10000.0, 100.0, 500000.0])),
        rope_scaling=rope_scaling,
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=draw(st.none() | st.integers(0, vocab_size - 1)),
        num_labels=draw(st.integers(1, 4)),
        **extra,
    )
    raw.update(fixed)
    return raw


def parse(raw: dict, architecture: str | None = None):
    return parse_arcee_config(raw, architecture)


@st.composite
def configs(draw, architecture: str = "ArceeForCausalLM", **kw):
    """Parsed refjax ArceeConfigs drawn by `raw_configs`."""
    return parse(draw(raw_configs(architecture, **kw)))


def random_params(config, seed: int, dtype=jnp.float64, std: float = 0.3):
    """Every leaf N(0, std), except RMSNorm scales (the only `.scale` leaves of Arcee):
    1 + N(0, std). Drawn with numpy (one jax.random kernel per leaf shape would compile)."""
    skeleton = arcee_params.skeleton(config, dtype)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, leaf in paths_leaves:
        value = rng.normal(0.0, std, leaf.shape)
        if jax.tree_util.keystr(path).endswith(".scale"):
            value = value + 1.0
        leaves.append(jnp.asarray(value, dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def with_head(params, config, architecture: str, seed: int, num_labels: int | None = None, dtype=jnp.float64):
    """(config, params) for another head on the same body; head params are random."""
    kw = {"architecture": architecture}
    if num_labels is not None:
        kw["num_labels"] = num_labels
    new_config = dataclasses.replace(config, **kw)
    fresh = random_params(new_config, seed, dtype)
    return new_config, type(fresh)(model=params.model, lm_head=fresh.lm_head, score=fresh.score,
                                   qa_outputs=fresh.qa_outputs)


def i32(x):
    return jnp.asarray(np.asarray(x), jnp.int32)


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


def rope_switch_length(config) -> int | None:
    """For the position-dependent rope types, the call length L = max(position_ids) + 1
    above which the frequencies change: dynamic grows past max_position_embeddings,
    longrope switches to long_factor past the top-level original_max_position_embeddings
    (else max_position_embeddings). None for the fixed-frequency types."""
    kind = config.rope_scaling.rope_type
    if kind == "dynamic":
        return config.max_position_embeddings
    if kind == "longrope":
        return config.original_max_position_embeddings or config.max_position_embeddings
    return None


def fields(out) -> dict:
    """The array fields of an Output (cache/taps excluded), by name."""
    names = ("logits", "loss", "last_hidden_state", "hidden_states", "attentions", "start_logits", "end_logits")
    return {n: np.asarray(getattr(out, n)) for n in names if getattr(out, n) is not None}
