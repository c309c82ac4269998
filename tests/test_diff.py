"""`refjax diff`: its contract on hand-made dumps (order, tolerance, shapes, dtypes, missing
names, non-finite values, --map, errors), and planted bugs: perturb one constant of one op
in layer 1 of a 3-layer model and check that the diff names exactly that op in that layer
as the first divergence, for each family.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import GOLDEN
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors, write_safetensors
from refjax import arcee, gpt2, nn, rotary
from refjax import attention as attention_lib
from refjax.layers import LayerOut
from refjax.tooling import cli, diff, dumps
from refjax.tooling.families import FAMILIES


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dump(path, tensors, order=None):
    write_safetensors(path, tensors, None if order is None else {"order": json.dumps(order)})
    return str(path)


def first_divergence(out: str) -> str | None:
    match = re.search(r"^first divergence: (\S+) ", out, flags=re.M)
    return match.group(1) if match else None


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.split()[:1] == [name])


A = np.arange(12, dtype=np.float32).reshape(3, 4) / 7


# --------------------------------------------------------------------------------------
# The contract, on hand-made dumps
# --------------------------------------------------------------------------------------


def test_identical_dumps_pass(tmp_path, capsys):
    tensors = {"wte": A, "h.0.ln_1": A + 1, "loss": np.float32(2.5)}
    ref = dump(tmp_path / "a.safetensors", tensors, ["wte", "h.0.ln_1", "loss"])
    code, out, _ = run(capsys, "diff", ref, dump(tmp_path / "b.safetensors", tensors))
    assert code == 0, out
    assert "all 3 compared tensors within tolerance" in out and first_divergence(out) is None
    assert re.search(r"^name\s+shape\s+max abs\s+max rel\s+rel L2\s+1-cos\s+at\s+ok", out, flags=re.M)
    # equal: no largest-error location ("-")
    assert row(out, "h.0.ln_1").split()[1:] == ["[3,", "4]", "0.00e+00", "0.00e+00", "0.00e+00", "0.00e+00", "-",
                                                "ok"]
    assert "order from REF's metadata" in out


def test_first_divergence_follows_the_recorded_model_order(tmp_path, capsys):
    order = ["wte", "h.0.ln_1", "h.0.attn.q", "h.1.ln_1", "h.1.attn.q", "ln_f"]  # not alphabetical
    ref = {n: A + k for k, n in enumerate(order)}
    other = dict(ref, **{"h.1.attn.q": ref["h.1.attn.q"] + 1e-2, "ln_f": ref["ln_f"] * 1.5,
                         "h.1.ln_1": ref["h.1.ln_1"] + 1e-2})
    code, out, _ = run(capsys, "diff", dump(tmp_path / "a.safetensors", ref, order), dump(tmp_path / "b.safetensors", other))
    assert code == 1
    assert first_divergence(out) == "h.1.ln_1"
    assert "the 3 tensor(s) before it match; 3 of 6 compared tensors differ" in out
    assert "<== first divergence" in row(out, "h.1.ln_1") and "DIFF" in row(out, "ln_f")
    lines = out.splitlines()
    table = lines.index(next(line for line in lines if line.startswith("---"))) + 1
    assert [line.split()[0] for line in lines[table:table + 6]] == order  # table rows in model order


def test_without_metadata_layers_sort_by_index(tmp_path, capsys):
    names = ["layers.10.mlp", "layers.2.mlp", "layers.1.mlp", "embed_tokens"]
    ref = {n: A for n in names}
    other = dict(ref, **{"layers.10.mlp": A + 1, "layers.2.mlp": A + 1})  # alphabetically, 10 < 2
    code, out, _ = run(capsys, "diff", dump(tmp_path / "a.safetensors", ref), dump(tmp_path / "b.safetensors", other))
    assert code == 1 and first_divergence(out) == "layers.2.mlp"
    assert "natural order" in out
    assert diff.natural_sorted(["h.10", "h.2.attn", "h.2", "h.1.x"]) == ["h.1.x", "h.2", "h.2.attn", "h.10"]


def test_other_order_is_used_when_ref_has_none(tmp_path, capsys):
    ref = {"b": A, "a": A}
    other = {"b": A + 1, "a": A + 1}
    code, out, _ = run(capsys, "diff", dump(tmp_path / "a.safetensors", ref), dump(tmp_path / "b.safetensors", other, ["b", "a"]))
    assert code == 1 and first_divergence(out) == "b" and "order from OTHER's metadata" in out


def test_tolerance_is_scaled_by_the_largest_reference_magnitude(tmp_path, capsys):
    ref = dump(tmp_path / "a.safetensors", {"x": np.array([100.0, 0.0], np.float32)})
    close = dump(tmp_path / "b.safetensors", {"x": np.array([100.0, 5e-4], np.float32)})  # 5e-4 <= 1e-5 + 1e-5 * 100
    far = dump(tmp_path / "c.safetensors", {"x": np.array([100.0, 2e-3], np.float32)})
    assert run(capsys, "diff", ref, close)[0] == 0
    code, out, _ = run(capsys, "diff", ref, far)
    assert code == 1 and "max abs 2.000e-03 > tolerance 1.010e-03" in out
    assert run(capsys, "diff", ref, far, "--rtol", "0", "--atol", "3e-3")[0] == 0
    assert run(capsys, "diff", ref, close, "--rtol", "0", "--atol", "1e-4")[0] == 1


def test_shape_and_dtype_mismatches_are_rows_not_crashes(tmp_path, capsys):
    order = ["emb", "q", "k", "v", "w"]
    ref = {"emb": A, "q": A, "k": A, "v": A, "w": A}
    other = {"emb": A.astype(ml_dtypes.bfloat16),  # dtype differs: values still compared
             "q": A.reshape(12),  # same entries, another shape: compared in flat order
             "k": A.T.copy(),  # transposed: same size, values differ
             "v": A[:2],  # different size: cannot compare
             "w": A.astype(np.float64)}
    code, out, _ = run(capsys, "diff", dump(tmp_path / "a.safetensors", ref, order), dump(tmp_path / "b.safetensors", other),
                       "--rtol", "1e-2")
    assert code == 1
    assert "ok" in row(out, "emb") and "dtype float32 vs bfloat16" in row(out, "emb")
    assert "ok" in row(out, "q") and "[3, 4] vs [12]" in row(out, "q") and "flat order" in row(out, "q")
    assert "DIFF" in row(out, "k") and first_divergence(out) == "k"
    assert "SHAPE" in row(out, "v") and "[3, 4] vs [2, 4]" in row(out, "v") and "not compared" in row(out, "v")
    assert "ok" in row(out, "w") and "float32 vs float64" in row(out, "w")
    first_shape_only = run(capsys, "diff", dump(tmp_path / "c.safetensors", {"v": A}), dump(tmp_path / "d.safetensors", {"v": A[:2]}))
    assert first_shape_only[0] == 1 and "first divergence: v (shapes [3, 4] vs [2, 4])" in first_shape_only[1]


def test_names_missing_from_one_side_fail_unless_allowed(tmp_path, capsys):
    ref = dump(tmp_path / "a.safetensors", {"x": A, "only_ours": A}, ["x", "only_ours"])
    other = dump(tmp_path / "b.safetensors", {"x": A, "only_theirs": A})
    code, out, _ = run(capsys, "diff", ref, other)
    assert code == 1 and first_divergence(out) is None
    assert "only REF" in row(out, "only_ours") and "only OTHER" in row(out, "only_theirs")
    assert "1 name(s) only in REF: only_ours" in out and "1 name(s) only in OTHER: only_theirs" in out
    # the last line says exactly why it exits 1, and what to pass
    assert out.rstrip().splitlines()[-1] == (
        "exit 1: 1 name(s) only in REF: pass --allow-missing, or dump them; 1 name(s) only in OTHER: "
        "pass --allow-missing, or rename them onto REF's with --map")
    code, out, _ = run(capsys, "diff", ref, other, "--allow-missing")
    assert code == 0 and "all 1 compared tensors within tolerance" in out and "(allowed)" in out
    assert "only_ours" not in [line.split()[0] for line in out.splitlines() if line.strip()]  # listed, no row
    assert out.rstrip().splitlines()[-1] == "result: ok (exit 0)"


def test_no_name_in_common_fails_even_when_missing_names_are_allowed(tmp_path, capsys):
    code, out, _ = run(capsys, "diff", dump(tmp_path / "a.safetensors", {"x": A}), dump(tmp_path / "b.safetensors", {"y": A}),
                       "--allow-missing")
    assert code == 1 and "nothing compared" in out


def test_non_finite_entries_must_match_in_place(tmp_path, capsys):
    scores = np.array([[1.0, -np.inf], [np.nan, 2.0]], np.float32)
    ref = dump(tmp_path / "a.safetensors", {"s": scores})
    code, out, _ = run(capsys, "diff", ref, dump(tmp_path / "b.safetensors", {"s": scores.copy()}))
    assert code == 0 and "2 non-finite entries, equal" in row(out, "s")
    moved = np.array([[1.0, 0.0], [np.nan, 2.0]], np.float32)
    code, out, _ = run(capsys, "diff", ref, dump(tmp_path / "c.safetensors", {"s": moved}))
    assert code == 1 and "1 of them differ" in row(out, "s")


def test_compare_rows():
    flipped = diff.compare_tensor("x", A, -A, 1e-5, 1e-5)
    assert flipped.cosine == pytest.approx(-1.0) and flipped.one_minus_cos == pytest.approx(2.0)
    assert flipped.rel_l2 == pytest.approx(2.0) and flipped.at == (2, 3)  # the largest |A - -A| is at A's max
    zeros = diff.compare_tensor("z", np.zeros(3), np.zeros(3), 1e-5, 1e-5)
    assert zeros.ok and zeros.cosine == 1.0 and zeros.max_rel == 0.0
    empty = diff.compare_tensor("e", np.zeros((0, 4)), np.zeros((0, 4)), 1e-5, 1e-5)
    assert empty.ok
    ints = diff.compare_tensor("ids", np.array([1, 2, 3]), np.array([1, 2, 4]), 0.0, 0.0)
    assert ints.status == diff.DIFF and ints.max_abs == 1.0


def test_one_minus_cosine_discriminates_where_the_cosine_reads_one():
    """The planted bugs of this file all printed cosine 1.0000000; 1-cos and rel L2 do not."""
    x = np.linspace(-3, 3, 4096)
    row_ = diff.compare_tensor("act", x, x * 1.0001 + 1e-4, 1e-5, 1e-5)
    assert f"{row_.cosine:.7f}" == "1.0000000" and 1e-12 < row_.one_minus_cos < 1e-8
    assert row_.rel_l2 == pytest.approx(1e-4 * np.sqrt(4 / 3), rel=0.01) and row_.status == diff.DIFF


def _padded(tmp_path):
    """REF with a left-padded row and OTHER that differs only at the pad positions."""
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int64)
    hidden = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3) / 10
    logits = np.stack([hidden, -hidden], -1).reshape(2, 4, 6)
    theirs_h, theirs_l = hidden.copy(), logits.copy()
    theirs_h[0, :2] += 7.9
    theirs_l[0, :2] *= -1
    ref = dump(tmp_path / "ref.safetensors", {"input_ids": mask * 5, "attention_mask": mask, "h.0": hidden,
                                              "logits": logits}, ["input_ids", "attention_mask", "h.0", "logits"])
    return ref, dump(tmp_path / "port.safetensors", {"h.0": theirs_h, "logits": theirs_l})


def test_padded_positions_are_not_compared_unless_asked(tmp_path, capsys):
    ref, port = _padded(tmp_path)
    code, out, _ = run(capsys, "diff", ref, port)
    assert code == 0, out
    assert "positions: 6 of 8 real (REF's attention_mask); per-token tensors are compared there only " \
           "(--all-positions compares padding too)" in out
    assert "top-1 agreement 6/6 (100.00%)" in out and "over 6 real positions" in out
    code, out, _ = run(capsys, "diff", ref, port, "--all-positions")
    assert code == 1 and first_divergence(out) == "h.0"
    assert "max abs 7.900e+00 > tolerance" in out and "(batch 0, position 0)" in out
    assert "top-1 agreement 6/8 (75.00%)" in out


def test_logits_thresholds_are_flags(tmp_path, capsys):
    ref, port = _padded(tmp_path)
    code, out, _ = run(capsys, "diff", ref, port, "--all-positions", "--atol", "100", "--min-top1", "0.9",
                       "--max-kl", "10", "--top-k", "2")
    assert code == 1 and out.rstrip().splitlines()[-1] == "exit 1: logits: top-1 agreement 0.75 < --min-top1 0.9"
    assert "top-2 overlap" in out
    code, _, err = run(capsys, "diff", ref, port, "--min-top1", "2")
    assert code == 2 and "min_top1 must be in [0, 1]" in err


def test_json_report_parses_back(tmp_path, capsys):
    ref, port = _padded(tmp_path)
    code, out, _ = run(capsys, "diff", ref, port, "--all-positions", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["exit_code"] == 1
    assert report["first_divergence"] == "h.0" and report["reasons"][0].startswith("2 of 2 compared tensors differ")
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["h.0"]["status"] == "DIFF" and rows["h.0"]["at"][:2] == [0, 0]
    assert rows["h.0"]["max_abs"] == pytest.approx(7.9, rel=1e-6) and rows["h.0"]["ratio"] is None  # NaN -> null
    assert report["positions"] == {"source": "every position (padding included, as asked)", "real": None,
                                   "total": None}
    (logits,) = report["logits"]
    assert logits["top1"] == 0.75 and logits["k"] == 5 and logits["positions"] == 8
    code, out, _ = run(capsys, "diff", ref, port, "--json")
    assert code == 0 and json.loads(out)["positions"]["real"] == 6


def test_junit_report(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    ref, port = _padded(tmp_path)
    junit = tmp_path / "report.xml"
    code, out, _ = run(capsys, "diff", ref, port, "--all-positions", "--junit", junit)
    assert code == 1 and "first divergence: h.0" in out  # the table still prints
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["h.0"].find("failure").get("message").startswith("max abs 7.900e+00 > tolerance")
    assert cases["logits"].find("system-out").text.startswith("logits: KL(REF||OTHER)")
    assert "first divergence: h.0" in suite.find("system-out").text
    code, _, err = run(capsys, "diff", ref, port, "--junit", tmp_path / "no" / "r.xml")
    assert code == 2 and "output folder" in err


def test_npz_npy_and_npy_folders_are_read_by_extension(tmp_path, capsys):
    order = ["h.0", "h.1"]
    ref = dump(tmp_path / "ref.safetensors", {"h.0": A, "h.1": A + 1}, order)
    np.savez(tmp_path / "port.npz", **{"h.1": A + 1, "h.0": A})
    code, out, _ = run(capsys, "diff", ref, tmp_path / "port.npz")
    assert code == 0 and "all 2 compared tensors" in out
    np.save(tmp_path / "h.1.npy", A + 2)
    code, out, _ = run(capsys, "diff", ref, tmp_path / "h.1.npy", "--allow-missing")
    assert code == 1 and first_divergence(out) == "h.1"
    folder = tmp_path / "port"
    folder.mkdir()
    np.save(folder / "h.1.npy", A + 1)
    np.save(folder / "h.0.npy", A * 2)
    (folder / "order.json").write_text(json.dumps(order))
    code, out, _ = run(capsys, "diff", folder, ref)
    assert code == 1 and first_divergence(out) == "h.0" and "order from REF's metadata" in out
    for bad, message in ((tmp_path / "port.pt", "unknown dump format '.pt'; accepted: .safetensors, .npz, .npy"),
                         (tmp_path / "bad.npz", "not a valid .npz file"),
                         (tmp_path / "strings.npy", "has dtype <U1, not a number")):
        if bad.suffix == ".npy":
            np.save(bad, np.array(["a"]))
        else:
            bad.write_bytes(b"not a zip")
        code, _, err = run(capsys, "diff", ref, bad)
        assert code == 2 and err.startswith("refjax: error: ") and message in err, err


def test_forward_writes_its_inputs_and_npz_by_extension(tmp_path, capsys):
    lm = os.path.join(GOLDEN, "gpt2", "lm")
    code, _, err = run(capsys, "forward", lm, "--text", "Hello world", "--out", tmp_path / "out.npz")
    assert code == 0, err
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:  # a real npz, with refjax's metadata entry
        assert {"input_ids", "logits", "hidden_states.0"} <= set(z.files)
        metadata = json.loads(str(z["__metadata__"]))
        ids = z["input_ids"]
    assert json.loads(metadata["order"])[0] == "input_ids" and metadata["producer"] == "refjax"
    assert ids.shape == (1, 3) and ids.dtype == np.int32
    # a dump's inputs are a port's inputs: --inputs takes the dump, and the rerun matches
    code, _, err = run(capsys, "forward", lm, "--inputs", tmp_path / "out.npz", "--out", tmp_path / "again.safetensors")
    assert code == 0, err
    assert run(capsys, "diff", tmp_path / "out.npz", tmp_path / "again.safetensors")[0] == 0
    for out, message in (("x.npy", "a .npy file holds one array"), ("x.pt", "unknown output format '.pt'"),
                         ("x", "unknown output format '(none)'")):
        code, _, err = run(capsys, "forward", lm, "--text", "Hi", "--out", tmp_path / out)
        assert code == 2 and err.startswith("refjax: error: --out ") and message in err, err
        assert not (tmp_path / out).exists()


def test_map_renames_other_names_onto_ours(tmp_path, capsys):
    ours = {"embed_tokens": A, **{f"layers.{i}.self_attn.q_proj": A + i for i in range(12)}}
    theirs = {"tok_embeddings": A, **{f"blk.{i}.attn_q": A + i for i in range(12)}}
    theirs["blk.10.attn_q"] = A + 99
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"tok_embeddings": "embed_tokens", "blk.{i}.attn_q": "layers.{i}.self_attn.q_proj",
                                 "output_norm": "norm"}))
    order = list(ours)
    code, out, err = run(capsys, "diff", dump(tmp_path / "a.safetensors", ours, order), dump(tmp_path / "b.safetensors", theirs),
                         "--map", names)
    assert code == 1 and first_divergence(out) == "layers.10.self_attn.q_proj"
    assert "only" not in out and "the 11 tensor(s) before it match" in out
    assert "refjax: warning: --map entries that match no name" in err and "output_norm" in err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "must be a JSON object"),
    ('{"a": 1}', "must be a JSON object"),
    ('{"x": "{i}.y"}', "uses {i}"),
    ('{"a.{i}.{i}": "b.{i}"}', "more than one {i}"),
    ('{"x": "z", "y": "z"}', "both become 'z'"),
    ('{"x": "y"}', "both become 'y'"),  # lands on a name OTHER already has
])
def test_bad_map_files_exit_2(tmp_path, capsys, content, message):
    names = tmp_path / "names.json"
    names.write_text(content)
    ref = dump(tmp_path / "a.safetensors", {"x": A, "y": A})
    code, _, err = run(capsys, "diff", ref, dump(tmp_path / "b.safetensors", {"x": A, "y": A}), "--map", names)
    assert code == 2 and err.startswith("refjax: error: ") and message in err, err


def test_unreadable_inputs_exit_2(tmp_path, capsys):
    good = dump(tmp_path / "a.safetensors", {"x": A})
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
    bad_order = tmp_path / "bad_order.safetensors"
    write_safetensors(bad_order, {"x": A}, {"order": '{"x": 1}'})
    cases = [((good, tmp_path / "missing.safetensors"), "does not exist"), ((tmp_path / "missing.safetensors", good), "does not exist"),
             ((good, corrupt), "not a valid safetensors file"), ((good, tmp_path), "must hold NAME.npy files"),
             ((bad_order, good), "'order' must be a JSON list"),
             ((good, good, "--map", tmp_path / "none.json"), "map file"),
             ((good, good, "--rtol", "-1"), "--rtol must be >= 0"), ((good, good, "--atol", "nan"), "--atol")]
    for argv, message in cases:
        code, out, err = run(capsys, "diff", *argv)
        assert code == 2 and err.startswith("refjax: error: ") and message in err, (argv, err)
        assert "Traceback" not in err


# --------------------------------------------------------------------------------------
# Planted bugs: one constant of one op in layer 1 of 3; the diff must name that op first
# --------------------------------------------------------------------------------------

CASES = {"gpt2": "gpt2/lm", "arcee": "arcee/causal-lm"}


def three_layers(family: str):
    """The golden 2-layer checkpoint plus a third layer (a copy of layer 0), so that layer 1
    has a layer before and after it. -> (params, config, inputs)"""
    ckpt = load_checkpoint(os.path.join(GOLDEN, CASES[family]))
    if family == "gpt2":
        get, field = (lambda p: p.transformer.h), "n_layer"
    else:
        get, field = (lambda p: p.model.layers), "num_hidden_layers"
    layers = jax.tree.map(lambda a: jnp.concatenate([a, a[:1]]), get(ckpt.params))
    params = eqx.tree_at(get, ckpt.params, layers)
    config = dataclasses.replace(ckpt.config, **{field: 3})
    golden, _ = read_safetensors(os.path.join(GOLDEN, CASES[family], "golden.safetensors"))
    inputs = {k: jnp.asarray(golden[k]) for k in ("input_ids", "attention_mask")}
    return params, config, inputs


def write_dump(path, family, params, config, inputs) -> str:
    """What `refjax forward --taps` writes, for in-memory params (ref/cli.py: forward_dump)."""
    out = FAMILIES[family].forward(params, config, **inputs, output_hidden_states=True, output_attentions=True,
                                   taps=True)
    tensors, order = dumps.forward_dump(family, out, inputs)
    write_safetensors(path, tensors, {"order": json.dumps(order)})
    return str(path)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The unperturbed dump of each family's 3-layer model (made once)."""
    folder = tmp_path_factory.mktemp("clean")
    return {family: write_dump(folder / f"{family}.safetensors", family, *three_layers(family)) for family in CASES}


