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

import jax
from hypothesis import settings

# CI runs hypothesis derandomized (HYPOTHESIS_PROFILE=ci in .ci/run): the same examples on
# every run, so a landing never depends on luck. Locally the default profile explores anew.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test module. Every executable keeps
    memory mappings alive, and one pytest process compiling thousands of them (five
    families, all heads, hypothesis) can reach the kernel's limit of 65,530 mappings and
    crash; modules share little compiled code, so clearing between them costs little."""
    yield
    jax.clear_caches()
