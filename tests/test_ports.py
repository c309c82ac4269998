"""Optional tier: a real third-party implementation verified end to end (docs/ports.md).

keras-hub's GPT-2 on the JAX backend, loaded by keras-hub's own Hugging Face converter
from the golden checkpoint `gpt2/lm`, is checked against refjax with `refjax.compare` on
the golden input (one left-padded, one right-padded and one middle-padded row). The glue,
`keras_hub_dump`, is the worked example of docs/ports.md. Skipped when keras-hub is not
installed (`pip install 'refjax[ports]'`; docs/ports.md says how to leave TensorFlow out).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")  # keras reads it once, at import
keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed: pip install 'refjax[ports]' (docs/ports.md)")
import keras  # noqa: E402

import refjax  # noqa: E402
from conftest import GOLDEN, golden_inputs  # noqa: E402
from refjax.tooling import envelope  # noqa: E402

if keras.backend.backend() != "jax":
    pytest.skip(f"keras runs on {keras.backend.backend()!r}; this tier needs KERAS_BACKEND=jax",
                allow_module_level=True)

LM = os.path.join(GOLDEN, "gpt2", "lm")


# ---- the glue of docs/ports.md, as it is printed there ----------------------------------
def keras_hub_dump(backbone, inputs: dict) -> dict:
    """keras-hub GPT-2 outputs under refjax's names: every layer output, the final norm, logits."""
    ours = {"token_embedding": "wte", "position_embedding": "wpe", "embeddings_dropout": "drop",
            **{f"transformer_layer_{i}": f"h.{i}" for i in range(backbone.num_layers)}, "layer_norm": "ln_f"}
    probe = keras.Model(backbone.inputs, {name: backbone.get_layer(k).output for k, name in ours.items()})
    with jax.numpy_dtype_promotion("standard"):  # keras mixes bool and int masks (refjax's tests run strict)
        out = probe({"token_ids": inputs["input_ids"], "padding_mask": inputs["attention_mask"]})
    theirs = {name: np.asarray(value) for name, value in out.items()}
    theirs["logits"] = theirs["ln_f"] @ np.asarray(backbone.token_embedding.embeddings).T  # tied LM head
    return theirs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """What `refjax forward golden/gpt2/lm --inputs in.safetensors --out ref.safetensors --taps` writes."""
    return envelope.run(LM, golden_inputs("gpt2/lm"), "float32")


def load():
    return keras_hub.models.GPT2Backbone.from_preset(LM)  # keras-hub reads config.json + model.safetensors


def test_keras_hub_gpt2_matches_refjax_at_every_real_position(reference):
    theirs = keras_hub_dump(load(), reference.inputs)
    report = refjax.compare(reference, theirs, allow_missing=True, max_kl=1e-9, min_top1=1.0, min_topk=1.0)
    assert report.ok, report
    assert report.positions.counts == (38, 48)  # the golden's left, right and middle padding
    assert [r.name for r in report.rows if not r.missing] == ["wte", "wpe", "drop", "h.0", "h.1", "ln_f", "logits"]
    assert report.row("logits").max_abs < 1e-5
    (logits,) = report.logits
    assert logits.top1 == 1.0 and logits.kl_max < 1e-9
    # padded positions are implementation-defined: keras-hub's pad rows differ from HF's
    everywhere = refjax.compare(reference, theirs, allow_missing=True, all_positions=True)
    assert not everywhere.ok and everywhere.row("logits").max_abs > 1.0
    assert everywhere.row("logits").at[0] in (1, 2, 3)  # a padded row


@pytest.mark.parametrize("bug", ["layer 1 feedforward LayerNorm epsilon 1e-5 -> 1e-3",
                                 "layer 1 GELU exact instead of tanh"])
def test_a_bug_planted_in_keras_hub_is_found_in_its_layer(bug, reference):
    backbone = load()
    layer = backbone.get_layer("transformer_layer_1")
    if "epsilon" in bug:
        layer._feedforward_layer_norm.epsilon = 1e-3
    else:
        layer._feedforward_intermediate_dense.activation = keras.activations.gelu  # approximate=False
    report = refjax.compare(reference, keras_hub_dump(backbone, reference.inputs), allow_missing=True)
    assert not report.ok and report.first_divergence.name == "h.1", report
    assert report.row("h.0").ok