class Layer1:
    """Marks, while the layer scan traces its body, whether the current layer is layer 1.

    GPT-2's scan hands `block` its layer index. Arcee's scan does not carry one (its math
    never needs it), so the wrapper recognises layer 1 by its own weights (the q_proj kernel
    of layer 1; layer 2 is a copy of layer 0, not of layer 1). `pick(bad, good)` then selects
    the perturbed value in layer 1 only: `jnp.where(is layer 1, bad, good)` per leaf.
    """

    def __init__(self, monkeypatch, family, params):
        self.state = {}
        if family == "gpt2":
            block = gpt2.block

            def tracked(p, config, x, mask, layer_idx, *args, **kwargs):
                self.state.update(is1=layer_idx == 1, p=p)
                return block(p, config, x, mask, layer_idx, *args, **kwargs)

            monkeypatch.setattr(gpt2, "block", tracked)
        else:
            layer = arcee.decoder_layer
            target = params.model.layers.self_attn.q_proj.kernel[1]

            def tracked(p, *args, **kwargs):
                self.state.update(is1=jnp.all(p.self_attn.q_proj.kernel == target), p=p)
                return layer(p, *args, **kwargs)

            monkeypatch.setattr(arcee, "decoder_layer", tracked)

    @property
    def p(self):
        return self.state["p"]

    def pick(self, bad, good):
        return jax.tree.map(lambda b, g: jnp.where(self.state["is1"], b, g), bad, good)


