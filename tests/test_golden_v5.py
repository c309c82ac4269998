"""Goldens made by transformers 5.x itself (`tools/make_golden.py --v5`, its `V5_CASES`).

Each `<family>/v5-<case>` is its 4.57.6 twin `<family>/<case>` (same variant, same seed: same
weights and inputs) built, saved and run by transformers 5.25.0 with torch 2.13.0, so its
config.json and tokenizer files are v5's own. tests/test_golden.py runs them through `verify`
like every case; this file checks that they are v5's (versions, the config keys v5 writes) and
pins down what v5 computes differently from 4.57.6, by comparing each with its twin:

- GPT-2: one additive finfo.min mask for pad and future keys, so a query that sees no real key
  (a left-pad position) attends to all keys instead of its past (refjax: `future_fill`, read
  from config.json's transformers_version); those positions differ grossly, and so does the loss,
  which reads the last of them; every other position in the last bits only (v5 multiplies the
  scores by one precomputed scale where 4.57 divides by sqrt(head_dim)).
- RoFormer with an untied decoder: v5 keeps `cls.predictions.decoder.bias` as a parameter of its
  own, saves it beside `cls.predictions.bias` and adds only it (refjax reads it in that one's place).
- Everything else (Arcee with v5's `rope_parameters`, RoFormer tied, I-BERT float and quant mode):
  bit for bit the twin's outputs.

No torch needed: numpy, the stored files and refjax's config parsers.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from conftest import GOLDEN
from refjax.params.arcee import parse_arcee_config
from refjax.params.checkpoint import load_config
from refjax.params.io import read_safetensors

with open(os.path.join(GOLDEN, "MANIFEST.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)
V5 = {name: entry for name, entry in MANIFEST["cases"].items() if "twin" in entry}
CASES = sorted(V5)

EXPECTED = {
    "gpt2/v5-lm": "gpt2/lm",
    "arcee/v5-causal-lm": "arcee/causal-lm",
    "arcee/v5-rope-yarn": "arcee/rope-yarn",
    "arcee/v5-rope-longrope": "arcee/rope-longrope",
    "roformer/v5-mlm": "roformer/mlm",
    "roformer/v5-mlm-untied": "roformer/mlm-untied",
    "ibert/v5-seqcls": "ibert/seqcls",
    "ibert/v5-quant-seqcls": "ibert/quant-seqcls",
}

# config.json keys v5 writes that the twin's (4.57.6) has not, and the reverse
NEW_KEYS = {
    "gpt2/v5-lm": {"add_cross_attention", "tie_word_embeddings"},
    "arcee/v5-causal-lm": {"rope_parameters"},
    "arcee/v5-rope-yarn": {"rope_parameters"},
    "arcee/v5-rope-longrope": {"rope_parameters"},
    "roformer/v5-mlm": {"add_cross_attention", "bos_token_id", "eos_token_id", "is_decoder", "tie_word_embeddings"},
    "roformer/v5-mlm-untied": {"add_cross_attention", "bos_token_id", "eos_token_id", "is_decoder"},
    "ibert/v5-seqcls": {"tie_word_embeddings"},
    "ibert/v5-quant-seqcls": {"tie_word_embeddings"},
}
GONE_KEYS = {
    **{c: {"rope_theta", "rope_scaling"} for c in ("arcee/v5-causal-lm", "arcee/v5-rope-yarn", "arcee/v5-rope-longrope")},
    **{c: {"position_embedding_type"} for c in ("ibert/v5-seqcls", "ibert/v5-quant-seqcls")},
}


def case_file(case: str, name: str):
    with open(os.path.join(GOLDEN, case, name), encoding="utf-8") as f:
        return json.load(f)


def test_v5_cases_are_listed_with_their_versions():
    assert {name: entry["twin"] for name, entry in V5.items()} == EXPECTED
    for name, entry in V5.items():
        assert entry["transformers"].startswith("5."), name
        assert entry["torch"].startswith("2.13.0"), name
        twin = MANIFEST["cases"][entry["twin"]]
        assert "transformers" not in twin and "twin" not in twin  # made by the global generator, 4.57.6
        assert (entry["family"], entry["architecture"]) == (twin["family"], twin["architecture"])
    assert MANIFEST["generator"]["transformers"] == "4.57.6"  # a --v5 run keeps it


@pytest.mark.parametrize("case", CASES)
def test_v5_case_was_written_by_v5(case):
    version = V5[case]["transformers"]
    assert case_file(case, "config.json")["transformers_version"] == version
    if os.path.isfile(os.path.join(GOLDEN, case, "generation_config.json")):
        assert case_file(case, "generation_config.json")["transformers_version"] == version
    _, metadata = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    assert (metadata["case"], metadata["transformers"]) == (case, version)
    raw, twin_raw = case_file(case, "config.json"), case_file(EXPECTED[case], "config.json")
    assert set(raw) - set(twin_raw) == NEW_KEYS[case]
    assert set(twin_raw) - set(raw) == GONE_KEYS.get(case, set())
    family, config, _ = load_config(os.path.join(GOLDEN, case))
    assert family == V5[case]["family"] and config.architecture == V5[case]["architecture"]


def test_arcee_v5_configs_carry_rope_parameters():
    for case, rope_type in (("arcee/v5-causal-lm", "default"), ("arcee/v5-rope-yarn", "yarn"),
                            ("arcee/v5-rope-longrope", "longrope")):
        raw = case_file(case, "config.json")
        params = raw["rope_parameters"]
        assert params["rope_type"] == rope_type and params["rope_theta"] == 10000.0, case
    # default and yarn: v5's keys parse to the twin's (4.57) config
    for case in ("arcee/v5-causal-lm", "arcee/v5-rope-yarn"):
        assert parse_arcee_config(case_file(case, "config.json")) == parse_arcee_config(
            case_file(EXPECTED[case], "config.json"))
    # longrope: v5 copies original_max_position_embeddings into rope_parameters (and keeps the top level);
    # refjax computes v5's attention factor at parse time, the value 4.57 computes in the forward
    raw = case_file("arcee/v5-rope-longrope", "config.json")
    assert raw["rope_parameters"]["original_max_position_embeddings"] == raw["original_max_position_embeddings"] == 16
    scaling = parse_arcee_config(raw).rope_scaling
    assert scaling.factor == 128 / 16 and scaling.attention_factor == math.sqrt(1 + math.log(8) / math.log(16))


def test_gpt2_v5_config_selects_v5_mask():
    assert load_config(os.path.join(GOLDEN, "gpt2", "v5-lm"))[1].future_fill == "finfo.min"
    assert load_config(os.path.join(GOLDEN, "gpt2", "lm"))[1].future_fill == "-inf"


def test_gpt2_v5_tokenizer_files():
    """v5's tokenizer save: tokenizer.json + tokenizer_config.json (no special_tokens_map.json);
    the BPE model (vocab, merges) is the twin's."""
    assert sorted(f for f in os.listdir(os.path.join(GOLDEN, "gpt2", "v5-lm")) if f.startswith("tokenizer")
                  or f.startswith("special")) == ["tokenizer.json", "tokenizer_config.json"]
    ours, twin = case_file("gpt2/v5-lm", "tokenizer.json"), case_file("gpt2/lm", "tokenizer.json")
    assert ours["model"] == twin["model"] and ours["pre_tokenizer"] == twin["pre_tokenizer"]


