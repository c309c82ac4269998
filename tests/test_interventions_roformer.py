"""RoFormer's interventions and training mode beyond the shared tests/test_interventions.py
(core tier, golden checkpoints in float64):

- post-LayerNorm: zeroing a layer's MLP output (`output.dense`) leaves that layer's output
  equal to LayerNorm(post-attention residual), computed here from the taps with the layer's
  own `output.LayerNorm` weights (the pre-LN claim "output == residual" does not hold);
- the sites RoFormer has and GPT-2/Arcee lack: the embedding dropout (after the LayerNorm,
  before `embeddings_project`), the classification head's one `dropout` module called twice
  (two masks, "classifier.dropout.{i}"), the multiple-choice summary's first/last dropout
  (absent from HF's config = no dropout), the token-classification dropout;
- the attention probabilities tap (and `attentions`) are taken after the dropout, as HF
  returns them; the config parses each rate, HF's names and defaults.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN, golden_inputs
from refjax import roformer
from refjax.params.checkpoint import load_checkpoint
from refjax.params.config import ConfigError
from refjax.params.roformer import parse_roformer_config
from refjax.probe import masks_from_taps

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def golden(case: str, **rates):
    ckpt = load_checkpoint(os.path.join(GOLDEN, "roformer", case), dtype=jnp.float64)
    ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, **rates))
    return ckpt, {k: jnp.asarray(v) for k, v in golden_inputs(f"roformer/{case}", INPUTS).items()}


def run(ckpt, inputs, **kw):
    return roformer.forward(ckpt.params, ckpt.config, **inputs, **kw)


def test_embedding_dropout_is_after_the_layernorm_and_scaled():
    """embeddings_project (no projection in this golden) = keep * LayerNorm / (1 - p)."""
    ckpt, inputs = golden("mlm", hidden_dropout_prob=0.3)
    base = run(ckpt, inputs, taps=True)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(3))
    keep = np.asarray(out.taps["embeddings.dropout"])
    np.testing.assert_array_equal(np.asarray(out.taps["embeddings.LayerNorm"]),
                                  np.asarray(base.taps["embeddings.LayerNorm"]))
    expected = np.where(keep, np.asarray(base.taps["embeddings.LayerNorm"]) / (1 - 0.3), 0.0)
    np.testing.assert_allclose(np.asarray(out.taps["embeddings_project"]), expected, rtol=1e-15, atol=0)
    assert abs((1 - keep.mean()) - 0.3) <= 5 * np.sqrt(0.3 * 0.7 / keep.size)


def test_attention_probs_are_returned_after_their_dropout():
    """With only the attention dropout on, layer 0's probabilities tap (and `attentions`, as
    HF returns them) is keep * softmax / (1 - p). 1e-12: the train and eval scans are
    compiled apart, XLA may fuse the softmax differently."""
    ckpt, inputs = golden("mlm", attention_probs_dropout_prob=0.4, hidden_dropout_prob=0.0)
    base = run(ckpt, inputs, taps=True)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(5), output_attentions=True)
    keep = np.asarray(out.taps["encoder.layer.attention.self.dropout"])
    probs = np.asarray(out.taps["encoder.layer.attention.self.probs"])
    np.testing.assert_array_equal(np.asarray(out.attentions), probs)
    assert set(masks_from_taps(out.taps, roformer.DROPOUT)) == {"encoder.layer.{i}.attention.self.dropout"}
    expected = np.where(keep[0], np.asarray(base.taps["encoder.layer.attention.self.probs"][0]) / (1 - 0.4), 0.0)
    np.testing.assert_allclose(probs[0], expected, rtol=1e-12, atol=1e-15)


def test_summary_dropouts_exist_only_with_a_rate():
    """RoFormerSequenceSummary builds its dropouts only when the config has the attribute > 0
    (RoFormerConfig has none): the golden mc config has neither, so no site is drawn."""
    ckpt, inputs = golden("mc-summary-first-proj")
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(2))
    assert not any(name.startswith("sequence_summary") for name in out.taps)
    ckpt, inputs = golden("mc-summary-first-proj", summary_first_dropout=0.3, summary_last_dropout=0.2)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(2))
    n_flat = int(np.prod(inputs["input_ids"].shape[:-1]))
    for site in ("sequence_summary.first_dropout", "sequence_summary.last_dropout"):
        assert out.taps[site].shape == (n_flat, ckpt.config.hidden_size), site


def test_token_classification_dropout():
    ckpt, inputs = golden("tokcls", hidden_dropout_prob=0.25)
    out = run(ckpt, inputs, taps=True, train=True, key=jax.random.key(6))
    masks = masks_from_taps(out.taps, roformer.DROPOUT)
    assert masks["dropout"].shape == out.last_hidden_state.shape
    replay = run(ckpt, inputs, train=True, dropout_masks=masks)
    np.testing.assert_allclose(np.asarray(replay.logits), np.asarray(out.logits), rtol=1e-12, atol=1e-12)
    no_head_drop = dict(masks, dropout=np.ones(out.last_hidden_state.shape, bool))
    changed = run(ckpt, inputs, train=True, dropout_masks=no_head_drop)
    assert not np.allclose(np.asarray(changed.logits), np.asarray(out.logits))


def test_config_parses_the_rates():
    raw = dict(model_type="roformer", architectures=["RoFormerForMultipleChoice"], hidden_size=8,
               num_attention_heads=2)
    config = parse_roformer_config(raw)
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.1, 0.1)  # HF's defaults
    assert (config.summary_first_dropout, config.summary_last_dropout) == (0.0, 0.0)  # HF: absent, no dropout
    config = parse_roformer_config(dict(raw, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0,
                                        summary_first_dropout=0.3, summary_last_dropout=0.4, classifier_dropout=0.5))
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.2, 0.0)
    assert (config.summary_first_dropout, config.summary_last_dropout) == (0.3, 0.4)
    with pytest.raises(ConfigError, match="hidden_dropout_prob"):
        parse_roformer_config(dict(raw, hidden_dropout_prob=1.0))