def scale_attention(monkeypatch, module, layer1):
    """The attention scale (1/sqrt(head_dim)) x 1.001 -> first divergence: scores.
    (`module` is unused: every family calls refjax.attention's softmax_attention.)"""
    module = attention_lib
    attend = module.softmax_attention

    def perturbed(q, k, v, key_valid, causal, scale, *args, **kwargs):
        return attend(q, k, v, key_valid, causal, scale * layer1.pick(1.001, 1.0), *args, **kwargs)

    monkeypatch.setattr(module, "softmax_attention", perturbed)


def norm_epsilon(monkeypatch, norm_name, which, layer1):
    """One norm's epsilon 1e-5 -> 1e-3 (`which` picks the norm from the layer's params)."""
    norm = getattr(nn, norm_name)

    def perturbed(p, x, eps):
        good = norm(p, x, eps)
        return layer1.pick(norm(p, x, eps * 100), good) if p is which(layer1.p) else good

    monkeypatch.setattr(nn, norm_name, perturbed)


def swap_activation(monkeypatch, module, field, other, layer1):
    """The MLP activation swapped for `other` -> first divergence: the activation. Patched
    where the MLP looks its activation up (`nn.ACT2FN`), so the MLP runs once and its taps
    see the swapped value (only the MLPs of these checkpoints use the table)."""
    table = dict(nn.ACT2FN)
    for name, fn in table.items():
        monkeypatch.setitem(nn.ACT2FN, name, lambda h, fn=fn: layer1.pick(table[other](h), fn(h)))


