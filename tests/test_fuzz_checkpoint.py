"""Fuzz the loader: mutate config.json values and checkpoint bytes at random.

For every family, a golden checkpoint is copied and damaged by 1-3 random mutations:
a config.json field set to an arbitrary JSON value (or removed), a byte of the
safetensors header overwritten, the file truncated, or a weight poisoned with NaN/inf.
Then `load_checkpoint` must either raise one of the documented errors (ValueError and its
subclasses, KeyError, FileNotFoundError) or return a model whose forward on the golden
inputs is finite (or refuses those inputs with a ValueError). Never another exception,
never a NaN, never a hang (each example runs under an alarm).

Random bytes in the *data* region are not drawn: they make some weight an arbitrary
finite float (1e30, say), which is a valid checkpoint that no loader can judge; the
non-finite case is covered by the poison mutation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import GOLDEN, golden_inputs
from refjax.params.checkpoint import load_checkpoint
from refjax.tooling.families import FAMILIES

# One small golden case per family (an LM head where the family has one).
FUZZ_CASES = {"gpt2": "gpt2/lm", "arcee": "arcee/causal-lm", "roformer": "roformer/causal-lm", "mega": "mega/causal-lm", "ibert": "ibert/quant-mlm"}
DOCUMENTED = (ValueError, KeyError, FileNotFoundError)
EXAMPLE_SECONDS = 120

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)

FACTORS = (0, -1, 0.5, 2, 3, 1e-30, 1e30)
mutation = st.one_of(
    st.tuples(st.just("config-set"), st.integers(0, 10**6), json_value),
    # type-preserving tweaks reach the forward more often: a number scaled, a bool flipped
    st.tuples(st.just("config-tweak"), st.integers(0, 10**6), st.sampled_from(FACTORS)),
    st.tuples(st.just("config-drop"), st.integers(0, 10**6)),
    st.tuples(st.just("header-byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("poison"), st.integers(0, 10**6), st.sampled_from([np.nan, np.inf, -np.inf])),
)


def apply(folder: str, m: tuple) -> None:
    config_path = os.path.join(folder, "config.json")
    weights = os.path.join(folder, "model.safetensors")
    kind = m[0]
    if kind.startswith("config"):
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
        try:
            config = json.loads(text)
        except ValueError:
            return  # an earlier mutation already broke it
        if not isinstance(config, dict) or not config:
            return
        key = sorted(config)[m[1] % len(config)]
        if kind == "config-set":
            config[key] = m[2]
        elif kind == "config-tweak":
            value = config[key]
            if isinstance(value, bool):
                config[key] = not value
            elif isinstance(value, (int, float)):
                scaled = value * m[2]
                config[key] = int(scaled) if isinstance(value, int) and abs(scaled) < 2**62 else scaled
            else:
                return
        else:
            del config[key]
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)  # Python writes NaN/Infinity literals and huge ints as they are
        return
    if not os.path.exists(weights):
        return
    with open(weights, "rb") as f:
        data = bytearray(f.read())
    if kind == "header-byte" and len(data) >= 8:
        (n,) = struct.unpack("<Q", data[:8])
        end = min(8 + n, len(data))
        data[m[1] % end] = m[2]
    elif kind == "truncate":
        data = data[: int(len(data) * m[1])]
    elif kind == "poison" and len(data) >= 8:
        (n,) = struct.unpack("<Q", data[:8])
        try:
            header = json.loads(bytes(data[8: 8 + n]))
        except ValueError:
            return
        entries = sorted((k, v) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
        floats = [(k, v) for k, v in entries if v.get("dtype") in ("F32", "F64") and _span(v) > 0]
        if not floats:
            return
        _, entry = floats[m[1] % len(floats)]
        itemsize = 4 if entry["dtype"] == "F32" else 8
        start, stop = entry["data_offsets"]
        count = (stop - start) // itemsize
        if count == 0:
            return
        at = 8 + n + start + (m[1] % count) * itemsize
        if at + itemsize <= len(data):
            data[at: at + itemsize] = np.array(m[2], "<f4" if itemsize == 4 else "<f8").tobytes()
    with open(weights, "wb") as f:
        f.write(bytes(data))


def _span(entry: dict) -> int:
    """Bytes of a header entry's data (0 when an earlier mutation broke the entry)."""
    offsets = entry.get("data_offsets")
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    return offsets[1] - offsets[0] if ok else 0


@contextlib.contextmanager
def alarm(seconds: int):
    def fail(signum, frame):
        raise AssertionError(f"loading or forward took more than {seconds}s: a hang")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_finite(out) -> None:
    for name in ("logits", "last_hidden_state", "start_logits", "end_logits"):
        value = getattr(out, name, None)
        if value is not None:
            assert np.all(np.isfinite(np.asarray(value))), f"{name} is not finite"


@pytest.mark.parametrize("family", sorted(FUZZ_CASES))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_checkpoint_loads_finite_or_raises_documented_error(family, mutations):
    case = FUZZ_CASES[family]
    with tempfile.TemporaryDirectory(prefix="refjax-fuzz-") as tmp:
        folder = os.path.join(tmp, "ckpt")
        shutil.copytree(os.path.join(GOLDEN, case), folder)
        for m in mutations:
            apply(folder, m)
        with alarm(EXAMPLE_SECONDS):
            try:
                ck = load_checkpoint(folder)
            except DOCUMENTED as e:
                event(f"load refused: {type(e).__name__}")
                return
            assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(ck.params)
                       if jnp.issubdtype(leaf.dtype, jnp.floating)), "a NaN/inf weight was loaded"
            try:
                out = FAMILIES[ck.family].forward(ck.params, ck.config, **golden_inputs(case))
            except ValueError:
                event("forward refused the inputs")
                return  # the inputs do not fit the mutated config (e.g. a smaller pad id range): documented
            jax.block_until_ready(out)
            assert_finite(out)
            event("loaded, forward finite")

