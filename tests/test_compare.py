"""`refjax.compare` (the in-process API behind `refjax diff`) and the envelope for
low-precision ports (`refjax envelope`, ref/tooling/envelope.py).

API: dicts of numpy / JAX / PyTorch arrays or dump paths in, a report out; padded
positions ignored by default and the largest error located; logits agreement (KL, top-1,
top-k) with thresholds; reasons that name the option to pass. Envelope: refjax in bf16 is
judged against refjax in float64 by refjax's own bf16 drift, so a correct bf16 run passes
and a bf16 run with a bug planted in layer 1 fails at that tap.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refjax
from conftest import GOLDEN, golden_inputs
from refjax import gpt2, nn
from refjax.params.checkpoint import Checkpoint
from refjax.tooling import cli, compare as compare_lib, envelope
from test_diff import Layer1, three_layers

LM = os.path.join(GOLDEN, "gpt2", "lm")


@pytest.fixture(scope="module")
def lm():
    """refjax's float32 dump of the golden GPT-2 (left-, right- and middle-padded rows)."""
    return envelope.run(LM, golden_inputs("gpt2/lm"), "float32")


def test_exported_at_the_top_level():
    assert refjax.compare is compare_lib.compare


def test_dicts_of_numpy_jax_and_torch_arrays(lm):
    theirs = {name: jnp.asarray(lm.tensors[name]) for name in ("h.0", "h.1", "ln_f", "logits")}
    report = refjax.compare(lm, theirs, allow_missing=True)
    assert report.ok and bool(report) and report.exit_code == 0
    assert [r.name for r in report.rows if not r.missing] == ["h.0", "h.1", "ln_f", "logits"]  # REF's order
    report.assert_ok()
    torch = pytest.importorskip("torch", reason="the PyTorch case needs torch (the `reference` extra)")
    as_torch = {name: torch.tensor(np.asarray(v), requires_grad=True) for name, v in theirs.items()}
    assert refjax.compare(lm, as_torch, allow_missing=True).ok
    bf16 = {name: torch.tensor(np.asarray(v)).bfloat16() for name, v in theirs.items()}
    report = refjax.compare(lm, bf16, allow_missing=True, rtol=1e-2)
    assert report.ok, report
    assert "dtype float32 vs bfloat16" in report.row("logits").note


def test_a_failing_report_is_a_readable_assertion(lm):
    theirs = {"h.0": lm.tensors["h.0"], "h.1": np.asarray(lm.tensors["h.1"]) + 1e-2}
    report = refjax.compare(lm, theirs)
    assert not report and report.first_divergence.name == "h.1"
    with pytest.raises(AssertionError) as e:
        report.assert_ok()
    message = str(e.value)
    assert "first divergence: h.1 " in message and "<== first divergence" in message
    only_ref = sum(r.status == "only REF" for r in report.rows)
    assert f"{only_ref} name(s) only in REF: pass allow_missing=True, or dump them" in message
    assert message.rstrip().splitlines()[-1].startswith("FAIL: 1 of 2 compared tensors differ (first: h.1)")


def test_padded_positions_are_ignored_unless_asked(lm):
    mask = np.asarray(lm.tensors["attention_mask"])
    assert not mask[2, 0] and mask[2, 3]  # row 2 is left-padded
    hidden, probs = np.array(lm.tensors["h.0"]), np.array(lm.tensors["h.0.attn.probs"])
    hidden[2, 0] += 7.9  # what another implementation computes at a pad position is its own business
    probs[2, :, 5, 1] += 0.5  # a real query attending to a pad key: not compared either
    theirs = {"h.0": hidden, "h.0.attn.probs": probs}
    report = refjax.compare(lm, theirs, allow_missing=True)
    assert report.ok, report
    assert report.positions.counts == (int(mask.sum()), mask.size)
    strict = refjax.compare(lm, theirs, allow_missing=True, all_positions=True)
    assert not strict.ok and strict.row("h.0").max_abs == pytest.approx(7.9, rel=1e-6)
    assert strict.row("h.0").at == (2, 0, strict.row("h.0").at[2])
    # a real position: located as (batch, position), attention maps by their query
    hidden[3, 9, 4] += 0.25
    probs[1, 1, 6, 2] += 0.125
    report = refjax.compare(lm, {"h.0": hidden, "h.0.attn.probs": probs}, allow_missing=True)
    assert report.row("h.0").at == (3, 9, 4) and report.row("h.0").position == (3, 9)
    assert report.row("h.0.attn.probs").at == (1, 1, 6, 2) and report.row("h.0.attn.probs").position == (1, 6)
    assert "first divergence: h.0.attn.probs (" in report.text() and "at [1,1,6,2] (batch 1, position 6)" in report.text()


