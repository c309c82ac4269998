"""transformers v5 config.json files (tests/data/v5/<name>/config.json, written by transformers
5.25.0's `Config.save_pretrained` for tiny GPT-2, Arcee, RoFormer and I-BERT models; MEGA was
removed in v5): each parses with the same strictness, and v5's `rope_parameters` mean what v5's
`modeling_rope_utils.py` computes from them.
"""

from __future__ import annotations

import json
import math
import re
import os

import pytest

from conftest import DATA
from refjax.params.arcee import parse_arcee_config
from refjax.params.checkpoint import load_config
from refjax.params.config import ConfigError

V5 = os.path.join(DATA, "v5")
CASES = sorted(os.listdir(V5))


def v5_config(name: str) -> dict:
    with open(os.path.join(V5, name, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", CASES)
def test_every_v5_config_parses(name):
    raw = v5_config(name)
    assert raw["transformers_version"].startswith("5.")
    family, config, _ = load_config(os.path.join(V5, name))
    assert family == raw["model_type"] and config.architecture == raw["architectures"][0]


def as_v4(raw: dict) -> dict:
    """The same Arcee model in transformers 4.57's keys: rope_theta on top, the rest in rope_scaling."""
    raw = dict(raw)
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = None if params == {"rope_type": "default"} else params
    return raw


@pytest.mark.parametrize("name", ["arcee", "arcee-seqcls", "arcee-linear", "arcee-dynamic", "arcee-yarn",
                                  "arcee-llama3"])
def test_v5_rope_parameters_equal_the_v4_rope_scaling(name):
    """Where v5 and 4.57 read the keys alike, the v5 config parses to the 4.57 config."""
    raw = v5_config(name)
    assert parse_arcee_config(raw) == parse_arcee_config(as_v4(raw))


def test_v5_longrope_reads_the_original_context_from_rope_parameters():
    """v5: threshold and attention factor from rope_parameters' original_max_position_embeddings;
    4.57 read them from the top level (where refjax's 4.57 longrope keeps them)."""
    raw = v5_config("arcee-longrope")
    original = raw["rope_parameters"]["original_max_position_embeddings"]
    config = parse_arcee_config(raw)
    assert config.original_max_position_embeddings == original == 16
    factor = raw["max_position_embeddings"] / original  # v5 without `factor`: max / original
    assert config.rope_scaling.attention_factor == math.sqrt(1 + math.log(factor) / math.log(original))
    # with an explicit factor, v5 uses it (4.57 would replace it by max / original)
    raw["rope_parameters"] = {**raw["rope_parameters"], "factor": 2.0}
    assert parse_arcee_config(raw).rope_scaling.attention_factor == math.sqrt(1 + math.log(2.0) / math.log(16))
    raw["rope_parameters"] = {**raw["rope_parameters"], "factor": 1.0}
    assert parse_arcee_config(raw).rope_scaling.attention_factor == 1.0


def test_v5_top_level_original_context_wins():
    """v5's Phi-3 exception: a top-level original_max_position_embeddings replaces rope_parameters'."""
    raw = v5_config("arcee-yarn")
    raw["original_max_position_embeddings"] = 16
    assert parse_arcee_config(raw).rope_scaling.original_max_position_embeddings == 16


def test_v5_yarn_without_factor_uses_max_over_original():
    raw = v5_config("arcee-yarn")
    raw["rope_parameters"] = {k: v for k, v in raw["rope_parameters"].items() if k != "factor"}
    assert parse_arcee_config(raw).rope_scaling.factor == raw["max_position_embeddings"] / 32


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(rope_scaling={"rope_type": "linear", "factor": 2.0}), "both 'rope_scaling'"),
    (lambda r: r.update(rope_theta=500.0), "'rope_parameters.rope_theta' (10000.0) and the top-level"),
    (lambda r: r["rope_parameters"].update(beta_fast=3.0), "rope_parameters key(s) 'beta_fast'"),
    (lambda r: r["rope_parameters"].update(rope_type="su"), "'rope_parameters.rope_type' is 'su'"),
    (lambda r: r["rope_parameters"].update(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (lambda r: r.update(rope_parameters=[1]), "'rope_parameters' must be an object"),
    (lambda r: r.update(some_v6_key=1), "unknown field(s) 'some_v6_key'"),
])
def test_v5_rope_parameters_stay_strict(change, message):
    raw = json.loads(json.dumps(v5_config("arcee-linear")))
    change(raw)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_arcee_config(raw)


def test_v5_add_cross_attention_true_is_refused():
    for name, family in (("gpt2", "gpt2"), ("roformer", "roformer")):
        raw = v5_config(name)
        raw["add_cross_attention"] = True
        with pytest.raises(ConfigError, match="add_cross_attention"):
            load_config_from(raw, family)


def load_config_from(raw: dict, family: str):
    from refjax.params.checkpoint import FAMILIES

    return FAMILIES[family].parse_config(raw)
