"""Test-wide JAX settings and shared fixtures.

- fp64 is enabled so golden tests can run the float64 tier (arrays stay float32 unless
  a test asks for float64: every array we create states its dtype).
- rank promotion stays allowed: every norm and bias adds a [D] vector to [..., D]
  activations, and spelling each `[None, None, :]` out hides the math. Shapes are
  checked instead by the golden tests, which compare full output shapes.
- `jax_numpy_dtype_promotion="strict"` makes silent dtype mixing (fp32 * fp64) an error.
- matmuls run at "highest" precision, so results never depend on TF32/bf16 passes.
"""

from __future__ import annotations

import os
import sys
import tempfile

import jax
from hypothesis import settings

# CI runs hypothesis derandomized (HYPOTHESIS_PROFILE=ci in .ci/run): the same examples on
# every run, so a landing never depends on luck. Locally the default profile explores anew.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One persistent compilation cache for the whole run: conftest clears JAX's in-memory caches
# between modules (see below), and modules compile many of the same programs (the golden
# forwards); the second compile of a program then loads it from disk instead.
_CACHE = os.environ.get("REFJAX_COMPILATION_CACHE") or tempfile.mkdtemp(prefix="refjax-test-jax-cache-")
os.environ.setdefault("REFJAX_COMPILATION_CACHE", _CACHE)  # subprocesses (CLI tests) share it
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")

GOLDEN = os.path.join(ROOT, "golden")
DATA = os.path.join(ROOT, "tests", "data")


def golden_inputs(case: str, names=("input_ids", "attention_mask")) -> dict:
    """The recorded model inputs of a golden case (e.g. "gpt2/lm") as numpy arrays."""
    import numpy as np

    from refjax.params.io import read_safetensors

    tensors, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    return {k: np.array(tensors[k]) for k in names if k in tensors}


import pytest  # noqa: E402

# The reference tier (tests/test_reference_*.py) skips itself when torch/transformers are
# missing. CI sets REFJAX_REQUIRE_REFERENCE=1 (.ci/run): there, such a skip is a collection
# error, so a CI run without the reference tier fails instead of printing one SKIPPED line.
REQUIRE_REFERENCE = os.environ.get("REFJAX_REQUIRE_REFERENCE", "") == "1"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if (REQUIRE_REFERENCE and report.skipped and isinstance(collector, pytest.Module)
            and collector.path.name.startswith("test_reference_")):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"REFJAX_REQUIRE_REFERENCE=1, but the reference tier module {collector.path.name} "
                           f"was skipped: {reason}")
    return report


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test module. Every executable keeps
    memory mappings alive, and one pytest process compiling thousands of them (five
    families, all heads, hypothesis) can reach the kernel's limit of 65,530 mappings and
    crash; modules share little compiled code, so clearing between them costs little."""
    yield
    jax.clear_caches()


# Whole modules run on pytest-xdist workers (`--dist loadfile`, README). xdist would hand them
# out by number of tests, which sends the one-test, 70-second test_sharding.py last and
# leaves the other worker idle meanwhile; with `--no-loadscope-reorder` (pyproject addopts) it
# keeps this order instead: longest first (one-process seconds, `pytest -p tools.suite_profile`,
# 2026-12-05, AMD EPYC 2 cores), the rest after them in file order. A stale figure only
# costs balance, never coverage.
MODULE_SECONDS = {
    "test_golden.py": 237, "test_reference_ibert.py": 131, "test_fast_path.py": 118, "test_cli.py": 117,
    "test_integer_ibert.py": 108, "test_properties_gpt2.py": 93, "test_reference_train.py": 88,
    "test_properties_arcee.py": 85, "test_reference_arcee.py": 78, "test_interventions.py": 74,
    "test_properties_roformer.py": 72, "test_sharding.py": 67, "test_reference_gpt2.py": 61,
    "test_flag_sensitivity.py": 61, "test_properties_mega.py": 58, "test_finetune.py": 58,
    "test_reference_mega.py": 39, "test_interventions_ibert.py": 30, "test_quant_int_ibert.py": 29,
    "test_taps.py": 23, "test_reference_roformer.py": 23, "test_inputs_mega.py": 23, "test_distributed.py": 22,
    "test_interventions_mega.py": 21, "test_quant_ibert.py": 18, "test_inputs_roformer.py": 18,
    "test_properties_ibert.py": 15, "test_mesh_loading.py": 14, "test_compare.py": 14, "test_diff.py": 13,
    "test_fuzz_checkpoint.py": 12, "test_packaging.py": 12, "test_inputs_ibert.py": 12,
}


def pytest_collection_modifyitems(config, items):
    """Modules longest first (MODULE_SECONDS); tests within a module keep their order."""
    order = {}
    for item in items:
        order.setdefault(item.path.name, len(order))
    items.sort(key=lambda item: (-MODULE_SECONDS.get(item.path.name, 0), order[item.path.name]))
