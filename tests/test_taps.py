"""Taps: docs/taps.md, each family's TAPS, what forward returns and what `refjax forward
--taps` writes agree name for name, shape for shape and in order (forward's stacked dict is
checked against TAPS by `ref.diff.expand_taps`, which the CLI runs); the taps that repeat
an output equal it; and (reference tier) `refjax hf-taps` run on golden checkpoints agrees
with refjax op by op through `refjax diff`.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from conftest import GOLDEN, ROOT
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors, write_safetensors
from refjax import arcee, gpt2, ibert, mega, roformer
from refjax.tooling import cli, diff

DOC = os.path.join(ROOT, "docs", "taps.md")
FAMILY_MODULES = {"gpt2": gpt2, "arcee": arcee, "roformer": roformer, "mega": mega, "ibert": ibert}
SECTIONS = {"gpt2": "## GPT-2", "arcee": "## Arcee", "roformer": "## RoFormer", "mega": "## MEGA",
            "ibert": "## I-BERT"}


def documented(family: str) -> list[tuple[str, str]]:
    """(name, shape expression) of every row of the family's table in docs/taps.md."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n" + SECTIONS[family]) + 1
    end = text.find("\n## ", start)
    section = text[start: end if end >= 0 else len(text)]
    rows = re.findall(r"^\| `([^`]+)` \| `(\[[^`]*\])` \|", section, flags=re.M)
    assert rows, f"no tap table under {SECTIONS[family]!r} in docs/taps.md"
    return rows


def dims(family: str, config, input_ids) -> dict[str, int]:
    """The shape letters of docs/taps.md for one checkpoint and input (no KV cache: S = T)."""
    B, T = math.prod(input_ids.shape[:-1]), input_ids.shape[-1]  # choices are flattened into B
    if family == "gpt2":
        return dict(B=B, T=T, S=T, D=config.n_embd, F=config.inner_dim, N=config.n_head, K=config.n_head,
                    H=config.head_dim, L=config.n_layer)
    return dict(B=B, T=T, S=T, D=config.hidden_size, F=config.intermediate_size, N=config.num_attention_heads,
                K=config.num_key_value_heads, H=config.head_dim, L=config.num_hidden_layers)


def golden_inputs(case: str, keys=cli.INPUT_KEYS) -> dict[str, np.ndarray]:
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    return {k: np.asarray(golden[k]) for k in keys if k in golden}


@pytest.mark.parametrize("family", sorted(FAMILY_MODULES))
def test_docs_table_lists_exactly_the_family_taps_in_order(family):
    assert [name for name, _ in documented(family)] == list(FAMILY_MODULES[family].TAPS)


# Cases whose sizes tell the letters apart: F != 4D (n_inner), batch x choices, K != N (MQA).
CLI_CASES = ("gpt2/lm-n-inner", "gpt2/double-heads", "arcee/mqa")


@pytest.mark.parametrize("case", CLI_CASES)
def test_forward_taps_dump_every_documented_tap_with_its_shape_in_model_order(case, tmp_path, capsys):
    family = case.split("/")[0]
    inputs = golden_inputs(case)
    write_safetensors(tmp_path / "in.safetensors", inputs)
    out_path = tmp_path / "out.safetensors"
    code = cli.main(["forward", os.path.join(GOLDEN, case), "--inputs", str(tmp_path / "in.safetensors"),
                     "--out", str(out_path), "--taps"])
    assert code == 0, capsys.readouterr().err
    tensors, metadata = read_safetensors(out_path)
    ckpt = load_checkpoint(os.path.join(GOLDEN, case))
    d = dims(family, ckpt.config, inputs["input_ids"])
    L = d["L"]

    rows = documented(family)
    per_layer = [name for name, _ in rows if "{i}" in name]
    first = [name for name, _ in rows].index(per_layer[0])
    expected_taps = ([name for name, _ in rows[:first]]  # model order: before the layers, layer by layer, after
                     + [name.replace("{i}", str(i)) for i in range(L) for name in per_layer]
                     + [name for name, _ in rows[first:] if "{i}" not in name])
    for name, shape in rows:
        expected = list(eval(shape, {}, d))  # noqa: S307 - our own doc table: "[B, T, 3*D]"
        for i in (range(L) if "{i}" in name else [None]):
            full = name.replace("{i}", str(i))
            assert full in tensors, f"documented tap {full} not written"
            assert list(tensors[full].shape) == expected, f"{full}: {tensors[full].shape} vs documented {shape}"
    outputs = {n for n in tensors if n.startswith(("hidden_states.", "attentions.")) or n in cli.OUTPUT_FIELDS
               or n in cli.INPUT_KEYS}
    assert set(tensors) - outputs == set(expected_taps), "written taps that docs/taps.md does not list"

    order = json.loads(metadata["order"])
    assert sorted(order) == sorted(tensors) and len(order) == len(set(order))
    assert [n for n in order if n in set(expected_taps)] == expected_taps  # taps in documented order
    stack = "h" if family == "gpt2" else "layers"
    for i in range(L):  # each layer: its input, its taps, its attention map
        start = order.index(per_layer[0].replace("{i}", str(i)))
        stop = order.index(per_layer[-1].replace("{i}", str(i)))
        assert order.index(f"hidden_states.{i}") == start - 1
        assert order.index(f"attentions.{i}") == stop + 1
    assert order.index(f"hidden_states.{L}") > order.index(expected_taps[-1])

    # the taps HF also returns as outputs are those outputs (HF views GPT2DoubleHeadsModel's
    # last hidden state [B, C, T, D]; the taps keep the flattened [B * C, T, D])
    def same(a, b):
        np.testing.assert_array_equal(np.asarray(tensors[a]).reshape(tensors[b].shape), tensors[b], err_msg=a)

    pre, final = ("drop", "ln_f") if family == "gpt2" else ("embed_tokens", "norm")
    same(pre, "hidden_states.0")
    for i in range(L):
        if i < L - 1:
            same(f"{stack}.{i}", f"hidden_states.{i + 1}")
        same(f"{stack}.{i}.{'attn' if family == 'gpt2' else 'self_attn'}.probs", f"attentions.{i}")
        if family == "gpt2":  # the fused projection is q, k, v side by side
            qkv = np.concatenate([tensors[f"h.{i}.attn.{x}"].reshape(d["B"], d["T"], d["D"]) for x in "qkv"], -1)
            np.testing.assert_array_equal(qkv, tensors[f"h.{i}.attn.c_attn"])
    same(final, f"hidden_states.{L}")
    same(final, "last_hidden_state")


