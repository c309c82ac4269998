"""The reference tier's own checks, checked (issue 17): near-tie tokens, NaN-only tensors,
trees paired by path, quiet_torch used as a context manager, and the switch that makes a
skipped reference tier fail CI. Core tier: no torch needed."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from hf_helpers import NEAR_TIE_ULPS, assert_same_tokens, assert_same_tree, near_tie_bound, scaled_error

T0, V, PAD = 3, 6, 0


def step_logits(top: int, runner_up: int, gap: float, base: float = 2.0) -> np.ndarray:
    """[V] float32 logits: `top` at base, `runner_up` at base - gap, the rest far below."""
    x = np.full(V, base - 5.0, np.float32)
    x[top], x[runner_up] = np.float32(base), np.float32(base) - np.float32(gap)
    return x


def one_row(tokens, logits):
    """[1, T0 + n] sequence after a fixed prompt, [1, n, V] logits."""
    return np.array([[1, 2, 3, *tokens]]), np.stack(logits)[None]


def continuation(table):
    """hf_continue from a table {prefix length: (tokens, logits)}; records its calls."""
    calls = []

    def run(row, ids, n):
        calls.append((row, ids.shape[1], n))
        tokens, step = table[ids.shape[1]]
        return np.concatenate([ids, np.array([tokens[:n]])], 1), np.stack(step[:n])[None]
    run.calls = calls
    return run


ULP2 = float(np.spacing(np.float32(2.0)))  # float32 ulp at the logits' magnitude


def test_near_tie_bound_is_a_few_float32_ulps():
    assert near_tie_bound(2.0) == NEAR_TIE_ULPS * ULP2 and NEAR_TIE_ULPS <= 8
    assert near_tie_bound(-2.0) == near_tie_bound(2.0)


def test_identical_tokens_pass():
    seq, logits = one_row([4, 5], [step_logits(4, 5, 1.0), step_logits(5, 4, 1.0)])
    assert assert_same_tokens(seq, seq, logits, T0) == 0


def test_gap_beyond_float32_rounding_fails():
    """HF's top-2 gap 1e-5 at logit 2 (~42 ulps): was accepted under 1e-4 * max(1, |top|)."""
    hf, logits = one_row([4, 5], [step_logits(4, 5, 1e-5), step_logits(5, 4, 1.0)])
    ours = np.array([[1, 2, 3, 5, 5]])
    with pytest.raises(AssertionError, match="gap"):
        assert_same_tokens(ours, hf, logits, T0, continuation({4: ([5], [step_logits(5, 4, 1.0)])}), PAD)


def test_near_tie_must_pick_the_runner_up():
    hf, logits = one_row([4, 5], [step_logits(4, 5, ULP2), step_logits(5, 4, 1.0)])
    ours = np.array([[1, 2, 3, 1, 5]])  # token 1: not HF's runner-up (5)
    with pytest.raises(AssertionError, match="runner-up"):
        assert_same_tokens(ours, hf, logits, T0, continuation({4: ([5], [step_logits(5, 4, 1.0)])}), PAD)


def test_tokens_after_a_near_tie_are_still_checked():
    """A true near-tie at step 0 (refjax took HF's runner-up 5): HF's continuation of
    refjax's prefix decides the next token; a wrong one fails (was an early True/False)."""
    hf, logits = one_row([4, 4], [step_logits(4, 5, ULP2), step_logits(4, 5, 1.0)])
    table = {4: ([2], [step_logits(2, 3, 1.0)])}  # HF after [.., 5]: token 2, clearly
    good = continuation(table)
    assert assert_same_tokens(np.array([[1, 2, 3, 5, 2]]), hf, logits, T0, good, PAD) == 1
    assert good.calls == [(0, 4, 1)]
    with pytest.raises(AssertionError, match="after step 0"):
        assert_same_tokens(np.array([[1, 2, 3, 5, 4]]), hf, logits, T0, continuation(table), PAD)
    with pytest.raises(AssertionError, match="no hf_continue"):
        assert_same_tokens(np.array([[1, 2, 3, 5, 2]]), hf, logits, T0)