def test_logits_agreement_and_thresholds():
    ref = np.zeros((1, 3, 4))
    ref[0, :, 0] = 2.0  # every position prefers class 0
    other = ref.copy()
    other[0, 2] = [0.0, 3.0, 0.0, 0.0]  # the last position prefers class 1
    mask = np.ones((1, 3), np.int64)
    report = refjax.compare({"logits": ref, "attention_mask": mask}, {"logits": other}, atol=10, top_k=2)
    (m,) = report.logits
    lp, lq = (x - np.log(np.exp(x).sum()) for x in (ref[0, 2], other[0, 2]))
    assert m.kl_max == pytest.approx(float(np.sum(np.exp(lp) * (lp - lq))))
    assert m.kl_mean == pytest.approx(m.kl_max / 3) and m.kl_max_at == (0, 2)
    assert m.top1 == pytest.approx(2 / 3) and m.top1_count == 2 and m.positions == 3
    # position 2: top-2 of REF {0, then the first of the ties 1}, of OTHER {1, 0}
    assert m.k == 2 and m.topk == pytest.approx(1.0)
    assert report.ok  # reported, not judged
    judged = refjax.compare({"logits": ref}, {"logits": other}, atol=10, max_kl=0.1, min_top1=0.9, max_mean_kl=1.0)
    assert not judged.ok
    assert any(r.startswith("logits: KL max") and "> max_kl 0.1" in r for r in judged.reasons)
    assert any(r.startswith("logits: top-1 agreement 0.6667 < min_top1 0.9") for r in judged.reasons)
    assert not any("KL mean" in r for r in judged.reasons)
    masked = refjax.compare({"logits": ref, "attention_mask": np.array([[1, 1, 0]])}, {"logits": other},
                            atol=10, max_kl=0.1, min_top1=1.0)
    assert masked.ok and masked.logits[0].positions == 2  # the difference sits at a pad position
    none = refjax.compare({"x": ref}, {"x": other}, atol=10, max_kl=0.1)
    assert none.reasons == ("logits thresholds were given but no logits were compared",)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rtol=-1), "rtol must be >= 0"), (dict(min_top1=1.5), "min_top1 must be in [0, 1]"),
    (dict(max_kl=-1), "max_kl must be >= 0"), (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(names={"a": 1}), "must be a JSON object of names"), (dict(factor=0, envelope={}), "factor must be > 0"),
])
def test_bad_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        refjax.compare({"x": np.zeros(2)}, {"x": np.zeros(2)}, **kwargs)


def test_inputs_that_differ_fail_the_comparison(lm):
    ids = np.array(lm.tensors["input_ids"])
    ids[0, 0] += 1
    report = refjax.compare(lm, {"input_ids": ids, "logits": lm.tensors["logits"]}, allow_missing=True)
    assert not report.ok and report.reasons[0].startswith("the inputs differ (input_ids)")


def test_dict_order_is_the_model_order():
    a = {"z.first": np.zeros(2), "a.second": np.ones(2)}
    report = refjax.compare(a, {"z.first": np.zeros(2), "a.second": np.zeros(2)})
    assert [r.name for r in report.rows] == ["z.first", "a.second"] and report.first_divergence.name == "a.second"


# --------------------------------------------------------------------------------------
# The envelope: bf16 judged by refjax's own bf16 drift
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_case():
    """The 3-layer GPT-2 of test_diff, its float64 reference run and its bf16 envelope."""
    params, config, inputs = three_layers("gpt2")
    model = Checkpoint("gpt2", config, params, {})
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    reference, env = envelope.measure(model, inputs, "bfloat16")
    return model, inputs, reference, env