def test_forward_without_taps_records_the_order_of_its_outputs(tmp_path, capsys):
    case = os.path.join(GOLDEN, "gpt2", "qa")
    write_safetensors(tmp_path / "in.safetensors", golden_inputs("gpt2/qa"))
    code = cli.main(["forward", case, "--inputs", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "o.safetensors")])
    assert code == 0, capsys.readouterr().err
    tensors, metadata = read_safetensors(tmp_path / "o.safetensors")
    assert json.loads(metadata["order"]) == [
        "input_ids", "attention_mask", "start_positions", "end_positions", "hidden_states.0", "attentions.0", "hidden_states.1", "attentions.1", "hidden_states.2",
        "last_hidden_state", "loss", "start_logits", "end_logits"]
    assert sorted(tensors) == sorted(json.loads(metadata["order"]))


# --------------------------------------------------------------------------------------
# Reference tier: `refjax hf-taps` (HF PyTorch + hooks) vs refjax, through `refjax diff`
# --------------------------------------------------------------------------------------

# Every hf_taps code path: fused-qkv split, inverse-layer-idx and fp32-upcast scores,
# choices flattened, token types and position ids, every head; GQA/MQA/MHA, biases, each
# RoPE type (dynamic and longrope depend on the call's length), a bf16 and a sharded checkpoint.
# (All 47 GPT-2/Arcee golden cases with input ids pass; so do all 16 RoFormer and 35 MEGA ones, and
# the I-BERT ones but quant-tokcls and quant-propagated-* (docs/taps.md); this subset keeps the tier fast.)
HF_CASES = ("gpt2/lm", "gpt2/lm-inverse-upcast", "gpt2/lm-inverse-layer-idx", "gpt2/double-heads",
            "gpt2/model-extras", "gpt2/qa", "gpt2/seqcls-single", "gpt2/lm-act-relu",
            "arcee/causal-lm", "arcee/mqa", "arcee/mha", "arcee/bias", "arcee/qa", "arcee/tokcls",
            "arcee/rope-dynamic", "arcee/rope-longrope", "arcee/rope-yarn", "arcee/rope-llama3", "arcee/bf16",
            "arcee/sharded",
            # RoFormer: encoder + MLM head, is_decoder + rotary_value, embeddings_project, choices flattened
            "roformer/mlm", "roformer/causal-lm-rotary-value", "roformer/model-project-rotary-value", "roformer/mc",
            # I-BERT float and quant (HF's scale hand-off, refjax's default): pooler, choices flattened,
            # token types and position ids
            "ibert/model", "ibert/mc", "ibert/quant-model", "ibert/quant-mc", "ibert/quant-model-extras",
            # and heads without a pooler (its tap is optional: FamilyOps.optional_taps)
            "ibert/seqcls", "ibert/quant-seqcls",
            # MEGA: bidirectional and unidirectional FFT EMA, chunked encoder (rotary bias, laplace), simple
            # bias, no nffn, choices flattened; a decoder with labels (HF: use_cache off, FFT EMA) and
            # without ("#no-labels": HF's use_cache path, the Vandermonde `ema_step`), chunked
            "mega/model", "mega/unidirectional", "mega/chunking-rotary-laplace", "mega/bias-simple", "mega/no-nffn",
            "mega/multiple-choice", "mega/causal-lm-chunking", "mega/causal-lm-chunking#no-labels")


