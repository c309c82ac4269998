"""Reference tier: refjax RoFormer against HF transformers live, on random configs over every
option (every head, rotary_value, embedding_size != hidden_size, is_decoder, tying, activations),
in float32 and float64, with padded inputs; cached greedy generation against HF's generate.

Tolerances (relative to max|hf|, floor 1): float32 1e-5, float64 1e-12 (hf_helpers.TOL).
HF's causal-LM loss runs in float32 even for a float64 model: compared at 1e-5 there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_helpers import TOL, quiet_torch  # noqa: E402
from roformer_helpers import FWD, SEEDS, raw_configs, rel_err  # noqa: E402

from refjax.params.roformer import parse_roformer_config  # noqa: E402
from refjax.tooling.families import FAMILIES  # noqa: E402

pytestmark = pytest.mark.reference


def hf_model(raw: dict, seed: int, dtype):
    from transformers.models.roformer.modeling_roformer import RoFormerSinusoidalPositionalEmbedding

    cfg = transformers.RoFormerConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(seed)
    model = getattr(transformers, raw["architectures"][0])._from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(owner, RoFormerSinusoidalPositionalEmbedding):
                continue  # HF's fixed table
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if isinstance(owner, torch.nn.LayerNorm) and name.endswith("weight")
                    else 0.3 * noise)
    model.tie_weights()
    return model.to(dtype)


def refjax_checkpoint(model, tmp_path, dtype):
    from refjax.params.checkpoint import load_checkpoint

    model.save_pretrained(tmp_path, safe_serialization=True)
    return load_checkpoint(tmp_path, dtype=jnp.dtype(dtype))


def make_inputs(raw, rng, arch):
    B, T = 3, int(rng.integers(2, 9))
    ids = rng.integers(1, raw["vocab_size"], size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, T // 2:] = 0  # right padding
    mask[2, : max(1, T // 3)] = 0  # left padding
    x = dict(input_ids=np.where(mask == 1, ids, 0).astype(np.int64), attention_mask=mask,
             token_type_ids=rng.integers(0, raw["type_vocab_size"], size=(B, T)).astype(np.int64))
    if arch == "RoFormerForMultipleChoice":
        x = {k: np.stack([v, v[::-1]], axis=0) for k, v in x.items()}  # [2, C=3, T]
        x["labels"] = rng.integers(0, 3, size=(2,)).astype(np.int64)
    elif arch in ("RoFormerForMaskedLM", "RoFormerForCausalLM"):
        x["labels"] = np.where(mask == 1, x["input_ids"], -100)
    elif arch == "RoFormerForSequenceClassification":
        x["labels"] = (rng.integers(0, raw["num_labels"], size=(B,)) if raw["num_labels"] > 1
                       else rng.standard_normal(B))
    elif arch == "RoFormerForTokenClassification":
        x["labels"] = rng.integers(0, raw["num_labels"], size=(B, T)).astype(np.int64)
    elif arch == "RoFormerForQuestionAnswering":
        x["start_positions"] = rng.integers(0, T + 2, size=(B,)).astype(np.int64)
        x["end_positions"] = rng.integers(0, T + 2, size=(B,)).astype(np.int64)
    return x


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(raw=raw_configs(), seed=SEEDS, dtype=st.sampled_from(["float32", "float64"]))
def test_every_head_matches_hf(tmp_path_factory, raw, seed, dtype):
    compare_with_hf(raw, seed, dtype, tmp_path_factory.mktemp("rf"))


@pytest.mark.parametrize("arch", [
    "RoFormerModel", "RoFormerForMaskedLM", "RoFormerForCausalLM", "RoFormerForSequenceClassification",
    "RoFormerForMultipleChoice", "RoFormerForTokenClassification", "RoFormerForQuestionAnswering"])
def test_every_head_with_rotary_value_and_embeddings_project(tmp_path, arch):
    """Not left to the draw: rotary_value=True, embedding_size 12 != hidden_size 16, untied,
    and the decoder mask for the LM heads, in float64."""
    raw = dict(model_type="roformer", architectures=[arch], vocab_size=30, hidden_size=16, embedding_size=12,
               num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, hidden_act="gelu",
               max_position_embeddings=24, type_vocab_size=2, layer_norm_eps=1e-12, rotary_value=True,
               is_decoder=arch in ("RoFormerForCausalLM", "RoFormerForMaskedLM"), tie_word_embeddings=False,
               pad_token_id=0, num_labels=3)
    compare_with_hf(raw, 7, "float64", tmp_path)


def compare_with_hf(raw, seed, dtype, tmp_path):
    arch = raw["architectures"][0]
    rng = np.random.default_rng(seed)
    x = make_inputs(raw, rng, arch)
    with quiet_torch():
        model = hf_model(raw, seed, getattr(torch, dtype))
        kwargs = {k: (torch.from_numpy(v).to(getattr(torch, dtype)) if v.dtype.kind == "f" else torch.from_numpy(v))
                  for k, v in x.items()}
        if arch == "RoFormerForCausalLM" or arch == "RoFormerModel":
            kwargs["use_cache"] = False  # only these two forwards take it
        with torch.no_grad():
            hf = model(**kwargs, output_hidden_states=True, output_attentions=True)
        ckpt = refjax_checkpoint(model, tmp_path, dtype)
    x = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in x.items()}
    with jax.default_matmul_precision("highest"):
        out = FWD(ckpt.params, ckpt.config, **x, output_hidden_states=True, output_attentions=True)
    tol = TOL[dtype]
    for field in ("logits", "start_logits", "end_logits", "last_hidden_state", "loss"):
        ref = getattr(hf, field, None)
        if ref is None:
            continue
        ours = np.asarray(getattr(out, field))
        ref = ref.float().numpy() if field == "loss" and ref.dtype == torch.float32 else ref.numpy()
        field_tol = TOL["float32"] if (field == "loss" and ref.dtype == np.float32) else tol
        assert rel_err(ours.reshape(ref.shape), ref) <= field_tol, (field, arch, dtype)
    for i, h in enumerate(hf.hidden_states):
        assert rel_err(np.asarray(out.hidden_states[i]), h.numpy()) <= tol, ("hidden_states", i)
    for i, a in enumerate(hf.attentions):
        assert rel_err(np.asarray(out.attentions[i]), a.numpy()) <= tol, ("attentions", i)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(raw=raw_configs("RoFormerForCausalLM", is_decoder=True), seed=SEEDS)
def test_greedy_generation_matches_hf(tmp_path_factory, raw, seed):
    raw = dict(raw, eos_token_id=1, max_position_embeddings=max(raw["max_position_embeddings"], 24))
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, raw["vocab_size"], size=(3, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids = np.where(mask == 1, ids, 0)
    with quiet_torch():
        model = hf_model(raw, seed, torch.float32)
        with torch.no_grad():
            want = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=8,
                                  do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=1).numpy()
        ckpt = refjax_checkpoint(model, tmp_path_factory.mktemp("rf"), "float32")
    with jax.default_matmul_precision("highest"):
        got = FAMILIES["roformer"].generate(ckpt.params, ckpt.config, ids, mask, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_sinusoidal_table_is_hf_bit_for_bit():
    from transformers.models.roformer.modeling_roformer import RoFormerSinusoidalPositionalEmbedding

    from refjax.params.roformer import sinusoidal_table

    for positions, dim in ((48, 8), (1536, 64), (100, 6)):
        module = RoFormerSinusoidalPositionalEmbedding(positions, dim)
        module._init_weight()
        np.testing.assert_array_equal(sinusoidal_table(positions, dim), module.weight.detach().numpy())


def test_parse_roformer_config_agrees_with_hf_defaults():
    hf = transformers.RoFormerConfig()
    ours = parse_roformer_config({"model_type": "roformer"})
    for field in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
                  "rotary_value", "is_decoder", "tie_word_embeddings", "pad_token_id", "num_labels"):
        assert getattr(ours, field) == getattr(hf, field), field