def test_other_rows_and_lengths_still_checked():
    hf = np.array([[1, 2, 3, 4, 5], [1, 2, 3, 4, 4]])
    logits = np.stack([np.stack([step_logits(4, 5, ULP2), step_logits(5, 4, 1.0)])] * 2)
    ours = np.array([[1, 2, 3, 5, 2], [1, 2, 3, 4, 5]])  # row 0 a near-tie, row 1 wrong at step 1
    with pytest.raises(AssertionError, match="row 1, step 1"):
        assert_same_tokens(ours, hf, logits, T0, continuation({4: ([2], [step_logits(2, 3, 1.0)])}), PAD)
    with pytest.raises(AssertionError, match="generated"):  # HF stopped earlier: extra tokens must be pad
        assert_same_tokens(np.array([[1, 2, 3, 4, 7]]), np.array([[1, 2, 3, 4]]), logits[:1, :1], T0, None, PAD)
    assert assert_same_tokens(np.array([[1, 2, 3, 4, PAD]]), np.array([[1, 2, 3, 4]]), logits[:1, :1], T0, None,
                              PAD) == 0


def test_scaled_error_nan_on_both_sides():
    a = np.array([np.nan, 1.0, 2.0])
    assert scaled_error(a, a) == 0.0  # NaN at the same places, the rest compared
    with pytest.raises(AssertionError, match="nothing compared"):
        scaled_error(np.full(3, np.nan), np.full(3, np.nan))
    with pytest.raises(AssertionError, match="NaN pattern"):
        scaled_error(np.array([0.0, 1.0, 2.0]), a)
    assert scaled_error(np.zeros(0), np.zeros(0)) == 0.0


def test_trees_compared_by_path():
    want = {"a": np.ones(2), "b": {"c": np.zeros(1), "d": np.ones(1)}}
    seen = []
    assert assert_same_tree(want, want, lambda p, g, w: seen.append(p)) == 3 and len(seen) == 3
    missing = {"a": np.ones(2), "b": {"c": np.zeros(1)}}
    extra = {**want, "e": np.ones(1)}
    swapped = {"a": np.ones(2), "b": {"c": np.zeros(1), "x": np.ones(1)}}  # same count, another path
    for got in (missing, extra, swapped):
        with pytest.raises(AssertionError, match="leaves differ"):
            assert_same_tree(got, want, lambda p, g, w: None)
    with pytest.raises(AssertionError, match="nothing to compare"):
        assert_same_tree({}, {}, lambda p, g, w: None)


def test_quiet_torch_always_entered():
    """quiet_torch() is a context manager: a bare call does nothing."""
    bare = []
    tests = os.path.join(ROOT, "tests")
    for name in sorted(os.listdir(tests)):
        if name.endswith(".py"):
            with open(os.path.join(tests, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            bare += [f"{name}:{node.lineno}" for node in ast.walk(tree)
                     if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                     and getattr(node.value.func, "id", getattr(node.value.func, "attr", None)) == "quiet_torch"]
    assert not bare, f"quiet_torch() called without `with`: {bare}"


def test_skipped_reference_tier_fails_when_required(tmp_path):
    """With REFJAX_REQUIRE_REFERENCE=1 (set by .ci/run) a reference-tier module that skips
    itself (torch/transformers missing) is an error; without it, a skip."""
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_reference_fake.py").write_text(
        'import pytest\npytest.importorskip("refjax_no_such_module", reason="reference extra missing")\n'
        "def test_x():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "REFJAX_REQUIRE_REFERENCE"}

    def run(**extra):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                              capture_output=True, text=True, env={**env, **extra}, cwd=tmp_path, timeout=300)

    free = run()
    assert free.returncode in (0, 5) and "1 skipped" in free.stdout, free.stdout + free.stderr  # 5: nothing ran
    required = run(REFJAX_REQUIRE_REFERENCE="1")
    assert required.returncode != 0, required.stdout
    assert "reference tier module test_reference_fake.py was skipped" in required.stdout, required.stdout
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "export REFJAX_REQUIRE_REFERENCE=1" in f.read()