def no_real_key(mask: np.ndarray) -> np.ndarray:
    """[B, T] bool: causal queries that see no real key (every key up to them is padding)."""
    return np.cumsum(mask, axis=-1) == 0


def differing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ~((a == b) | (np.isnan(a) & np.isnan(b))) if a.dtype.kind == "f" else a != b


@pytest.mark.parametrize("case", CASES)
def test_v5_case_equals_its_twin_except_where_v5_computes_otherwise(case):
    twin = EXPECTED[case]
    weights, _ = read_safetensors(os.path.join(GOLDEN, case, "model.safetensors"))
    twin_weights, _ = read_safetensors(os.path.join(GOLDEN, twin, "model.safetensors"))
    extra = set(weights) - set(twin_weights)
    assert extra == ({"cls.predictions.decoder.bias"} if case == "roformer/v5-mlm-untied" else set())
    assert set(twin_weights) <= set(weights)
    for k in twin_weights:
        assert np.asarray(weights[k]).tobytes() == np.asarray(twin_weights[k]).tobytes(), k
    if extra:  # v5's own decoder bias, not a copy of cls.predictions.bias
        assert not np.array_equal(weights["cls.predictions.decoder.bias"], weights["cls.predictions.bias"])

    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    twin_golden, _ = read_safetensors(os.path.join(GOLDEN, twin, "golden.safetensors"))
    assert sorted(golden) == sorted(twin_golden)
    differ = {}
    for k in golden:
        a, b = np.asarray(golden[k]), np.asarray(twin_golden[k])
        assert (a.dtype, a.shape) == (b.dtype, b.shape), k
        where = differing(a, b)
        if where.any():
            differ[k] = where
    if case == "gpt2/v5-lm":
        # v5 scales q k^T by one precomputed factor (4.57: divides by sqrt(H)), so a query that sees a real
        # key differs from the twin in the last bits only; a left-pad query (no real key) differs grossly
        pad = no_real_key(np.asarray(golden["attention_mask"]))  # [B, T]
        assert pad.any()
        gen_mask = np.asarray(golden["generate.attention_mask"])
        seq_len = golden["generate.sequences"].shape[1]
        gen_pad = no_real_key(np.pad(gen_mask, ((0, 0), (0, seq_len - gen_mask.shape[1])), constant_values=1))
        for k in golden:
            a, b = np.asarray(golden[k], np.float64), np.asarray(twin_golden[k], np.float64)
            if "/" not in k and k != "generate.logits":
                assert k not in differ, k  # inputs, generated ids
                continue
            if a.ndim == 0:  # the loss reads the logits of the last left-pad position (it predicts a real token)
                assert abs(a - b) > 1e-2, k
                continue
            err = np.abs(a - b) / np.abs(b).max()
            if "/attentions." in k:  # [B, N, T, S]: per query row
                err = err.transpose(0, 2, 1, 3)
            err = err.reshape(err.shape[0], err.shape[1], -1).max(-1)  # [B, T]
            left_pad = gen_pad if k == "generate.logits" else pad
            assert err[~left_pad].max() < (1e-14 if k.startswith("float64/") else 1e-6), k
            if k.endswith("hidden_states.0"):  # the embeddings: no attention yet
                assert not err.any(), k
            else:
                assert err[left_pad].min() > 1e-2, k
    elif case == "roformer/v5-mlm-untied":  # the decoder bias reaches only the logits and the loss
        assert set(differ) == {f"{d}/{k}" for d in ("float32", "float64") for k in ("logits", "loss")}
    else:
        assert not differ, f"{case} differs from {twin}: {sorted(differ)}"
