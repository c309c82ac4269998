"""RoFormer bad inputs and configs (each error names the culprit), valid edge cases, the
`refjax forward / generate` CLI on golden directories, and the jieba tokenizer (golden
texts, a real Chinese BERT vocab, rjieba missing)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, GOLDEN
from refjax.params.checkpoint import load_checkpoint
from refjax.params.config import ConfigError
from refjax.params.io import read_safetensors, write_safetensors
from refjax.params.roformer import parse_roformer_config
from refjax import roformer
from refjax.tooling import cli
from refjax.tooling.families import FAMILIES
from roformer_helpers import random_params

BASE = dict(model_type="roformer", vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=8, max_position_embeddings=12, type_vocab_size=2)


def setup(arch="RoFormerModel", **raw):
    config = parse_roformer_config(dict(BASE, architectures=[arch], **raw))
    return config, random_params(config, jax.random.PRNGKey(0), jnp.float64)


IDS = np.array([[1, 2, 3, 4], [5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])


@pytest.mark.parametrize("arch, extra, kwargs, culprit", [
    ("RoFormerModel", {}, dict(input_ids=IDS + 20), "input_ids contains 26, outside [0, 20)"),
    ("RoFormerModel", {}, dict(input_ids=IDS, token_type_ids=np.full((2, 4), 2)), "token_type_ids contains 2"),
    ("RoFormerModel", {}, dict(input_ids=np.ones((1, 13), int)), "sequence length 13 exceeds the position table"),
    ("RoFormerModel", {}, dict(input_ids=IDS, attention_mask=MASK[:, :3]), "attention_mask has shape"),
    ("RoFormerModel", {}, dict(inputs_embeds=np.zeros((2, 4, 7))), "inputs_embeds must be [batch, seq, 8]"),
    ("RoFormerModel", {}, dict(input_ids=IDS, inputs_embeds=np.zeros((2, 4, 8))), "exactly one of"),
    ("RoFormerModel", {}, dict(input_ids=IDS, cache="cache"), "is_decoder=True"),
    ("RoFormerForMultipleChoice", {}, dict(input_ids=IDS), "[batch, choices, seq]"),
    ("RoFormerForMultipleChoice", {}, dict(input_ids=IDS[None], labels=np.array([2])), "labels contains 2"),
    ("RoFormerForMultipleChoice", {}, dict(input_ids=IDS[None], attention_mask=MASK), "attention_mask has shape"),
    ("RoFormerForMaskedLM", {}, dict(input_ids=IDS, labels=np.full((2, 4), 20)), "labels contains 20"),
    ("RoFormerForSequenceClassification", {"num_labels": 3}, dict(input_ids=IDS, labels=np.array([0, 3])),
     "labels contains 3"),
    ("RoFormerForTokenClassification", {"num_labels": 3}, dict(input_ids=IDS, labels=np.zeros((2, 3), int)),
     "labels has shape"),
])
def test_bad_inputs_raise_naming_the_culprit(arch, extra, kwargs, culprit):
    config, params = setup(arch, **extra)
    if kwargs.get("cache") == "cache":
        kwargs["cache"] = roformer.init_cache(dataclasses.replace(config, is_decoder=True), 2, 8, jnp.float64)
    with pytest.raises(ValueError, match=None) as e:
        roformer.forward(params, config, **kwargs)
    assert culprit in str(e.value), str(e.value)


@pytest.mark.parametrize("raw, culprit", [
    (dict(hidden_size=10, num_attention_heads=4), "must divide 'hidden_size'"),
    (dict(hidden_size=6, num_attention_heads=2), "must be even"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(rotary_value="yes"), "rotary_value"),
    (dict(hidden_act="swiglu"), "hidden_act"),
    (dict(summary_activation="nope"), "summary_activation"),
    (dict(summary_type="attn"), "summary_type"),
    (dict(position_embedding_type="absolute"), "position_embedding_type"),
    (dict(model_type="bert"), "model_type"),
    (dict(architectures=["RoFormerForPreTraining"]), "RoFormerForPreTraining"),
    (dict(architectures=["RoFormerForMultipleChoice"], summary_use_proj=True, summary_proj_to_labels=True,
          num_labels=3), "summary_proj_to_labels"),
])
def test_bad_configs_raise_naming_the_field(raw, culprit):
    with pytest.raises(ConfigError) as e:
        parse_roformer_config(dict(BASE, **raw))
    assert culprit in str(e.value), str(e.value)


def test_generate_refuses_beyond_the_table_counting_pads_and_non_lm_heads():
    config, params = setup("RoFormerForCausalLM", is_decoder=True)
    ids, mask = np.array([[0, 0, 3, 4]]), np.array([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="position table"):  # 4 slots + 9 > 12 although only 2 tokens are real
        FAMILIES["roformer"].generate(params, config, ids, mask, max_new_tokens=9)
    config2, params2 = setup("RoFormerForMaskedLM")
    with pytest.raises(ValueError, match="RoFormerForMaskedLM is not a language model"):
        FAMILIES["roformer"].generate(params2, config2, ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("arch", ["RoFormerForMaskedLM", "RoFormerForQuestionAnswering", "RoFormerForMultipleChoice"])
def test_edge_cases_batch1_length1_fully_padded_row_are_finite(arch):
    config, params = setup(arch, is_decoder=arch == "RoFormerForMaskedLM")
    one = np.array([[3]])
    padded_ids, padded_mask = np.array([[3, 4, 5], [0, 0, 0]]), np.array([[1, 1, 1], [0, 0, 0]])
    if arch == "RoFormerForMultipleChoice":
        one, padded_ids, padded_mask = one[None], padded_ids[None], padded_mask[None]
    for ids, mask in ((one, None), (padded_ids, padded_mask)):
        out = roformer.forward(params, config, ids, mask, output_hidden_states=True, output_attentions=True)
        for leaf in jax.tree.leaves(out):
            assert bool(jnp.all(jnp.isfinite(leaf)))


# ------------------------------------------------------------------------------- CLI


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", ["roformer/mlm-untied", "roformer/mc", "roformer/model-project-rotary-value"])
def test_refjax_forward_matches_hf_golden_within_1e4(capsys, tmp_path, case):
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in golden]
    write_safetensors(tmp_path / "in.safetensors", {k: golden[k] for k in keys})
    code, _, err = run(capsys, "forward", os.path.join(GOLDEN, case), "--inputs", str(tmp_path / "in.safetensors"),
                       "--out", str(tmp_path / "out.safetensors"))
    assert code == 0, err
    out, _ = read_safetensors(tmp_path / "out.safetensors")
    field = "logits" if "float32/logits" in golden else "last_hidden_state"
    want = golden[f"float32/{field}"]
    assert np.max(np.abs(out[field].reshape(want.shape) - want)) <= 1e-4 * max(1.0, np.abs(want).max())


def test_refjax_generate_matches_hf_greedy(capsys, tmp_path):
    case = os.path.join(GOLDEN, "roformer", "causal-lm-rotary-value")
    golden, _ = read_safetensors(os.path.join(case, "golden.safetensors"))
    write_safetensors(tmp_path / "p.safetensors", {"input_ids": golden["generate.input_ids"],
                                                   "attention_mask": golden["generate.attention_mask"]})
    new = golden["generate.sequences"].shape[1] - golden["generate.input_ids"].shape[1]
    code, _, err = run(capsys, "generate", case, "--inputs", str(tmp_path / "p.safetensors"), "--max-new-tokens",
                       str(new), "--out", str(tmp_path / "s.safetensors"))
    assert code == 0, err
    seqs, _ = read_safetensors(tmp_path / "s.safetensors")
    np.testing.assert_array_equal(seqs["sequences"], golden["generate.sequences"])


def test_refjax_forward_text_through_the_jieba_tokenizer(capsys, tmp_path):
    pytest.importorskip("rjieba")
    code, _, err = run(capsys, "forward", os.path.join(GOLDEN, "roformer", "mlm-tokenizer"), "--text",
                       "今天天气非常好。", "--out", str(tmp_path / "o.safetensors"))
    assert code == 0, err
    out, _ = read_safetensors(tmp_path / "o.safetensors")
    golden, _ = read_safetensors(os.path.join(GOLDEN, "roformer", "mlm-tokenizer", "golden.safetensors"))
    # TOKENIZER_TEXTS[0] is this text: HF's ids [CLS] 今 天 天 气 非常 好 。 [SEP]
    assert out["logits"].shape[1] == len(golden["text.ids.0"]) == 9


@pytest.mark.parametrize("case", ["roformer/mc", "roformer/model-project-rotary-value"])
def test_forward_taps_have_documented_names_and_repeat_the_outputs(capsys, tmp_path, case):
    """`refjax forward --taps`: every RoFormer tap of docs/taps.md (names in order, shapes),
    and the taps that HF also returns equal those outputs."""
    import re

    from conftest import ROOT

    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    write_safetensors(tmp_path / "in.safetensors", {k: golden[k] for k in ("input_ids", "attention_mask",
                                                                         "token_type_ids") if k in golden})
    code, _, err = run(capsys, "forward", os.path.join(GOLDEN, case), "--inputs", str(tmp_path / "in.safetensors"),
                       "--out", str(tmp_path / "o.safetensors"), "--taps")
    assert code == 0, err
    t, meta = read_safetensors(tmp_path / "o.safetensors")
    config = load_checkpoint(os.path.join(GOLDEN, case)).config
    ids = golden["input_ids"]
    d = dict(B=int(np.prod(ids.shape[:-1])), T=ids.shape[-1], S=ids.shape[-1], D=config.hidden_size,
             E=config.embedding_size, F=config.intermediate_size, N=config.num_attention_heads, H=config.head_dim)
    text = open(os.path.join(ROOT, "docs", "taps.md"), encoding="utf-8").read()
    start = text.index("\n## RoFormer") + 1
    end = text.find("\n## ", start)
    section = text[start: end if end >= 0 else len(text)]
    rows = re.findall(r"^\| `([^`]+)` \| `(\[[^`]*\])` \|", section, flags=re.M)
    assert [n for n, _ in rows] == list(roformer.TAPS)
    L = config.num_hidden_layers
    for name, shape in rows:
        for i in range(L) if "{i}" in name else [None]:
            full = name.replace("{i}", str(i))
            assert list(t[full].shape) == list(eval(shape, {}, d)), full  # noqa: S307 - our doc table
    order = json.loads(meta["order"])
    assert [n for n in order if n in cli.INPUT_KEYS] == [k for k in ("input_ids", "attention_mask", "token_type_ids")
                                                        if k in golden]  # the dump carries its inputs first
    assert [n for n in order if not n.startswith(("hidden_states", "attentions")) and n not in cli.OUTPUT_FIELDS
            and n not in cli.INPUT_KEYS] == [
        n for n, _ in rows if "{i}" not in n] + [n.replace("{i}", str(i)) for i in range(L) for n, _ in rows
                                                  if "{i}" in n]
    np.testing.assert_array_equal(t["embeddings_project"], t["hidden_states.0"])
    for i in range(L):
        np.testing.assert_array_equal(t[f"encoder.layer.{i}"], t[f"hidden_states.{i + 1}"])
        np.testing.assert_array_equal(t[f"encoder.layer.{i}.attention.self.probs"], t[f"attentions.{i}"])
    np.testing.assert_array_equal(t[f"encoder.layer.{L - 1}"], t["last_hidden_state"])
    if not config.rotary_value:
        np.testing.assert_array_equal(t["encoder.layer.0.attention.self.v_rot"].reshape(d["B"], d["T"], -1),
                                      t["encoder.layer.0.attention.self.value"])
