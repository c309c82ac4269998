"""MEGA bad inputs and bad config values: each raises the stated error type with a message
naming the culprit, before any compute. Plus valid edge cases (batch 1, length 1, fully
padded rows stay finite) and `refjax forward` on a golden MEGA directory."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN
from mega_helpers import FWD, random_params
from refjax.params.config import ConfigError
from refjax.params.io import read_safetensors, write_safetensors
from refjax.params.mega import parse_mega_config
from refjax import mega
from refjax.tooling import cli

BASE = dict(model_type="mega", architectures=["MegaModel"], vocab_size=40, hidden_size=8, num_hidden_layers=1,
            intermediate_size=12, ema_projection_size=2, shared_representation_size=4, nffn_hidden_size=12,
            max_positions=16)


def cfg(**overrides):
    return parse_mega_config({**BASE, **overrides})


IDS = np.array([[3, 4, 5, 6], [7, 8, 9, 10]])

BAD_INPUTS = [
    ("id out of range", {}, dict(input_ids=np.array([[3, 40]])), "input_ids"),
    ("mask shape", {}, dict(input_ids=IDS, attention_mask=np.ones((2, 3), np.int64)), "attention_mask"),
    ("ids and embeds", {}, dict(input_ids=IDS, inputs_embeds=np.zeros((2, 4, 8), np.float32)), "exactly one"),
    ("embeds width", {}, dict(inputs_embeds=np.zeros((2, 4, 5), np.float32)), "inputs_embeds"),
    ("token types without embeddings", {}, dict(input_ids=IDS, token_type_ids=np.zeros_like(IDS)), "token_type_ids"),
    ("token type out of range", dict(add_token_type_embeddings=True),
     dict(input_ids=IDS, token_type_ids=np.full_like(IDS, 2)), "token_type_ids"),
    ("chunking: not a multiple", dict(use_chunking=True, chunk_size=3), dict(input_ids=np.full((1, 5), 3)),
     "chunk_size"),
    ("chunked decoder shorter than a chunk", dict(use_chunking=True, chunk_size=4, is_decoder=True,
                                                  bidirectional=False), dict(input_ids=np.full((1, 3), 3)),
     "chunk_size"),
    ("simple bias too long", dict(relative_positional_bias="simple", max_positions=4),
     dict(input_ids=np.full((1, 5), 3)), "max_positions"),
    ("simple bias beyond chunk_size", dict(relative_positional_bias="simple", chunk_size=3),
     dict(input_ids=np.full((1, 4), 3)), "chunk_size"),
    ("lm labels out of range", dict(architectures=["MegaForMaskedLM"]), dict(input_ids=IDS, labels=IDS + 40),
     "labels"),
    ("multiple choice needs choices", dict(architectures=["MegaForMultipleChoice"]), dict(input_ids=IDS),
     "choices"),
    ("multiple choice label", dict(architectures=["MegaForMultipleChoice"]),
     dict(input_ids=np.full((2, 3, 4), 3), labels=np.array([0, 3])), "labels"),
    ("fast path", {}, dict(input_ids=IDS, fast=True), "fast"),
]


@pytest.mark.parametrize("name,overrides,inputs,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_culprit(name, overrides, inputs, match):
    config = cfg(**overrides)
    params = random_params(config, 0)
    with pytest.raises(ValueError, match=match):
        mega.forward(params, config, **inputs)


BAD_CONFIGS = [
    (dict(normalization_type="groupnorm"), "normalization_type"),
    (dict(attention_activation="gelu"), "attention_activation"),
    (dict(relative_positional_bias="alibi"), "relative_positional_bias"),
    (dict(activation="nope"), "activation"),
    (dict(normalization_type="layernorm", norm_affine=False), "norm_affine"),
    (dict(use_chunking=True), "chunk_size"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(shared_representation_size=5), "shared_representation_size"),
    (dict(truncation=0), "truncation"),
    (dict(architectures=["MegaForQuestionAnswering"], num_labels=3), "num_labels"),
    (dict(architectures=["MegaForPreTraining"]), "MegaForPreTraining"),
    (dict(pad_token_id=40), "pad_token_id"),
    (dict(bidirectional="yes"), "bidirectional"),
    (dict(some_new_flag=1), "some_new_flag"),
]


@pytest.mark.parametrize("overrides,match", BAD_CONFIGS, ids=[str(b[0]) for b in BAD_CONFIGS])
def test_bad_config_values_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**overrides)


def test_cache_misuse_raises():
    config = cfg(architectures=["MegaForCausalLM"], is_decoder=True, bidirectional=False)
    params = random_params(config, 0)
    cache = mega.init_cache(config, 2, 8, jnp.float32)
    out = mega.forward(params, config, IDS[:, :2], cache=cache)
    with pytest.raises(ValueError, match="one new token"):
        mega.forward(params, config, IDS[:, :2], cache=out.cache)
    with pytest.raises(ValueError, match="do not fit the cache"):
        mega.forward(params, config, np.full((2, 9), 3), cache=mega.init_cache(config, 2, 8, jnp.float32))
    encoder = cfg(architectures=["MegaForMaskedLM"])
    with pytest.raises(ValueError, match="bidirectional|is_decoder"):
        mega.forward(random_params(encoder, 0), encoder, IDS, cache=cache)


@pytest.mark.parametrize("overrides", [
    dict(), dict(is_decoder=True, bidirectional=False), dict(attention_activation="laplace"),
    dict(attention_activation="relu2", is_decoder=True, bidirectional=False),
    dict(use_chunking=True, chunk_size=2), dict(normalization_type="batchnorm"),
])
def test_valid_edge_cases_batch_one_length_one_and_fully_padded_rows(overrides):
    config = cfg(architectures=["MegaForMaskedLM"], **overrides)
    params = random_params(config, 1)
    one = FWD(params, config, np.array([[5]]))
    assert one.logits.shape == (1, 1, 40) and bool(jnp.all(jnp.isfinite(one.logits)))
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])
    out = FWD(params, config, IDS, mask, output_hidden_states=True, output_attentions=True)
    assert bool(jnp.all(jnp.isfinite(out.logits))) and bool(jnp.all(jnp.isfinite(out.attentions)))
    alone = FWD(params, config, IDS[:1], mask[:1])
    np.testing.assert_allclose(np.asarray(alone.logits[0]), np.asarray(out.logits[0]), rtol=1e-5, atol=1e-5)


def test_lists_are_accepted_like_tensors():
    config = cfg()
    params = random_params(config, 0)
    a = mega.forward(params, config, IDS.tolist(), np.ones_like(IDS).tolist())
    b = mega.forward(params, config, jnp.asarray(IDS), jnp.ones((2, 4), jnp.int32))
    np.testing.assert_array_equal(np.asarray(a.last_hidden_state), np.asarray(b.last_hidden_state))


def test_cli_forward_on_a_golden_mega_directory_matches_hf(tmp_path, capsys):
    case = os.path.join(GOLDEN, "mega", "causal-lm")
    golden, _ = read_safetensors(os.path.join(case, "golden.safetensors"))
    write_safetensors(tmp_path / "in.safetensors", {k: np.asarray(golden[k]) for k in
                                                     ("input_ids", "attention_mask", "labels")})
    code = cli.main(["forward", case, "--inputs", str(tmp_path / "in.safetensors"),
                     "--out", str(tmp_path / "out.safetensors")])
    assert code == 0, capsys.readouterr().err
    out, _ = read_safetensors(tmp_path / "out.safetensors")
    for field in ("logits", "loss", "hidden_states.2"):
        want = np.asarray(golden[f"float32/{field}"], np.float64)
        err = np.abs(np.asarray(out[field], np.float64) - want).max() / max(np.abs(want).max(), 1.0)
        assert err <= 1e-4, (field, err)


def test_generate_refuses_encoders_and_bidirectional_models():
    from refjax.tooling.families import FAMILIES

    config = dataclasses.replace(cfg(), architecture="MegaForCausalLM")
    with pytest.raises(ValueError, match="decoder|is_decoder"):
        FAMILIES["mega"].generate(random_params(config, 0), config, IDS, max_new_tokens=2)


@pytest.mark.parametrize("overrides", [dict(), dict(use_normalized_ffn=False, use_chunking=True, chunk_size=2)])
def test_taps_repeat_the_outputs_they_name(overrides):
    from refjax.tooling import diff

    config = cfg(**overrides)
    params = random_params(config, 2)
    out = mega.forward(params, config, IDS, np.array([[1, 1, 1, 1], [0, 1, 1, 1]]), output_hidden_states=True,
                       output_attentions=True, taps=True)
    taps = diff.expand_taps(out.taps, mega.TAPS, config.num_hidden_layers)
    np.testing.assert_array_equal(taps["embedding_layer"], out.hidden_states[0])
    for i in range(config.num_hidden_layers):
        np.testing.assert_array_equal(taps[f"layers.{i}"], out.hidden_states[i + 1])
        np.testing.assert_array_equal(taps[f"layers.{i}.mega_layer.attn_weights"], out.attentions[i])
        if not config.use_normalized_ffn:
            np.testing.assert_array_equal(taps[f"layers.{i}.nffn"], taps[f"layers.{i}.mega_layer"])
