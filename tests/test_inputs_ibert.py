"""I-BERT bad inputs and configs (error type + a message naming the culprit), valid edge
cases, `refjax forward` on a quantized golden directory (bit-exact), and `generate`'s
refusal for an encoder."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN
from ibert_helpers import forward
from refjax.params import ibert as ibert_params
from refjax.params.checkpoint import load_checkpoint
from refjax.params.config import ConfigError
from refjax.params.io import read_safetensors, write_safetensors
from refjax import ibert
from refjax.tooling import cli
from refjax.tooling.families import FAMILIES

SEQCLS = os.path.join(GOLDEN, "ibert", "seqcls")
QUANT = os.path.join(GOLDEN, "ibert", "quant-seqcls")


@pytest.fixture(scope="module")
def ck():
    return load_checkpoint(SEQCLS, dtype=jnp.float32)


BASE = {"model_type": "ibert", "architectures": ["IBertModel"], "vocab_size": 20, "hidden_size": 8,
        "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16, "max_position_embeddings": 12}


@pytest.mark.parametrize("change, culprit", [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"force_dequant": "all"}, "force_dequant"),
    ({"quant_mode": "yes"}, "quant_mode"),
    ({"num_attention_heads": 3}, "num_attention_heads"),
    ({"pad_token_id": None}, "pad_token_id"),
    ({"pad_token_id": 11}, "max_position_embeddings"),
    ({"architectures": ["IBertForQuestionAnswering"], "num_labels": 3}, "num_labels"),
    ({"mystery": 1}, "mystery"),
])
def test_bad_config_names_the_field(change, culprit):
    with pytest.raises(ConfigError, match=culprit):
        ibert_params.parse_ibert_config({**BASE, **change})


def test_defaults_follow_hf():
    c = ibert_params.parse_ibert_config(BASE)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id, c.quant_mode, c.force_dequant) == (1, 0, 2, False, "none")
    assert c.max_tokens == 12 - 1 - 1


def test_bad_inputs_name_the_argument(ck):
    p, c = ck.params, ck.config
    T = c.max_tokens + 1
    with pytest.raises(ValueError, match="sequence length .* pad_token_id"):
        ibert.forward(p, c, np.full((1, T), 5))
    with pytest.raises(ValueError, match="input_ids contains"):
        ibert.forward(p, c, np.array([[c.vocab_size]]))
    with pytest.raises(ValueError, match="token_type_ids"):
        ibert.forward(p, c, np.array([[5, 6]]), token_type_ids=np.array([[0, c.type_vocab_size]]))
    with pytest.raises(ValueError, match="position_ids"):
        ibert.forward(p, c, np.array([[5, 6]]), position_ids=np.array([[0, c.max_position_embeddings]]))
    with pytest.raises(ValueError, match="attention_mask"):
        ibert.forward(p, c, np.array([[5, 6]]), attention_mask=np.array([[1, 1, 1]]))
    with pytest.raises(ValueError, match="labels"):
        ibert.forward(p, c, np.array([[5, 6]]), labels=np.array([c.num_labels]))
    with pytest.raises(ValueError, match="cache"):
        ibert.forward(p, c, np.array([[5, 6]]), cache=object())


def test_valid_edges(ck):
    p, c = ck.params, ck.config
    out = ibert.forward(p, c, np.array([[5]]))  # batch 1, length 1
    assert out.logits.shape == (1, c.num_labels)
    out = ibert.forward(p, c, np.full((1, c.max_tokens), 5))  # exactly the table
    assert np.all(np.isfinite(np.asarray(out.logits)))
    out = ibert.forward(p, c, np.array([[5, 6], [1, 1]]), attention_mask=np.array([[1, 1], [0, 0]]))
    assert np.all(np.isfinite(np.asarray(out.logits)))  # float mode: a fully padded row stays finite


@pytest.mark.parametrize("case", ["quant-mlm", "quant-seqcls", "quant-dequant-gelu"])
def test_quant_mode_fully_padded_row_is_finite_and_leaves_other_rows_bit_exact(case):
    """HF's quant mode turns a fully padded row into NaN (finfo.min / scale overflows to -inf,
    then -inf - max); refjax gives that row uniform attention instead. Other rows: unchanged."""
    ck = load_checkpoint(os.path.join(GOLDEN, "ibert", case))
    golden, _ = read_safetensors(os.path.join(GOLDEN, "ibert", case, "golden.safetensors"))
    ids, mask = np.array(golden["input_ids"]), np.array(golden["attention_mask"])
    padded = mask.copy()
    padded[1] = 0
    out = forward(ck.params, ck.config, ids, attention_mask=padded)
    ref = forward(ck.params, ck.config, ids, attention_mask=mask)
    logits, ref_logits = np.asarray(out.logits), np.asarray(ref.logits)
    assert np.all(np.isfinite(logits))
    keep = np.arange(ids.shape[0]) != 1
    np.testing.assert_array_equal(logits[keep], ref_logits[keep])


def test_generate_refuses_an_encoder(ck):
    with pytest.raises(ValueError, match="encoder"):
        FAMILIES["ibert"].generate(ck.params, ck.config, np.array([[5, 6]]), max_new_tokens=2)


def test_cli_forward_quant_directory_is_bit_exact(capsys, tmp_path):
    golden, _ = read_safetensors(os.path.join(QUANT, "golden.safetensors"))
    inputs = tmp_path / "in.safetensors"
    write_safetensors(inputs, {k: golden[k] for k in ("input_ids", "attention_mask")})
    out_path = tmp_path / "out.safetensors"
    code = cli.main(["forward", QUANT, "--inputs", str(inputs), "--out", str(out_path)])
    assert code in (0, None), capsys.readouterr().err
    out, _ = read_safetensors(out_path)
    for i in range(3):
        np.testing.assert_array_equal(out[f"hidden_states.{i}"], golden[f"float32/hidden_states.{i}"])
    np.testing.assert_allclose(out["logits"], golden["float32/logits"], rtol=0, atol=1e-5)
