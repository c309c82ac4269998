"""The gradient goldens (grad.safetensors, tools/golden_grads.py) and their checker.

`tests/test_golden.py` runs every golden case through `verify.run_case`, gradient rows
included; this file checks that those rows can fail: a wrong, missing or undeclared gradient
is reported, and the two stated exceptions (zero-by-symmetry gradients, one-entry
parameters) are what the docstring says. Plus a property test of the shared primitive the
gradient goldens forced: `nn.embed(padding_idx=)`.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import GOLDEN
from refjax import nn
from refjax.params.common import Embedding
from refjax.params.io import read_safetensors, write_safetensors
from refjax.tooling import verify

GRAD_CASES = sorted(os.path.relpath(d, GOLDEN) for d, _, fs in os.walk(GOLDEN) if verify.GRADIENTS in fs)


def test_every_family_has_gradient_goldens_in_both_dtypes():
    assert len(GRAD_CASES) == 15
    assert {c.split("/")[0] for c in GRAD_CASES} == {"gpt2", "arcee", "roformer", "ibert", "mega"}
    for case in GRAD_CASES:
        grads, meta = read_safetensors(os.path.join(GOLDEN, case, verify.GRADIENTS))
        assert {k.split("/")[0] for k in grads if "/" in k} == {"float32", "float64"}, case
        assert any(k.startswith("float32/param/") for k in grads) and "float64/inputs_embeds" in grads, case
        assert json.loads(meta["unused"]) == [] or case.startswith("roformer/"), case  # only the sinusoid table


@pytest.fixture
def case_copy(tmp_path):
    """A copy of gpt2/qa whose grad.safetensors a test may edit: edit(fn) applies fn to
    (tensors, metadata) and returns the rows of the gradient check, by "dtype/field"."""
    case = "gpt2/qa"
    shutil.copytree(os.path.join(GOLDEN, case), tmp_path / case)
    path = tmp_path / case / verify.GRADIENTS
    golden, _ = read_safetensors(tmp_path / case / "golden.safetensors")

    def edit(fn=None) -> dict:
        grads, meta = read_safetensors(path)
        grads, meta = {k: np.array(v) for k, v in grads.items()}, dict(meta)
        if fn is not None:
            fn(grads, meta)
        write_safetensors(path, grads, meta)
        return {f"{r.dtype}/{r.field}": r for r in verify._check_gradients(str(tmp_path / case), case, golden)}

    return edit


def test_gradient_rows_pass_and_fail(case_copy):
    rows = case_copy()
    assert all(r.ok for r in rows.values()), verify.format_table([r for r in rows.values() if not r.ok])
    assert rows["float32/grad.transformer.h.0.attn.c_attn.weight"].compared > 0

    def nudge(grads, meta):  # one entry of one small-ish gradient, by 1e-4 of its tensor's scale
        g = grads["float64/param/transformer.h.1.ln_1.bias"]
        g[3] += 1e-4 * np.abs(g).max()
        grads["float32/inputs_embeds"][0, 1, 2] *= 1.001
        del grads["float32/param/transformer.wpe.weight"]  # refjax has it, HF no longer records it
        meta["not_recorded"] = "[]"

    rows = case_copy(nudge)
    bad = {k for k, r in rows.items() if not r.ok}
    # a 1e-4 relative error in a gradient whose scale is 2% of the model's largest still fails:
    # the forward rows' floor of 1 would have passed it
    assert bad == {"float64/grad.transformer.h.1.ln_1.bias", "float32/grad.inputs_embeds",
                   "float32/grad.transformer.wpe.weight"}, bad
    assert "neither records nor declares" in rows["float32/grad.transformer.wpe.weight"].note


def test_a_parameter_refjax_lacks_fails(case_copy):
    def extra(grads, meta):
        grads["float32/param/transformer.h.9.ln_1.bias"] = np.ones(16, np.float32)

    row = case_copy(extra)["float32/grad.transformer.h.9.ln_1.bias"]
    assert not row.ok and "refjax has none" in row.note


def test_zero_by_symmetry_gradient_is_compared_on_the_model_scale(case_copy):
    """gpt2/qa: d loss / d qa_outputs.bias is 0 analytically (the start/end softmax is
    shift-invariant); HF records rounding noise ~1e-8. It is compared on the model's largest
    gradient, so noise passes and a real gradient there does not."""
    rows = case_copy()
    bias = rows["float32/grad.qa_outputs.bias"]
    assert bias.ok and "zero up to rounding" in bias.note

    def real(grads, meta):
        grads["float32/param/qa_outputs.bias"][:] = [0.01, -0.01]

    assert not case_copy(real)["float32/grad.qa_outputs.bias"].ok


def test_one_entry_parameter_tolerance_is_stated():
    row = verify.compare_gradient("c", "float32", "g", np.array([1.00005]), np.array([1.0]), 1e-5, "", 1.0)
    assert row.ok and "one entry" in row.note and row.tol == 1e-5 * verify.SCALAR_FACTOR
    row = verify.compare_gradient("c", "float32", "g", np.array([1.0002]), np.array([1.0]), 1e-5, "", 1.0)
    assert not row.ok


@given(st.integers(0, 2**31 - 1), st.sampled_from([None, 0, 3]))
def test_embed_padding_idx_rows_get_no_gradient(seed, padding_idx):
    """nn.embed(padding_idx=i) = torch's nn.Embedding(padding_idx=i): the same values; the
    table's gradient is the scatter-add of the output gradient over the ids, except row i,
    which gets none from the lookup. fp64, exact (sums of at most 12 terms of 0/1 weights)."""
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(6, 4)))
    ids = jnp.asarray(rng.integers(0, 6, (3, 4)))
    weights = jnp.asarray(rng.normal(size=(3, 4, 4)))
    out = nn.embed(Embedding(table), ids, padding_idx)
    np.testing.assert_array_equal(out, table[ids])
    grad = jax.grad(lambda t: jnp.sum(nn.embed(Embedding(t), ids, padding_idx) * weights))(table)
    expected = np.zeros((6, 4))
    np.add.at(expected, np.asarray(ids), np.asarray(weights))
    if padding_idx is not None:
        expected[padding_idx] = 0.0
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-12)