def test_a_correct_bf16_run_passes_the_envelope_but_not_the_float32_tolerance(bf16_case):
    model, inputs, reference, env = bf16_case
    assert env.dtype == "bfloat16" and env.reference_dtype == "float64"
    assert all(v > 0 for k, v in env.drift.items() if k.startswith(("h.", "hidden_states.1"))), env.drift
    port = envelope.run(model, inputs, "bfloat16")
    report = refjax.compare(reference, port, envelope=env)
    assert report.ok, report
    assert max(r.ratio for r in report.rows if not np.isnan(r.ratio)) == pytest.approx(1.0)
    assert "drift" in report.text() and "ratio" in report.text()
    assert not refjax.compare(reference, port).ok  # the float32 tolerance cannot judge bf16
    # another correct bf16 code path (jax.nn.dot_product_attention) stays inside the envelope too
    out = gpt2.forward(envelope._cast(model.params, jnp.bfloat16), model.config,
                       **{k: jnp.asarray(v) for k, v in inputs.items()}, output_hidden_states=True, fast=True)
    fast = {"logits": out.logits, **{f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)}}
    report = refjax.compare(reference, fast, envelope=env, allow_missing=True)
    assert report.ok, report
    assert max(r.ratio for r in report.rows if not np.isnan(r.ratio)) <= 1.5


def _silu_for_gelu_new(monkeypatch, layer1):
    """The MLP activation of layer 1 is SiLU instead of GPT-2's gelu_new (a port reusing a Llama MLP)."""
    gelu_new = nn.ACT2FN["gelu_new"]
    monkeypatch.setitem(nn.ACT2FN, "gelu_new", lambda h: layer1.pick(jax.nn.silu(h), gelu_new(h)))


def _epsilon_of_ln_2(monkeypatch, layer1):
    norm = nn.layer_norm

    def perturbed(p, x, eps):
        good = norm(p, x, eps)
        return layer1.pick(norm(p, x, 1.0), good) if p is layer1.p.ln_2 else good

    monkeypatch.setattr(nn, "layer_norm", perturbed)


BF16_BUGS = {  # bug in layer 1 only -> the tap the envelope must name first
    "activation gelu_new -> silu": ("h.1.mlp.act", _silu_for_gelu_new),
    "ln_2 epsilon 1e-5 -> 1": ("h.1.ln_2", _epsilon_of_ln_2),
}


@pytest.mark.parametrize("bug", list(BF16_BUGS))
def test_a_bf16_run_with_a_planted_bug_fails_the_envelope_at_its_tap(bug, bf16_case, monkeypatch):
    model, inputs, reference, env = bf16_case
    tap, plant = BF16_BUGS[bug]
    plant(monkeypatch, Layer1(monkeypatch, "gpt2", model.params))
    port = envelope.run(model, inputs, "bfloat16")
    monkeypatch.undo()
    report = refjax.compare(reference, port, envelope=env)
    first = report.first_divergence
    assert first is not None and first.name == tap, report
    assert first.ratio > 3 * envelope.DEFAULT_FACTOR
    before = report.rows[:report.rows.index(first)]
    assert all(r.ok and r.ratio <= 1.0 for r in before if not np.isnan(r.ratio))
    assert f"{first.ratio:.3g} x drift" in report.text()


def _inputs_file(tmp_path) -> str:
    from refjax.params.io import write_safetensors

    path = str(tmp_path / "in.safetensors")
    write_safetensors(path, golden_inputs("gpt2/lm"))
    return path


def test_envelope_command(tmp_path, capsys):
    """`refjax envelope CKPT PORT --dtype bfloat16`: the inputs come from the port's dump."""
    port = str(tmp_path / "port.npz")
    assert cli.main(["forward", LM, "--inputs", _inputs_file(tmp_path), "--out", port, "--dtype", "bfloat16",
                     "--taps"]) == 0
    capsys.readouterr()
    code = cli.main(["envelope", LM, port, "--dtype", "bfloat16", "--json", "--save-reference",
                     str(tmp_path / "ref.safetensors")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["envelope"] == {"dtype": "bfloat16", "reference_dtype": "float64",
                                                                 "factor": envelope.DEFAULT_FACTOR}
    assert max(r["ratio"] for r in report["rows"] if r["ratio"] is not None) == 1.0  # the port is refjax in bf16
    assert os.path.isfile(tmp_path / "ref.safetensors")
    # below refjax's own drift nothing in bf16 can pass: the factor is what judges
    code = cli.main(["envelope", LM, port, "--dtype", "bfloat16", "--factor", "0.5", "--reference-dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 1 and "envelope: ok when max abs <= 0.5 x refjax's own bfloat16 drift from float32" in out
    assert out.rstrip().splitlines()[-1].startswith("exit 1: ")


def test_envelope_command_needs_the_ports_inputs(tmp_path, capsys):
    from refjax.params.io import write_safetensors

    write_safetensors(tmp_path / "port.safetensors", {"logits": np.zeros((1, 2, 320), np.float32)})
    code = cli.main(["envelope", LM, str(tmp_path / "port.safetensors"), "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("refjax: error: ") and "pass --inputs" in err
