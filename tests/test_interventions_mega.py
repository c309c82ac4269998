"""MEGA's interventions and training mode beyond the shared tests/test_interventions.py
(core tier, golden checkpoints in float64):

- HF's residuals live inside its modules (`mega_layer` returns x + r * (o - x), `nffn`
  returns x + drop(fc2(...))), so the shared claim "zeroing the MLP output leaves the
  residual" is stated here through what HF has: a keep-mask of zeros at `nffn.dropout`
  removes the nffn branch, and the layer's output is then `mega_layer`'s (pre-norm) or its
  norm (post-norm); patching `mega_layer` with the layer's input skips the gated attention;
- the sites only MEGA has: `mega_layer.dropout` called twice (".0", ".1"), feature dropout
  (whole channels [B, 1, D]; the chunked values [B, C, 1, 1], as HF's dropout2d draws them),
  the classification head's one module called twice, training-mode BatchNorm;
- a mask that names one layer applies to that layer only (the rest drawn from the key);
- cached decoding refuses train=True; the config parses each rate, HF's names and defaults.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN, golden_inputs
from refjax import mega
from refjax.params.checkpoint import load_checkpoint
from refjax.params.config import ConfigError
from refjax.params.mega import parse_mega_config
from refjax.probe import Probe, masks_from_taps

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def golden(case: str, **changes):
    ckpt = load_checkpoint(os.path.join(GOLDEN, "mega", case), dtype=jnp.float64)
    ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, **changes))
    return ckpt, {k: jnp.asarray(v) for k, v in golden_inputs(f"mega/{case}", INPUTS).items()}


def run(ckpt, inputs, **kw):
    return mega.forward(ckpt.params, ckpt.config, **inputs, **kw)


def layer_params(tree, layer: int):
    return jax.tree.map(lambda a: a[layer], tree)


@pytest.mark.parametrize("case", ["causal-lm", "causal-lm-postnorm"])
def test_dropping_the_whole_nffn_branch_leaves_the_gated_attention_output(case):
    """A keep-mask of zeros at layers.{l}.nffn.dropout is the MEGA form of zeroing the MLP
    output: layers.{l} == layers.{l}.mega_layer (pre-norm, bit for bit) or its nffn.norm
    (post-norm, computed outside the scan: 1e-13). The other sites draw from the key."""
    ckpt, inputs = golden(case)
    layer = ckpt.config.num_hidden_layers - 1
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(0),
              dropout_masks={f"layers.{layer}.nffn.dropout": False})
    assert not np.any(np.asarray(out.taps["layers.nffn.dropout"][layer]))
    assert np.any(np.asarray(out.taps["layers.nffn.dropout"][:layer]))  # the other layers drew theirs
    resid, stack_out = np.asarray(out.taps["layers.mega_layer"][layer]), np.asarray(out.taps["layers"][layer])
    if ckpt.config.normalize_before_ffn:
        np.testing.assert_array_equal(stack_out, resid)
    else:
        norm = layer_params(ckpt.params.mega.layers.nffn.norm, layer)
        expected = mega.sequence_norm(norm, ckpt.config, jnp.asarray(resid))
        np.testing.assert_allclose(stack_out, np.asarray(expected), rtol=1e-13, atol=1e-13)


def test_patching_mega_layer_with_its_input_skips_the_gated_attention():
    """layers.{l}.mega_layer := the layer's input x gives layers.{l} == nffn(x) (computed
    outside the scan with the layer's own params: 1e-13); earlier layers are untouched."""
    ckpt, inputs = golden("causal-lm")
    layer = ckpt.config.num_hidden_layers - 1
    base = run(ckpt, inputs, taps=True, output_hidden_states=True)
    x = base.hidden_states[layer]
    out = run(ckpt, inputs, taps=True, patch={f"layers.{layer}.mega_layer": x})
    np.testing.assert_array_equal(np.asarray(out.taps["layers.mega_layer"][layer]), np.asarray(x))
    expected = mega.normalized_ffn(layer_params(ckpt.params.mega.layers.nffn, layer), ckpt.config, x)
    np.testing.assert_allclose(np.asarray(out.taps["layers"][layer]), np.asarray(expected), rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(np.asarray(out.taps["layers"][:layer]), np.asarray(base.taps["layers"][:layer]))


def test_mega_layer_dropout_is_two_calls_with_their_own_masks():
    """HF calls mega_layer.dropout on the EMA output and on the attention output: two sites,
    two independent masks; the attention weights are returned (and tapped) before their
    dropout, as HF returns them."""
    ckpt, inputs = golden("causal-lm", dropout_prob=0.4)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(1), output_attentions=True)
    first, second = (np.asarray(out.taps[f"layers.mega_layer.dropout.{k}"]) for k in (0, 1))
    assert first.shape == second.shape == out.taps["layers.mega_layer"].shape
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.asarray(out.attentions), np.asarray(out.taps["layers.mega_layer.attn_weights"]))
    rows = np.asarray(out.attentions).sum(-1)
    real = np.asarray(inputs["attention_mask"], bool)[None, :, None, :]
    np.testing.assert_allclose(rows[np.broadcast_to(real, rows.shape)], 1.0, rtol=1e-12)  # softmax rows, undropped


