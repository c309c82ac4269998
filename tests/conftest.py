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
