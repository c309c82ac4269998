"""GPT-2 config.json parsing: real and golden files, HF defaults, and errors naming the field."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import DATA, GOLDEN
from refjax.params.checkpoint import load_config
from refjax.params.config import ACTIVATIONS, PROBLEM_TYPES, SUMMARY_TYPES, ConfigError
from refjax.params.gpt2 import GPT2_ARCHITECTURES, GPT2Config, parse_gpt2_config

REAL_GPT2 = os.path.join(DATA, "configs", "gpt2.json")
GOLDEN_CONFIGS = sorted(glob.glob(os.path.join(GOLDEN, "gpt2", "*", "config.json")))
with open(os.path.join(GOLDEN, "MANIFEST.json")) as _f:
    MANIFEST = json.load(_f)["cases"]

FIELDS = {f.name for f in dataclasses.fields(GPT2Config)}


def real_raw() -> dict:
    with open(REAL_GPT2) as f:
        return json.load(f)


def lm_raw() -> dict:
    with open(os.path.join(GOLDEN, "gpt2", "lm", "config.json")) as f:
        return json.load(f)


def with_(raw: dict, **changes) -> dict:
    out = dict(raw)
    out.update(changes)
    return out


def write_config(folder, content) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


# --------------------------------------------------------------------------------------
# real and golden files
# --------------------------------------------------------------------------------------


def test_real_gpt2_config():
    raw = real_raw()
    c = parse_gpt2_config(raw)
    # every value in the file
    assert c.architecture == raw["architectures"][0] == "GPT2LMHeadModel"
    assert c.activation_function == raw["activation_function"] == "gelu_new"
    assert c.bos_token_id == raw["bos_token_id"] == 50256
    assert c.eos_token_id == raw["eos_token_id"] == 50256
    assert c.layer_norm_epsilon == raw["layer_norm_epsilon"] == 1e-5
    assert c.n_embd == raw["n_embd"] == 768
    assert c.n_head == raw["n_head"] == 12
    assert c.n_layer == raw["n_layer"] == 12
    assert c.n_positions == raw["n_positions"] == 1024
    assert c.summary_activation is None and raw["summary_activation"] is None
    assert c.summary_proj_to_labels is raw["summary_proj_to_labels"] is True
    assert c.summary_type == raw["summary_type"] == "cls_index"
    assert c.summary_use_proj is raw["summary_use_proj"] is True
    assert c.vocab_size == raw["vocab_size"] == 50257
    # every field the file leaves out gets HF's GPT2Config default
    assert c.n_inner is None and c.inner_dim == 3072
    assert c.head_dim == 64
    assert c.scale_attn_weights is True
    assert c.scale_attn_by_inverse_layer_idx is False
    assert c.reorder_and_upcast_attn is False
    assert c.tie_word_embeddings is True
    assert c.pad_token_id is None
    assert c.num_labels == 2
    assert c.problem_type is None
    # every key of the file is either a field (checked above) or a known ignored key
    for key, value in raw.items():
        if key in FIELDS:
            assert getattr(c, key) == value, key
    # frozen and hashable: a static argument for jax.jit
    assert hash(c) == hash(parse_gpt2_config(real_raw()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_embd = 1  # type: ignore[misc]


def test_real_gpt2_via_load_config(tmp_path):
    write_config(tmp_path, real_raw())
    family, config, raw = load_config(tmp_path)
    assert family == "gpt2"
    assert config == parse_gpt2_config(real_raw())
    assert raw == real_raw()


@pytest.mark.parametrize("path", GOLDEN_CONFIGS, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_golden_config_parses(path):
    case = os.path.basename(os.path.dirname(path))
    family, c, raw = load_config(os.path.dirname(path))
    assert family == "gpt2" == MANIFEST[f"gpt2/{case}"]["family"]
    assert c.architecture == MANIFEST[f"gpt2/{case}"]["architecture"] == raw["architectures"][0]
    for key, value in raw.items():
        if key in FIELDS:
            assert getattr(c, key) == value, key
    if "id2label" in raw:
        assert c.num_labels == len(raw["id2label"])
    assert c.n_embd % c.n_head == 0
    assert c.inner_dim == (raw.get("n_inner") or 4 * c.n_embd)


def test_golden_configs_cover_every_architecture():
    found = {parse_gpt2_config(json.load(open(p))).architecture for p in GOLDEN_CONFIGS}
    assert found == set(GPT2_ARCHITECTURES)


def test_missing_architectures_defaults_to_gpt2model():
    for absent in ({}, {"architectures": None}, {"architectures": []}):
        raw = {k: v for k, v in lm_raw().items() if k != "architectures"}
        raw.update(absent)
        assert parse_gpt2_config(raw).architecture == "GPT2Model"


def test_minimal_config_gets_hf_defaults():
    c = parse_gpt2_config({"model_type": "gpt2"})
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (50257, 1024, 768, 12, 12)
    assert c.activation_function == "gelu_new" and c.layer_norm_epsilon == 1e-5
    assert c.architecture == "GPT2Model" and c.tie_word_embeddings is True
    assert parse_gpt2_config({}) == c  # model_type absent is fine for the gpt2 parser itself


def test_architecture_argument_overrides_file():
    c = parse_gpt2_config(lm_raw(), architecture="GPT2ForTokenClassification")
    assert c.architecture == "GPT2ForTokenClassification"
    with pytest.raises(ConfigError, match="'BertModel'"):
        parse_gpt2_config(lm_raw(), architecture="BertModel")


def test_id2label_sets_num_labels():
    labels = {str(i): f"L{i}" for i in range(7)}
    assert parse_gpt2_config(with_(lm_raw(), id2label=labels)).num_labels == 7
    # HF: id2label wins over a conflicting num_labels
    assert parse_gpt2_config(with_(lm_raw(), id2label=labels, num_labels=3)).num_labels == 7
    assert parse_gpt2_config(with_(lm_raw(), num_labels=3)).num_labels == 3
    assert parse_gpt2_config(lm_raw()).num_labels == 2


def test_legacy_keys_accepted():
    legacy = dict(n_ctx=1024, max_length=50, min_length=0, do_sample=True, early_stopping=False, num_beams=4,
                  temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.0, length_penalty=1.0,
                  no_repeat_ngram_size=0, bad_words_ids=None, num_return_sequences=1, output_scores=False,
                  return_dict_in_generate=False, forced_bos_token_id=None, forced_eos_token_id=None,
                  typical_p=1.0, diversity_penalty=0.0, num_beam_groups=1,
                  use_cache=False, torch_dtype="float16",
                  _name_or_path="gpt2", transformers_version="4.0.0", gradient_checkpointing=False)
    base = parse_gpt2_config(lm_raw())
    assert parse_gpt2_config(with_(lm_raw(), **legacy)) == base
    # dropout rates are read (train=True uses them) and change nothing else
    rates = dict(resid_pdrop=0.2, embd_pdrop=0.3, attn_pdrop=0.4, summary_first_dropout=0.5,
                 summary_last_dropout=0.6, classifier_dropout=0.7)
    parsed = parse_gpt2_config(with_(lm_raw(), **rates))
    assert {k: getattr(parsed, k) for k in rates} == rates
    assert dataclasses.replace(parsed, **{k: getattr(base, k) for k in rates}) == base
    for bad in (-0.1, 1.0, "x", True):
        with pytest.raises(ConfigError, match="attn_pdrop.*dropout rate in \\[0, 1\\)"):
            parse_gpt2_config(with_(lm_raw(), attn_pdrop=bad))
    # n_ctx is a legacy alias and never overrides n_positions
    assert parse_gpt2_config(with_(lm_raw(), n_ctx=7)).n_positions == 48


def test_eos_token_id_list_is_kept_whole():
    """HF stops generation at any id of an eos list (and pads with the first)."""
    assert parse_gpt2_config(with_(lm_raw(), eos_token_id=[5, 7])).eos_token_id == (5, 7)
    assert parse_gpt2_config(with_(lm_raw(), eos_token_id=[5])).eos_token_id == 5
    for bad in ([], [5, "x"], [True]):
        with pytest.raises(ConfigError, match="eos_token_id"):
            parse_gpt2_config(with_(lm_raw(), eos_token_id=bad))


# --------------------------------------------------------------------------------------
# errors naming the field
# --------------------------------------------------------------------------------------


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_key():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'rotary_dim', 'zzz_new_option'"):
        parse_gpt2_config(with_(lm_raw(), rotary_dim=64, zzz_new_option=True))


@pytest.mark.parametrize("key, value", [
    ("n_embd", "768"),
    ("n_embd", 768.0),
    ("n_layer", True),
    ("n_head", False),
    ("vocab_size", None),
    ("n_positions", [48]),
    ("n_inner", "64"),
    ("num_labels", 2.5),
])
def test_int_field_wrong_type(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be an integer, got {re.escape(repr(value))}"):
        parse_gpt2_config(with_(lm_raw(), **{key: value}))


@pytest.mark.parametrize("key", ["n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "n_inner", "num_labels"])
@pytest.mark.parametrize("value", [0, -1, -768])
def test_size_must_be_positive(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be >= 1, got {value}"):
        parse_gpt2_config(with_(lm_raw(), **{key: value}))


@pytest.mark.parametrize("n_embd, n_head", [(16, 3), (768, 5), (10, 20)])
def test_n_head_must_divide_n_embd(n_embd, n_head):
    with pytest.raises(ConfigError, match=rf"'n_head' \({n_head}\) must divide 'n_embd' \({n_embd}\)"):
        parse_gpt2_config(with_(lm_raw(), n_embd=n_embd, n_head=n_head))


@pytest.mark.parametrize("key, value", [
    ("scale_attn_weights", "true"),
    ("scale_attn_by_inverse_layer_idx", 1),
    ("reorder_and_upcast_attn", None),
    ("tie_word_embeddings", 0),
    ("summary_use_proj", "yes"),
    ("summary_proj_to_labels", [True]),
])
def test_bool_field_wrong_type(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be true or false, got {re.escape(repr(value))}"):
        parse_gpt2_config(with_(lm_raw(), **{key: value}))


@pytest.mark.parametrize("value", ["1e-5", True, None, 0, -1e-5, 0.0, float("inf"), float("nan")])
def test_layer_norm_epsilon(value):
    with pytest.raises(ConfigError, match=r"'layer_norm_epsilon' must be"):
        parse_gpt2_config(with_(lm_raw(), layer_norm_epsilon=value))


def test_layer_norm_epsilon_huge_integer():
    """JSON integers are unbounded in Python: 10**400 must be a ConfigError, not OverflowError."""
    with pytest.raises(ConfigError, match=r"'layer_norm_epsilon'"):
        parse_gpt2_config(with_(lm_raw(), layer_norm_epsilon=10**400))


@pytest.mark.parametrize("key", ["bos_token_id", "eos_token_id", "pad_token_id"])
@pytest.mark.parametrize("value", ["50256", 1.0, True, [[1]], {"a": 1}])
def test_token_id_wrong_type(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be a token id"):
        parse_gpt2_config(with_(lm_raw(), **{key: value}))


@pytest.mark.parametrize("value", ["gelu2", "GELU_NEW", "prelu", "xielu", None, 3])
def test_unknown_activation_lists_accepted(value):
    with pytest.raises(ConfigError, match=rf"'activation_function' is {re.escape(repr(value))}; accepted values:") as e:
        parse_gpt2_config(with_(lm_raw(), activation_function=value))
    for name in ("'gelu_new'", "'relu'", "'silu'", "'quick_gelu'"):
        assert name in str(e.value)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_listed_activation_parses(name):
    assert parse_gpt2_config(with_(lm_raw(), activation_function=name)).activation_function == name


def test_summary_activation():
    assert parse_gpt2_config(with_(lm_raw(), summary_activation="")).summary_activation is None
    assert parse_gpt2_config(with_(lm_raw(), summary_activation="tanh")).summary_activation == "tanh"
    with pytest.raises(ConfigError, match=r"'summary_activation' is 'softmax'; accepted values:.*tanh"):
        parse_gpt2_config(with_(lm_raw(), summary_activation="softmax"))


@pytest.mark.parametrize("value", [["BertModel"], ["GPT2LMHeadModelX"], ["LlamaForCausalLM", "GPT2LMHeadModel"]])
def test_unknown_architecture(value):
    with pytest.raises(ConfigError, match=rf"architecture {re.escape(repr(value[0]))} is not supported; "
                                          r"accepted values: .*GPT2LMHeadModel"):
        parse_gpt2_config(with_(lm_raw(), architectures=value))


@pytest.mark.parametrize("value", ["GPT2LMHeadModel", [3], {"a": "GPT2Model"}, [None]])
def test_malformed_architectures(value):
    with pytest.raises(ConfigError, match=r"'architectures' must be a non-empty list of class names"):
        parse_gpt2_config(with_(lm_raw(), architectures=value))


@pytest.mark.parametrize("value", ["llama", "GPT2", "gpt-2", None])
def test_wrong_model_type(value):
    with pytest.raises(ConfigError, match=rf"'model_type' is {re.escape(repr(value))}; expected 'gpt2'"):
        parse_gpt2_config(with_(lm_raw(), model_type=value))


@pytest.mark.parametrize("value", ["llama", None, 3])
def test_wrong_model_type_via_load_config(tmp_path, value):
    write_config(tmp_path, with_(lm_raw(), model_type=value))
    with pytest.raises(ConfigError, match=rf"'model_type' is {re.escape(repr(value))}; accepted values: 'gpt2'"):
        load_config(tmp_path)


def test_missing_model_type_via_load_config(tmp_path):
    write_config(tmp_path, {k: v for k, v in lm_raw().items() if k != "model_type"})
    with pytest.raises(ConfigError, match=r"'model_type' is None"):
        load_config(tmp_path)


@pytest.mark.parametrize("value", [["gpt2"], {"name": "gpt2"}])
def test_unhashable_model_type_via_load_config(tmp_path, value):
    """A JSON list/object as model_type must be a ConfigError, not `TypeError: unhashable type`."""
    write_config(tmp_path, with_(lm_raw(), model_type=value))
    with pytest.raises(ConfigError, match=r"'model_type'"):
        load_config(tmp_path)


@pytest.mark.parametrize("value", ["classification", "REGRESSION", 1, ["regression"]])
def test_bad_problem_type(value):
    with pytest.raises(ConfigError, match=rf"'problem_type' is {re.escape(repr(value))}; accepted values: "
                                          r"'regression', 'single_label_classification', 'multi_label_classification'"):
        parse_gpt2_config(with_(lm_raw(), problem_type=value))


@pytest.mark.parametrize("value", PROBLEM_TYPES + (None,))
def test_good_problem_type(value):
    assert parse_gpt2_config(with_(lm_raw(), problem_type=value)).problem_type == value


@pytest.mark.parametrize("value", ["attn", "max", "", None, 0])
def test_bad_summary_type(value):
    with pytest.raises(ConfigError, match=rf"'summary_type' is {re.escape(repr(value))}; accepted values: "
                                          r"'last', 'first', 'mean', 'cls_index'"):
        parse_gpt2_config(with_(lm_raw(), summary_type=value))


@pytest.mark.parametrize("key, value", [
    ("pruned_heads", {"0": [1]}),
    ("add_cross_attention", True),
    ("is_encoder_decoder", True),
])
def test_unsupported_features(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        parse_gpt2_config(with_(lm_raw(), **{key: value}))


def test_unsupported_features_off_are_fine():
    base = parse_gpt2_config(lm_raw())
    assert parse_gpt2_config(with_(lm_raw(), pruned_heads={}, add_cross_attention=False,
                                   is_encoder_decoder=False, is_decoder=False)) == base


@pytest.mark.parametrize("content, culprit", [
    ("{not json", "invalid JSON"),
    ("", "invalid JSON"),
    ('{"model_type": "gpt2",}', "invalid JSON"),
    ("[1, 2, 3]", "expected a JSON object, got list"),
    ('"gpt2"', "expected a JSON object, got str"),
    ("null", "expected a JSON object, got NoneType"),
])
def test_bad_config_file(tmp_path, content, culprit):
    path = write_config(tmp_path, content)
    with pytest.raises(ConfigError, match=re.escape(path) + ".*" + culprit):
        load_config(tmp_path)


def test_config_not_utf8(tmp_path):
    path = os.path.join(tmp_path, "config.json")
    with open(path, "wb") as f:
        f.write(b'{"model_type": "\xff\xfe"}')
    with pytest.raises(ConfigError, match=re.escape(path) + ".*invalid JSON"):
        load_config(tmp_path)


def test_config_json_is_a_directory(tmp_path):
    os.makedirs(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json.*" + re.escape(str(tmp_path))):
        load_config(tmp_path)


# --------------------------------------------------------------------------------------
# property test: mutated config.json files never crash with a non-ConfigError
# --------------------------------------------------------------------------------------

BASES = [real_raw()] + [json.load(open(p)) for p in GOLDEN_CONFIGS[::4]]
KEYS = sorted({k for raw in BASES for k in raw} | FIELDS - {"architecture"} | {"num_labels", "id2label", "problem_type"})

json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 3, 10**400, -(10**400), 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0]),
    st.text(max_size=12),
    st.sampled_from(ACTIVATIONS + GPT2_ARCHITECTURES + SUMMARY_TYPES + PROBLEM_TYPES + ("gpt2", "")),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)
mutation = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("set"), st.sampled_from(KEYS), json_values),
    st.tuples(st.just("negate"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("huge"), st.sampled_from(KEYS), st.sampled_from([10**400, 2**63, 1e308, 10**12])),
)


def apply(raw: dict, mutations) -> dict:
    raw = dict(raw)
    for op, key, value in mutations:
        if op == "drop":
            raw.pop(key, None)
        elif op == "set":
            raw[key] = value
        elif op == "negate":
            v = raw.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                raw[key] = -v
        elif op == "huge":
            raw[key] = value
    return raw


def assert_valid(c: GPT2Config) -> None:
    assert isinstance(c, GPT2Config)
    hash(c)
    assert c.architecture in GPT2_ARCHITECTURES
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_labels"):
        value = getattr(c, name)
        assert type(value) is int and value >= 1, name
    assert c.n_inner is None or (type(c.n_inner) is int and c.n_inner >= 1)
    assert c.n_embd % c.n_head == 0
    assert c.activation_function in ACTIVATIONS
    assert c.summary_activation is None or c.summary_activation in ACTIVATIONS
    assert type(c.layer_norm_epsilon) is float and math.isfinite(c.layer_norm_epsilon) and c.layer_norm_epsilon > 0
    for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "tie_word_embeddings", "summary_use_proj", "summary_proj_to_labels"):
        assert type(getattr(c, name)) is bool, name
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(c, name)
        assert value is None or type(value) is int, name
    assert c.summary_type in SUMMARY_TYPES
    assert c.problem_type is None or c.problem_type in PROBLEM_TYPES


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(range(len(BASES))), mutations=st.lists(mutation, min_size=1, max_size=3))
@example(base=0, mutations=[("set", "layer_norm_epsilon", 10**400)])  # OverflowError in float()
@example(base=0, mutations=[("set", "model_type", ["gpt2"])])  # TypeError: unhashable (load_config)
@example(base=0, mutations=[("set", "n_embd", 10**400)])
@example(base=1, mutations=[("set", "id2label", {"0": "a"}), ("set", "num_labels", "x")])
@example(base=1, mutations=[("set", "architectures", [["GPT2Model"]])])
@example(base=1, mutations=[("set", "eos_token_id", [])])
def test_mutated_configs_parse_or_raise_config_error(base, mutations):
    raw = apply(BASES[base], mutations)
    # the parser on a dict
    try:
        config = parse_gpt2_config(raw)
    except ConfigError:
        pass
    else:
        assert_valid(config)
    # the loader on a file (JSON written by Python: NaN/Infinity literals and huge ints survive)
    with tempfile.TemporaryDirectory(prefix="refjax-config-fuzz-") as folder:
        write_config(folder, raw)
        try:
            family, config, _ = load_config(folder)
        except ConfigError:
            pass
        else:
            assert family == "gpt2"
            assert_valid(config)


ARCEE_TINY = dict(model_type="arcee", architectures=["ArceeForCausalLM"], hidden_size=16, num_attention_heads=8,
                  num_key_value_heads=8, num_hidden_layers=1, intermediate_size=8, vocab_size=10,
                  max_position_embeddings=16)


@pytest.mark.parametrize("raw, culprit", [
    (dict(ARCEE_TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'head_dim' > 2"),
    (dict(ARCEE_TINY, rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
     "'rope_scaling.factor'"),
    (dict(ARCEE_TINY, max_position_embeddings=1,
          rope_scaling={"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0], "long_factor": [1.0]}),
     "log\\(original_max_position_embeddings\\)"),
])
def test_arcee_rope_combinations_hf_cannot_build_are_config_errors(raw, culprit):
    """HF raises ZeroDivisionError / TypeError building these (head_dim 2 here); we name the field."""
    from refjax.params.arcee import parse_arcee_config

    with pytest.raises(ConfigError, match=culprit):
        parse_arcee_config(raw)


def test_arcee_longrope_with_attention_factor_needs_no_factor():
    from refjax.params.arcee import parse_arcee_config

    config = parse_arcee_config(dict(ARCEE_TINY, rope_scaling={
        "rope_type": "longrope", "attention_factor": 1.5, "short_factor": [1.0], "long_factor": [1.0]}))
    assert config.rope_scaling.attention_factor == 1.5