def scale_residual(monkeypatch, module, branch, layer1):
    """The residual add of `branch` ("attention" or "mlp") takes its branch x 1.001, the
    branch's own output (its tap) untouched -> first divergence: that residual sum."""
    fn = getattr(module, branch)

    def perturbed(*args, **kwargs):
        result = fn(*args, **kwargs)
        if isinstance(result, LayerOut):  # attention returns a LayerOut
            return result._replace(x=layer1.pick(result.x * 1.001, result.x))
        if isinstance(result, tuple):  # (output, taps)
            out, *rest = result
            return (layer1.pick(out * 1.001, out), *rest)
        return layer1.pick(result * 1.001, result)  # an output array (GPT-2's mlp)

    monkeypatch.setattr(module, branch, perturbed)


def rotary_base(monkeypatch, config, inputs, layer1):
    """RoPE base (rope_theta) doubled -> first divergence: q after rotary."""
    B, T = inputs["input_ids"].shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    inv_freq = jnp.asarray(rotary.default_inv_freq(config.rope_theta * 2, config.rotary_dim))
    cos2, sin2 = rotary.rope_cos_sin(inv_freq, 1.0, positions, jnp.float32)
    rotate = rotary.apply_rotary

    def perturbed(x, cos, sin):
        return layer1.pick(rotate(x, cos2, sin2), rotate(x, cos, sin))

    monkeypatch.setattr(rotary, "apply_rotary", perturbed)