def test_feature_dropout_masks_have_dropout2d_shapes_and_replay():
    """use_feature_dropout: one draw per (batch, channel) on the sequence-first sites
    ([B, 1, D], [B, 1, F]); per (batch, chunk) on the chunked values ([B, C, 1, 1]); the
    attention dropout stays entrywise. Recorded masks replay exactly."""
    ckpt, inputs = golden("causal-lm-chunking", use_feature_dropout=True, dropout_prob=0.3, hidden_dropout_prob=0.5)
    c = ckpt.config
    B, T = inputs["input_ids"].shape
    L, D, C = c.num_hidden_layers, c.hidden_size, T // c.chunk_size
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(2))
    shapes = {name: tuple(out.taps[name].shape) for name in out.taps if out.taps[name].dtype == jnp.bool_}
    assert shapes == {"layers.mega_layer.dropout.0": (L, B, 1, D), "layers.mega_layer.dropout.1": (L, B, 1, D),
                      "layers.mega_layer.hidden_dropout": (L, B, C, 1, 1),
                      "layers.mega_layer.attention_dropout": (L, B, C, c.chunk_size, c.chunk_size),
                      "layers.nffn.hidden_dropout": (L, B, 1, c.nffn_hidden_size), "layers.nffn.dropout": (L, B, 1, D)}
    masks = masks_from_taps(out.taps, mega.DROPOUT)
    replay = run(ckpt, inputs, taps=True, train=True, dropout_masks=masks)
    np.testing.assert_allclose(np.asarray(replay.logits), np.asarray(out.logits), rtol=1e-12, atol=1e-12)
    # applied: a channel is dropped at every position or kept (scaled) at every position
    probe = Probe(train=True, key=jax.random.key(3))
    y = np.asarray(mega.mega_dropout(probe, c, "nffn.dropout", jnp.ones((4, 6, D), jnp.float64), 0.3))
    assert set(np.unique(y)) == {0.0, 1 / 0.7} and np.all(y == y[:, :1, :])


def test_classification_head_calls_its_dropout_twice():
    ckpt, inputs = golden("seqcls-single", classifier_dropout=0.4)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(3))
    B, D = inputs["input_ids"].shape[0], ckpt.config.hidden_size
    first, second = np.asarray(out.taps["classifier.dropout.0"]), np.asarray(out.taps["classifier.dropout.1"])
    assert first.shape == second.shape == (B, D) and not np.array_equal(first, second)
    # the same masks given back, and a changed second call changes the logits
    masks = masks_from_taps(out.taps, mega.DROPOUT)
    replay = run(ckpt, inputs, train=True, dropout_masks=masks)
    np.testing.assert_allclose(np.asarray(replay.logits), np.asarray(out.logits), rtol=1e-12, atol=1e-12)
    changed = run(ckpt, inputs, train=True, dropout_masks=dict(masks, **{"classifier.dropout.1": True}))
    assert not np.allclose(np.asarray(changed.logits), np.asarray(out.logits))


