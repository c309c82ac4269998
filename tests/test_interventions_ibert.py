"""I-BERT's interventions and training mode beyond the shared tests/test_interventions.py
(core tier, golden checkpoints; float mode in float64, quant mode in float32 as HF runs it):

- post-LayerNorm: zeroing a layer's MLP output (`output.dense`) leaves its residual sum
  (`output.ln_input_act`) equal to the FFN input (`pre_intermediate_act`), and the layer's
  output equal to LayerNorm of it (the pre-LN claim "output == residual" does not hold);
- quant mode: a tap is the tensor of an (x, s) pair and a patch replaces x, keeping s: the
  identity patch changes nothing bit for bit, activation patching reproduces the source run
  bit for bit (the ranges are frozen state, so scales do not depend on the data);
- dropout sits where HF's does relative to the QuantActs: the embedding dropout before the
  8-bit output_activation (so its output is back on the 8-bit grid), the attention dropout
  on the quantized probabilities (the `softmax` tap is before it, `attentions` after it, as
  HF's hook and return value); train=True leaves the activation ranges frozen;
- the classification head's one `dropout` module called twice ("classifier.dropout.{i}"),
  the multiple-choice and token-classification dropout; `integer=True` refuses patch= and
  train=; the config parses the rates (HF's names and defaults).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN, golden_inputs
from refjax import ibert, quant
from refjax.params.checkpoint import load_checkpoint
from refjax.params.config import ConfigError
from refjax.params.ibert import parse_ibert_config
from refjax.probe import masks_from_taps

RATES = dict(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)


def golden(case: str, dtype=None, **rates):
    ckpt = load_checkpoint(os.path.join(GOLDEN, "ibert", case), **({} if dtype is None else {"dtype": dtype}))
    ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, **rates))
    return ckpt, {k: jnp.asarray(v) for k, v in golden_inputs(f"ibert/{case}").items()}


def run(ckpt, inputs, **kw):
    return ibert.forward(ckpt.params, ckpt.config, **inputs, **kw)


def test_quant_mode_identity_patch_and_activation_patching_are_exact():
    """Quant mode: patches act on the tensor of each (x, s) pair and keep s."""
    ckpt, inputs = golden("quant-mlm")
    base = run(ckpt, inputs, taps=True)
    for patch in ({"encoder.layer.{i}.intermediate.dense": lambda a: a},
                  {"embeddings": base.taps["embeddings"], "encoder.layer.{i}.attention.self.softmax":
                   base.taps["encoder.layer.attention.self.softmax"]}):
        out = run(ckpt, inputs, taps=True, patch=patch)
        np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(base.logits))
        for tap in base.taps:
            np.testing.assert_array_equal(np.asarray(out.taps[tap]), np.asarray(base.taps[tap]), err_msg=tap)
    # run A's layer-0 output patched into run B reproduces A from there on, bit for bit
    a = run(ckpt, dict(inputs, input_ids=(inputs["input_ids"] + 7) % ckpt.config.vocab_size), taps=True)
    patched = run(ckpt, inputs, taps=True, patch={"encoder.layer.0": a.taps["encoder.layer"][0]})
    np.testing.assert_array_equal(np.asarray(patched.taps["encoder.layer"]), np.asarray(a.taps["encoder.layer"]))
    np.testing.assert_array_equal(np.asarray(patched.logits), np.asarray(a.logits))


def test_quant_mode_patch_is_requantized_downstream():
    """A patched tensor off the 8-bit grid (embeddings * 1.3) keeps its scale s; the next
    QuantLinear reads x / s, so the patch reaches the logits."""
    ckpt, inputs = golden("quant-mlm")
    base = run(ckpt, inputs, taps=True)
    out = run(ckpt, inputs, taps=True, patch={"embeddings": lambda x: x * 1.3})
    np.testing.assert_array_equal(np.asarray(out.taps["embeddings"]),
                                  np.asarray(base.taps["embeddings"]) * np.float32(1.3))
    assert not np.allclose(np.asarray(out.logits), np.asarray(base.logits))


def test_quant_mode_embedding_dropout_sits_before_the_output_quantact():
    """HF: LayerNorm -> dropout -> output_activation (8 bits). The embeddings tap is then
    the 8-bit requantization of keep * LayerNorm / (1 - p) at the frozen range's scale."""
    ckpt, inputs = golden("quant-mlm", **RATES)
    base = run(ckpt, inputs, taps=True)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(3))
    keep = np.asarray(out.taps["embeddings.dropout"])
    normed = np.asarray(out.taps["embeddings.LayerNorm"])
    np.testing.assert_array_equal(normed, np.asarray(base.taps["embeddings.LayerNorm"]))
    state = ckpt.params.state.embeddings
    s = quant.symmetric_scale(8, state["output_activation.x_min"], state["output_activation.x_max"])
    emb = np.asarray(out.taps["embeddings"])
    assert not np.any(emb[~keep])
    ints = emb / np.asarray(s)
    np.testing.assert_array_equal(ints, np.round(ints))  # on the 8-bit grid of the frozen scale
    assert np.abs(ints).max() <= 128
    assert not np.array_equal(emb, np.asarray(base.taps["embeddings"]))


