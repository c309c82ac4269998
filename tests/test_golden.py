"""Golden tests: refjax against tensors recorded from HF transformers 4.57.6.

Every case in golden/MANIFEST.json, every recorded output field, both dtypes. Tolerances
are ref.verify.TOLERANCE (float32 1e-5, float64 1e-12, relative to max|hf| with an
absolute floor of the same size; token ids exact); the one stated exception (HF's fp32
causal-LM loss) is documented there.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from conftest import GOLDEN
from refjax.params.io import read_safetensors
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