def test_head_dropout_rates_follow_hf():
    """Token classification: classifier_dropout, else hidden_dropout_prob; multiple choice:
    hidden_dropout_prob (HF ignores classifier_dropout there)."""
    tok, _ = golden("tokcls", hidden_dropout_prob=0.2, classifier_dropout=None)
    assert mega.DROPOUT["dropout"](tok.config) == 0.2
    assert mega.DROPOUT["dropout"](dataclasses.replace(tok.config, classifier_dropout=0.45)) == 0.45
    mc, _ = golden("multiple-choice", hidden_dropout_prob=0.2, classifier_dropout=0.45)
    assert mega.DROPOUT["dropout"](mc.config) == 0.2


def test_batchnorm_trains_on_batch_statistics():
    """With every rate 0, train=True is eval for scalenorm (bit for bit) but not for
    batchnorm, which HF's train() normalises with the batch's own statistics."""
    zero = dict(dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                nffn_activation_dropout_prob=0.0)
    ckpt, inputs = golden("model", **zero)
    np.testing.assert_array_equal(np.asarray(run(ckpt, inputs, train=True, key=jax.random.key(0)).last_hidden_state),
                                  np.asarray(run(ckpt, inputs).last_hidden_state))
    ckpt, inputs = golden("norm-batchnorm", **zero)
    trained = run(ckpt, inputs, train=True, key=jax.random.key(0)).last_hidden_state
    assert not np.allclose(np.asarray(trained), np.asarray(run(ckpt, inputs).last_hidden_state))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, ckpt.config.hidden_size)))
    norm = layer_params(ckpt.params.mega.layers.mega_layer.norm, 0)
    y = (np.asarray(mega.sequence_norm(norm, ckpt.config, x, train=True)) - np.asarray(norm.bias)) / np.asarray(
        norm.weight)
    np.testing.assert_allclose(y.mean((0, 1)), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var((0, 1)), 1.0, rtol=1e-4)  # biased variance, eps = 1e-5


def test_mask_for_one_layer_leaves_the_others_to_the_key():
    ckpt, inputs = golden("causal-lm")
    drawn = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(5))
    one = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(5),
              dropout_masks={"layers.0.nffn.dropout": True})
    assert np.all(np.asarray(one.taps["layers.nffn.dropout"][0]))
    np.testing.assert_array_equal(np.asarray(one.taps["layers.nffn.dropout"][1]),
                                  np.asarray(drawn.taps["layers.nffn.dropout"][1]))
    with pytest.raises(ValueError, match="name only some layers"):
        run(ckpt, inputs, train=True, dropout_masks={"layers.0.nffn.dropout": True})


def test_cached_decoding_refuses_train():
    ckpt, inputs = golden("causal-lm")
    cache = mega.init_cache(ckpt.config, inputs["input_ids"].shape[0], 16, jnp.float64)
    with pytest.raises(ValueError, match="cached decoding .* is inference only"):
        run(ckpt, inputs, cache=cache, train=True, key=jax.random.key(0))


def test_unknown_mega_site_lists_near_matches():
    ckpt, inputs = golden("causal-lm")
    with pytest.raises(ValueError, match=r"nearest: .*layers\.0\.mega_layer\.dropout\.0"):
        run(ckpt, inputs, train=True, key=jax.random.key(0), dropout_masks={"layers.0.mega_layer.dropout": True})


def test_config_parses_the_dropout_rates():
    base = dict(model_type="mega", architectures=["MegaForTokenClassification"])
    config = parse_mega_config(base)
    assert (config.dropout_prob, config.hidden_dropout_prob, config.attention_probs_dropout_prob,
            config.nffn_activation_dropout_prob, config.classifier_dropout, config.use_feature_dropout) == (
        0.1, 0.1, 0.1, 0.1, None, False)
    config = parse_mega_config(dict(base, dropout_prob=0.25, classifier_dropout=0.5, use_feature_dropout=True))
    assert (config.dropout_prob, config.classifier_dropout, config.use_feature_dropout) == (0.25, 0.5, True)
    with pytest.raises(ConfigError, match="nffn_activation_dropout_prob"):
        parse_mega_config(dict(base, nffn_activation_dropout_prob=1.0))