def test_quant_mode_attention_dropout_on_the_quantized_probabilities():
    """The softmax tap (HF's `softmax` module output) is before the dropout and unchanged;
    `attentions` (HF's return value) is after it: keep * probs / (1 - p)."""
    ckpt, inputs = golden("quant-mlm", attention_probs_dropout_prob=0.4, hidden_dropout_prob=0.0)
    base = run(ckpt, inputs, taps=True)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(5), output_attentions=True)
    assert set(masks_from_taps(out.taps, ibert.DROPOUT)) == {"encoder.layer.{i}.attention.self.dropout"}
    keep = np.asarray(out.taps["encoder.layer.attention.self.dropout"])
    probs = np.asarray(out.taps["encoder.layer.attention.self.softmax"])
    np.testing.assert_array_equal(probs[0], np.asarray(base.taps["encoder.layer.attention.self.softmax"][0]))
    np.testing.assert_array_equal(np.asarray(out.attentions), np.where(keep, probs * np.float32(1 / (1 - 0.4)), 0))


def test_train_freezes_the_quantization_ranges():
    """forward(train=True) uses `state` as given (HF's train() with the QuantActs in eval):
    with the golden's rates (0) a training call equals eval bit for bit, though calibrate
    (HF's train-mode range update) on the same batch moves the ranges."""
    ckpt, inputs = golden("quant-mlm")  # the golden's rates are 0: dropout is the identity
    base = run(ckpt, inputs)
    out = run(ckpt, inputs, train=True, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(base.logits))
    moved = ibert.calibrate(ckpt.params, ckpt.config, ckpt.params.state, **inputs)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(moved), jax.tree.leaves(ckpt.params.state)))


@pytest.mark.parametrize("case", ["tokcls", "mc"])
def test_head_dropout_of_token_classification_and_multiple_choice(case):
    """`dropout` on the sequence output (token classification) or the pooled output
    (multiple choice), at hidden_dropout_prob; only that mask changed changes the logits."""
    ckpt, inputs = golden(case, jnp.float64, hidden_dropout_prob=0.25)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(6))
    masks = masks_from_taps(out.taps, ibert.DROPOUT)
    width = out.last_hidden_state.shape if case == "tokcls" else out.last_hidden_state.shape[::2]
    assert masks["dropout"].shape == width
    replay = run(ckpt, inputs, train=True, dropout_masks=masks)
    np.testing.assert_allclose(np.asarray(replay.logits), np.asarray(out.logits), rtol=1e-12, atol=1e-12)
    changed = run(ckpt, inputs, train=True, dropout_masks=dict(masks, dropout=np.ones(width, bool)))
    assert not np.allclose(np.asarray(changed.logits), np.asarray(out.logits))


def test_multiple_choice_sees_a_pooler_patch():
    ckpt, inputs = golden("mc", jnp.float64)
    base = run(ckpt, inputs, taps=True)
    out = run(ckpt, inputs, taps=True, patch={"pooler": jnp.zeros_like})
    assert not np.any(np.asarray(out.taps["pooler"]))
    bias = np.asarray(ckpt.params.classifier.bias)
    np.testing.assert_array_equal(np.asarray(out.logits), np.broadcast_to(bias[0], base.logits.shape))


def test_integer_mode_refuses_patches_and_training():
    ckpt, inputs = golden("quant-mlm")
    with pytest.raises(ValueError, match="integer=True .* no patches"):
        run(ckpt, inputs, integer=True, patch={"embeddings": lambda x: x})
    with pytest.raises(ValueError, match=r"integer=True .* no dropout \(train=True\)"):
        run(ckpt, inputs, integer=True, train=True, key=jax.random.key(0))


def test_config_parses_the_rates():
    raw = dict(model_type="ibert", architectures=["IBertForMaskedLM"], hidden_size=8, num_attention_heads=2)
    config = parse_ibert_config(raw)
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.1, 0.1)  # HF's defaults
    config = parse_ibert_config(dict(raw, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0,
                                     classifier_dropout=0.5))  # classifier_dropout: read by no I-BERT head
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.2, 0.0)
    with pytest.raises(ConfigError, match="hidden_dropout_prob"):
        parse_ibert_config(dict(raw, hidden_dropout_prob=1.0))
