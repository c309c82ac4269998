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


def inject_hf_masks(model, masks: dict, rates: dict, base_prefix: str) -> int:
    """HF MEGA's dropout calls served from refjax's keep-masks (tests/test_reference_train.py).

    HF's layers call `MegaDropout` modules (F.dropout, or F.dropout2d featurewise), not
    nn.Dropout, and call `mega_layer.dropout` (and the classification head's `dropout`)
    twice: a site "<module>.0" / "<module>.1" is that module's first / second call. Each
    named module's forward is replaced by one that applies its masks in call order, scaled
    1 / (1 - p); refjax's masks are batch-first, so a sequence-first [T, B, ...] call gets
    the mask transposed (featurewise [B, 1, D] -> [1, B, D], HF's dropout2d mask [B, D, 1]
    in HF's layout). Returns how many modules were replaced."""
    import torch
    from transformers.models.deprecated.mega.modeling_mega import MegaDropout

    from refjax.probe import LAYER

    calls: dict[str, dict[int, tuple]] = {}  # HF module path -> {call index: (keep, rate)}
    for site, keep in masks.items():
        keep = np.asarray(keep)
        path, _, call = site.rpartition(".")
        if not call.isdigit():
            path, call = site, "0"
        for i in range(keep.shape[0]) if LAYER in site else [None]:
            name = path if i is None else path.replace(LAYER, str(i))
            calls.setdefault(name, {})[int(call)] = (keep if i is None else keep[i], rates[site])
    for name, by_call in calls.items():
        paths = [p for p in (base_prefix + name, name) if _has_submodule(model, p)]
        assert paths, f"no HF module for site {name}"
        module = model.get_submodule(paths[0])
        assert isinstance(module, (MegaDropout, torch.nn.Dropout)), paths[0]
        queue = iter([by_call[k] for k in sorted(by_call)])
        sequence_first = isinstance(module, MegaDropout)

        def forward(x, batch_first=False, queue=queue, sequence_first=sequence_first, name=name):
            keep, p = next(queue)  # StopIteration: HF called the module more often than refjax's sites say
            keep = torch.from_numpy(np.array(keep, dtype=bool))
            if sequence_first and not batch_first and x.dim() == 3:
                keep = keep.transpose(0, 1)
            return x * keep.to(x.dtype) * (1.0 / (1.0 - p))

        module.forward = forward
    return len(calls)


def _has_submodule(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