PLANTED = {  # (family, bug) -> first divergence the diff must report
    ("gpt2", "attention scale x1.001"): "h.1.attn.scores",
    ("gpt2", "ln_2 epsilon x100"): "h.1.ln_2",
    ("gpt2", "activation gelu_new -> gelu"): "h.1.mlp.act",
    ("gpt2", "attention residual x1.001"): "h.1.resid_attn",
    ("gpt2", "mlp residual x1.001"): "h.1",
    ("arcee", "rope_theta x2"): "layers.1.self_attn.q_rot",
    ("arcee", "attention scale x1.001"): "layers.1.self_attn.scores",
    ("arcee", "post_attention_layernorm epsilon x100"): "layers.1.post_attention_layernorm",
    ("arcee", "activation relu2 -> relu"): "layers.1.mlp.act_fn",
    ("arcee", "mlp residual x1.001"): "layers.1",
}


def plant(monkeypatch, family, bug, params, config, inputs):
    layer1 = Layer1(monkeypatch, family, params)
    module = gpt2 if family == "gpt2" else arcee
    if bug == "attention scale x1.001":
        scale_attention(monkeypatch, module, layer1)
    elif bug == "ln_2 epsilon x100":
        norm_epsilon(monkeypatch, "layer_norm", lambda p: p.ln_2, layer1)
    elif bug == "post_attention_layernorm epsilon x100":
        norm_epsilon(monkeypatch, "rms_norm", lambda p: p.post_attention_layernorm, layer1)
    elif bug == "activation gelu_new -> gelu":
        swap_activation(monkeypatch, module, "activation_function", "gelu", layer1)
    elif bug == "activation relu2 -> relu":
        swap_activation(monkeypatch, module, "hidden_act", "relu", layer1)
    elif bug == "attention residual x1.001":
        scale_residual(monkeypatch, module, "attention", layer1)
    elif bug == "mlp residual x1.001":
        scale_residual(monkeypatch, module, "mlp", layer1)
    elif bug == "rope_theta x2":
        rotary_base(monkeypatch, config, inputs, layer1)
    else:
        raise AssertionError(bug)


@pytest.mark.parametrize("family, bug", list(PLANTED))
def test_planted_bug_is_named_as_the_first_divergence(family, bug, clean, tmp_path, monkeypatch, capsys):
    params, config, inputs = three_layers(family)
    plant(monkeypatch, family, bug, params, config, inputs)
    bugged = write_dump(tmp_path / "bugged.safetensors", family, params, config, inputs)
    monkeypatch.undo()
    code, out, _ = run(capsys, "diff", clean[family], bugged)
    expected = PLANTED[family, bug]
    assert code == 1, out
    assert first_divergence(out) == expected, out
    stack = "h" if family == "gpt2" else "layers"
    assert all("ok" in row(out, n) for n in json.loads(read_safetensors(bugged)[1]["order"])
               if n.startswith(f"{stack}.0") or n == "hidden_states.1"), "layer 0 must be untouched"
    assert "DIFF" in row(out, f"{stack}.2"), "the bug must propagate to the layer after"
