"""Reference tier: the stored goldens are what tools/make_golden.py makes now (issue 17).

A sample of cases, one per family (arcee/causal-lm: the case with HF's declared float64
NaN), is regenerated into a temporary directory with the pinned stack and compared with
golden/: every model, config and tokenizer file byte for byte; golden.safetensors tensor by
tensor (names, dtypes, shapes and raw bytes, NaN bit patterns included) and its metadata
key by key, and likewise grad.safetensors (HF's gradients) where the case has one, except `generator_commit`, which names the commit that wrote the file and so
differs by design between a stored golden and one regenerated at a later commit (a golden
written before the key existed has none).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference tier needs the `reference` extra (torch + transformers)")
transformers = pytest.importorskip("transformers", reason="reference tier needs the `reference` extra")

from conftest import GOLDEN, ROOT  # noqa: E402
from refjax.params.io import read_safetensors  # noqa: E402

pytestmark = pytest.mark.reference

# gpt2/seqcls-single and mega/causal-lm also hold gradient goldens (grad.safetensors)
SAMPLE = ("gpt2/seqcls-single", "arcee/causal-lm", "roformer/model", "mega/causal-lm", "ibert/quant-seqcls")
BY_DESIGN = {"generator_commit"}


def test_sample_is_made_by_this_stack():
    """The <family>/v5-<case> goldens come from transformers 5.x (make_golden --v5, another venv):
    the pinned 4.57.6 stack cannot regenerate them, and make_golden without --v5 has no such case."""
    assert not [case for case in SAMPLE if "/v5-" in case]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_golden.py"), "--out", str(out),
                           "--only", *SAMPLE], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(out)


def files(case_dir: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), case_dir) for d, _, fs in os.walk(case_dir) for f in fs}


@pytest.mark.parametrize("case", SAMPLE)
def test_regenerated_case_equals_stored(regenerated, case):
    stored_dir, new_dir = os.path.join(GOLDEN, case), os.path.join(regenerated, case)
    assert files(new_dir) == files(stored_dir)
    recorded = {"golden.safetensors", "grad.safetensors"}  # the files that name their generator commit
    for rel in sorted(files(stored_dir) - recorded):
        with open(os.path.join(stored_dir, rel), "rb") as a, open(os.path.join(new_dir, rel), "rb") as b:
            assert a.read() == b.read(), f"{case}/{rel} differs from a fresh make_golden run"
    for rel in sorted(files(stored_dir) & recorded):
        stored, stored_meta = read_safetensors(os.path.join(stored_dir, rel))
        new, new_meta = read_safetensors(os.path.join(new_dir, rel))
        assert new_meta.get("generator_commit"), "make_golden records the generator's commit"
        assert {k: v for k, v in stored_meta.items() if k not in BY_DESIGN} == \
            {k: v for k, v in new_meta.items() if k not in BY_DESIGN}
        assert sorted(stored) == sorted(new)
        for key in stored:
            a, b = np.asarray(stored[key]), np.asarray(new[key])
            assert (a.dtype, a.shape) == (b.dtype, b.shape), key
            assert a.tobytes() == b.tobytes(), f"{case}/{rel}: tensor {key} differs from a fresh make_golden run"
