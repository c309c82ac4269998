"""Golden tests: refjax against tensors recorded from HF transformers 4.57.6 (and, for the
`<family>/v5-<case>` cases, transformers 5.x: tests/test_golden_v5.py).

Every case in golden/MANIFEST.json, every recorded output field, both dtypes. Tolerances
are refjax.tooling.verify.TOLERANCE (float32 1e-5, float64 1e-12, relative to max|hf| with an
absolute floor of the same size; token ids exact). The stated exceptions, each an HF
behaviour, are listed in that module's docstring: HF's float32 losses in float64 models,
Arcee's and MEGA's float32 internals in float64 (compared at 1e-5), I-BERT's quantized
tensors (exact), and the non-finite HF entries a case's metadata declares
(`declared_nonfinite`: only arcee/causal-lm and its v5 twin, HF's float64 NaN at a fully masked query row),
which are skipped, counted and never reported ok when nothing else is compared.
"""

from __future__ import annotations

import hashlib
import json
import os

import shutil

import numpy as np
import pytest

from conftest import GOLDEN
from refjax.params.io import read_safetensors, write_safetensors
from refjax.tooling import verify

CASES = verify.golden_cases(GOLDEN)


@pytest.mark.parametrize("case", CASES)
def test_golden_case(case):
    rows = list(verify.run_case(GOLDEN, case))
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    recorded = {k for k in golden if k.startswith(("float32/", "float64/"))}
    compared = {f"{r.dtype}/{r.field.split(' [')[0]}" for r in rows}  # "field [option=value]" rows too
    assert recorded <= compared, f"{case}: recorded but not compared: {sorted(recorded - compared)}"
    failed = [r for r in rows if not r.ok]
    assert not failed, "\n" + verify.format_table(failed)


def test_manifest_matches_files():
    with open(os.path.join(GOLDEN, "MANIFEST.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["generator"]["transformers"] == "4.57.6"
    assert manifest["generator"]["torch"].startswith("2.13.0")
    # cases made by another transformers (make_golden --v5) name theirs, and their 4.57.6 twin
    for case, entry in manifest["cases"].items():
        if "transformers" in entry:
            assert entry["transformers"].startswith("5.") and "/v5-" in case, case
            assert entry["torch"].startswith("2.13.0") and entry["twin"] in manifest["cases"], case
        else:
            assert "/v5-" not in case and "twin" not in entry, case
    on_disk = set()
    for folder, _, files in os.walk(GOLDEN):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), GOLDEN).replace(os.sep, "/")
            if rel != "MANIFEST.json":
                on_disk.add(rel)
    assert on_disk == set(manifest["files"]), f"unlisted: {sorted(on_disk - set(manifest['files']))}, " \
                                              f"missing: {sorted(set(manifest['files']) - on_disk)}"
    for rel, entry in manifest["files"].items():
        with open(os.path.join(GOLDEN, rel), "rb") as f:
            data = f.read()
        assert len(data) == entry["bytes"], rel
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{rel}: sha256 differs from MANIFEST.json"
    for case in manifest["cases"]:
        assert os.path.isfile(os.path.join(GOLDEN, case, "golden.safetensors")), case


def test_golden_dir_is_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(GOLDEN) for f in fs)
    assert total < 20 * 2**20, f"golden/ is {total / 2**20:.1f} MiB; keep it well under 20 MiB"


def test_nonfinite_only_where_declared():
    """HF's golden tensors are finite except the entries a case's metadata declares
    (declared_nonfinite, exact counts); exactly one case keeps HF's float64 NaN to show it (and its
    transformers 5.x twin, which shows v5 does the same)."""
    declaring = []
    for case in CASES:
        golden, metadata = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
        declared = json.loads(metadata.get("declared_nonfinite", "{}"))
        found = {k: int((~np.isfinite(a)).sum()) for k, a in golden.items()
                 if np.asarray(a).dtype.kind == "f" and not np.all(np.isfinite(a))}
        assert found == declared, f"{case}: non-finite {found}, declared {declared}"
        if declared:
            declaring.append(case)
    assert declaring == ["arcee/causal-lm", "arcee/v5-causal-lm"]


@pytest.fixture
def nan_case(tmp_path):
    """A copy of arcee/seqcls-single whose float64 HF tensors get NaNs (one entry of
    hidden_states.2, the whole loss), written with the metadata's declaration as given."""
    src = os.path.join(GOLDEN, "arcee", "seqcls-single")
    shutil.copytree(src, tmp_path / "arcee" / "seqcls-single")
    path = tmp_path / "arcee" / "seqcls-single" / "golden.safetensors"
    golden, metadata = read_safetensors(path)
    golden = {k: np.array(v) for k, v in golden.items()}
    golden["float64/hidden_states.2"][0, 0, 0] = np.nan
    golden["float64/loss"][...] = np.nan

    def write(declared: dict | None) -> str:
        meta = dict(metadata)
        if declared is not None:
            meta["declared_nonfinite"] = json.dumps(declared)
        write_safetensors(path, golden, meta)
        return str(tmp_path)

    return write


def rows_by_field(golden_dir):
    return {f"{r.dtype}/{r.field}": r for r in verify.run_case(golden_dir, "arcee/seqcls-single")}


def test_undeclared_nonfinite_golden_fails(nan_case):
    rows = rows_by_field(nan_case(None))
    for key in ("float64/hidden_states.2", "float64/loss"):
        assert not rows[key].ok, rows[key]  # before issue 17: ok, every Arcee float64 NaN skipped
        assert "declares 0" in rows[key].note, rows[key]
    assert rows["float64/logits"].ok


def test_declared_nonfinite_skipped_counted_never_ok(nan_case):
    rows = rows_by_field(nan_case({"float64/hidden_states.2": 1, "float64/loss": 1}))
    hidden, loss = rows["float64/hidden_states.2"], rows["float64/loss"]
    assert hidden.status == "ok" and hidden.skipped == 1 and hidden.compared > 0
    assert loss.status == "SKIP" and loss.skipped == 1 and loss.compared == 0  # nothing compared: not ok
    line = verify.format_table([loss]).splitlines()[-1]
    assert "  SKIP" in line and "  ok" not in line, line
    assert "2 HF entries skipped (declared)" in verify.case_summary(list(rows.values()))
    # a declared count that no longer matches the golden fails
    rows = rows_by_field(nan_case({"float64/hidden_states.2": 2, "float64/loss": 1}))
    assert rows["float64/hidden_states.2"].status == "FAIL"


def test_declared_nan_case_compares_the_rest():
    """arcee/causal-lm: HF's float64 NaN rows are skipped as declared, every other entry
    compared, and refjax finite everywhere."""
    _, metadata = read_safetensors(os.path.join(GOLDEN, "arcee", "causal-lm", "golden.safetensors"))
    declared = json.loads(metadata["declared_nonfinite"])
    rows = [r for r in verify.run_case(GOLDEN, "arcee/causal-lm") if r.dtype == "float64"]
    assert {f"float64/{r.field}": r.skipped for r in rows if r.skipped} == declared
    assert all(r.ok for r in rows), "\n" + verify.format_table(rows)
    assert [r.field for r in rows if r.status == "SKIP"] == ["loss"]