@pytest.mark.reference
@pytest.mark.parametrize("case", HF_CASES)
def test_hf_taps_matches_refjax_op_by_op(case, tmp_path, capsys):
    """float32, default `refjax diff` tolerance: max|refjax - HF| <= 1e-5 + 1e-5 * max|HF tensor|
    for every tap and output (the golden float32 tolerance; fp32 rounding through a few
    16-wide matmuls stays near 1e-6 of the tensor's magnitude, measured over all cases)."""
    pytest.importorskip("torch", reason="reference tier needs the `reference` extra (torch + transformers)")
    pytest.importorskip("transformers", reason="reference tier needs the `reference` extra (torch + transformers)")
    from refjax.tooling import hf_taps

    case, _, variant = case.partition("#")
    checkpoint = os.path.join(GOLDEN, case)
    inputs, ours, theirs = (str(tmp_path / n) for n in ("in.safetensors", "refjax.safetensors", "hf.safetensors"))
    given = golden_inputs(case)
    if variant == "no-labels":
        assert given.pop("labels", None) is not None, f"{case} has no labels to drop"
    write_safetensors(inputs, given)
    assert cli.main(["forward", checkpoint, "--inputs", inputs, "--out", ours, "--taps"]) == 0
    assert cli.main(["hf-taps", checkpoint, "--inputs", inputs, "--out", theirs]) == 0
    hf_tensors, hf_meta = read_safetensors(theirs)
    assert hf_meta["producer"] == "refjax hf-taps"
    # the taps hf_taps leaves out (no faithful HF counterpart; docs/taps.md says why): exactly those
    ref_tensors = read_safetensors(ours)[0]
    family, n_layers = case.split("/")[0], sum(n.startswith("attentions.") for n in ref_tensors)
    not_recorded = {n.replace("{i}", str(i)) for n in hf_taps.NOT_RECORDED.get(family, ())
                    for i in (range(n_layers) if "{i}" in n else [0])}
    assert not_recorded <= set(ref_tensors)
    assert set(ref_tensors) - set(hf_tensors) == not_recorded and set(hf_tensors) <= set(ref_tensors)
    capsys.readouterr()
    code = cli.main(["diff", ours, theirs, *(["--allow-missing"] if not_recorded else [])])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "only in OTHER" not in out and "first divergence" not in out
    assert ("only in REF" in out) == bool(not_recorded)
    n = len(hf_tensors)
    assert f"all {n} compared tensors within tolerance" in out
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if family == "ibert" and config.get("quant_mode") and config.get("force_dequant", "none") == "none":
        # quant mode, on these goldens: every tap that is integers * scale is bit-equal to HF's;
        # only the float ops differ by rounding: the scores before IntSoftmax (q k^T / sqrt(H) in
        # float32, summed in an order torch's CPU matmul picks by shape), the float pooler and the
        # float heads. (Not guaranteed in general: IntLayerNorm's float32 variance sum passes 2^24
        # and depends on summation order; docs/taps.md, I-BERT, has the golden where it differs.)
        float_ops = {*diff.HEAD_FIELDS[1:], "pooler", "pooler_output"}
        for name, value in hf_tensors.items():
            if name not in float_ops and not name.endswith(".attention.self.scores"):
                np.testing.assert_array_equal(np.asarray(ref_tensors[name]), np.asarray(value), err_msg=name)


@pytest.mark.reference
def test_hf_taps_errors_exit_2(tmp_path, capsys):
    pytest.importorskip("torch", reason="reference tier needs the `reference` extra (torch + transformers)")
    write_safetensors(tmp_path / "in.safetensors", golden_inputs("gpt2/lm"))
    assert cli.main(["hf-taps", str(tmp_path), "--inputs", str(tmp_path / "in.safetensors"), "--out",
                     str(tmp_path / "o.safetensors")]) == 2
    assert "no config.json" in capsys.readouterr().err
    write_safetensors(tmp_path / "bad.safetensors", {"input_ids": np.zeros((1, 3), np.int64),
                                                     "pixel_values": np.zeros((1,), np.float32)})
    assert cli.main(["hf-taps", os.path.join(GOLDEN, "gpt2", "lm"), "--inputs", str(tmp_path / "bad.safetensors"),
                     "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "pixel_values" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.safetensors")
