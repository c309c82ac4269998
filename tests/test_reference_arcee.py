"""Reference tier for Arcee (AFM-4.5B): live comparison with Hugging Face transformers.

Hypothesis draws small random Arcee configs (GQA ratios, head_dim independent of
hidden_size, every rope_scaling type with valid params, biases, tying, relu2/silu/gelu),
one of the five HF Arcee classes and inputs up to ~80 tokens (long enough to cross the
dynamic / longrope / yarn thresholds of the small max_position_embeddings drawn). The HF
model (eager attention, re-initialised at a large scale so attention is peaked) is saved
with `save_pretrained`, loaded with refjax's `load_checkpoint`, and every output field HF
returns (logits / loss / start+end logits, every hidden state, every attention map) is
compared at every position. Also: greedy generation against HF `generate`, refjax
`save_checkpoint` -> HF `from_pretrained`, and a bf16 checkpoint.

Tolerance: |refjax - hf| <= 1e-5 * max(max|hf|, 1), per tensor, in float32 AND float64.

Documented HF 4.57.6 behaviour (not refjax bugs):
- HF's float64 Arcee is only float32-accurate: ArceeRMSNorm computes in float32, the rotary
  cos/sin are computed in float32 ("force float32") and softmax runs in float32. So the
  float64 comparison uses the float32 tolerance, 1e-5.
- In float64, a query row with no real key (a fully padded row, a leading pad) is NaN in HF:
  its scores are all finfo(float64).min, which the float32 softmax turns into -inf, and the
  NaN spreads along that row. refjax stays finite. The float64 comparison therefore uses
  UNPADDED inputs (no attention_mask); the padded inputs (left/right/middle/empty rows) are
  compared in float32, where HF is finite.
- HF's causal-LM and token-classification losses cast logits with `.float()`, so in a
  float64 model those losses are float32; values are compared, dtypes are not.
- dynamic/longrope RoPE keep state in HF's rotary module (the grown table is cached across
  calls), so every HF call here runs on a freshly loaded model, matching refjax's pure
  per-call semantics (frequencies from that call's max(position_ids) + 1).
- HF is called with its default `use_cache=True` (see hf_helpers.hf_outputs).

Runs only with the `reference` extra (torch + transformers); skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference tier needs the `reference` extra (torch + transformers)")
transformers = pytest.importorskip(
    "transformers", reason="reference tier needs the `reference` extra (torch + transformers)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from arcee_helpers import ARCHITECTURES, ROPE_TYPES, raw_configs  # noqa: E402
from hf_helpers import (  # noqa: E402
    assert_close, assert_same_tokens, hf_continuation, hf_generate, hf_outputs, quiet_torch)
from refjax.params.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from refjax.params.arcee import parse_arcee_config  # noqa: E402
from refjax import arcee  # noqa: E402
from refjax.tooling.families import FAMILIES  # noqa: E402
from refjax.generate import Sampling  # noqa: E402

pytestmark = pytest.mark.reference

TOL = 1e-5  # float32 and float64 (HF's float64 Arcee is float32-accurate)
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
SETTINGS = dict(deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JNP = {"float32": jnp.float32, "float64": jnp.float64}
TORCH = {"float32": torch.float32, "float64": torch.float64}
FWD = jax.jit(arcee.forward, static_argnames=("config", "logits_to_keep", "output_hidden_states",
                                             "output_attentions", "taps"))

# Worst scaled error seen per dtype over the forward cases (printed at the end of the module).
MAX_ERR: dict[str, float] = {"float32": 0.0, "float64": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _torch_settings(request):
    with quiet_torch(threads=1):
        yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\n[reference arcee] worst scaled error vs HF over the forward cases: "
                f"float32 {MAX_ERR['float32']:.3g}, float64 {MAX_ERR['float64']:.3g}")


@pytest.fixture(autouse=True)
def _release_executables():
    """Free this test's compiled programs afterwards (see test_properties_arcee.py: XLA:CPU
    keeps ~6 memory maps per executable; a long pytest process otherwise reaches
    vm.max_map_count and segfaults inside a compile)."""
    yield
    jax.clear_caches()


# --------------------------------------------------------------------------------------
# Building HF models
# --------------------------------------------------------------------------------------

def hf_config(raw: dict):
    kwargs = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    if kwargs.get("rope_scaling") is not None:
        kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])  # HF mutates it ("type" -> "rope_type")
    return transformers.ArceeConfig(**kwargs)


def reinit_(model, seed: int, scale: float = 0.25) -> None:
    """Every weight and bias ~ N(0, scale), RMSNorm weights ~ 1 + N(0, scale); tied
    parameters appear once and stay tied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if type(owner).__name__.endswith("RMSNorm"):
                p.copy_(1.0 + scale * noise)
            else:
                p.copy_(scale * noise)
    model.tie_weights()


def build_hf_model(architecture: str, raw: dict, seed: int):
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)._from_config(hf_config(raw), attn_implementation="eager")
    model.eval()
    reinit_(model, seed)
    return model


def fresh_hf(architecture: str, checkpoint_dir: str, dtype=torch.float32):
    """A freshly loaded HF model (its rotary module has no dynamic/longrope state yet)."""
    model, info = getattr(transformers, architecture).from_pretrained(
        checkpoint_dir, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    architecture: str
    raw: dict  # config.json / ArceeConfig kwargs
    padded: dict  # HF keyword -> numpy array, with an attention_mask (float32 run)
    unpadded: dict  # same tokens, no padding (float64 run)
    seed: int


def padding_mask(rng: np.random.Generator, kinds: list[str], T: int) -> np.ndarray:
    """[rows, T] int64 mask, one padding kind per row: full, left, right, middle, empty."""
    mask = np.ones((len(kinds), T), np.int64)
    for row, kind in enumerate(kinds):
        if kind == "empty":
            mask[row] = 0
        elif T > 1 and kind in ("left", "right"):
            n = int(rng.integers(1, T))
            mask[row, :n] = 0 if kind == "left" else 1
            mask[row, n:] = 1 if kind == "left" else 0
        elif T > 2 and kind == "middle":
            a = int(rng.integers(1, T - 1))
            b = int(rng.integers(a + 1, T))
            mask[row, a:b] = 0
    return mask


def draw_labels(draw, rng, arch: str, raw: dict, B: int, T: int) -> dict:
    n, V = raw["num_labels"], raw["vocab_size"]
    x: dict = {}
    if arch == "ArceeForCausalLM":
        labels = rng.integers(0, V, size=(B, T)).astype(np.int64)
        labels[rng.random(labels.shape) < 0.3] = -100
        x["labels"] = labels
    elif arch == "ArceeForTokenClassification":
        labels = rng.integers(0, n, size=(B, T)).astype(np.int64)
        labels[rng.random(labels.shape) < 0.3] = -100
        x["labels"] = labels
    elif arch == "ArceeForQuestionAnswering":
        x["start_positions"] = rng.integers(0, T + 3, size=(B,)).astype(np.int64)
        x["end_positions"] = rng.integers(0, T + 3, size=(B,)).astype(np.int64)
    elif arch == "ArceeForSequenceClassification":
        problem = raw.get("problem_type")
        if problem is None:
            problem = "regression" if n == 1 else draw(
                st.sampled_from(["single_label_classification", "multi_label_classification"]))
        if problem == "regression":
            x["labels"] = rng.standard_normal((B,) if n == 1 else (B, n))
        elif problem == "single_label_classification":
            x["labels"] = rng.integers(0, n, size=(B,)).astype(np.int64)
        else:
            x["labels"] = rng.integers(0, 2, size=(B, n)).astype(np.float64)
    return x


@st.composite
def arcee_cases(draw, architectures=ARCHITECTURES, rope_types=ROPE_TYPES) -> Case:
    arch = draw(st.sampled_from(architectures))
    raw = draw(raw_configs(arch, rope_types=rope_types, max_positions=(8, 48)))
    if arch == "ArceeForSequenceClassification":
        raw["problem_type"] = draw(st.sampled_from(PROBLEM_TYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    V, D, P, pad = raw["vocab_size"], raw["hidden_size"], raw["max_position_embeddings"], raw["pad_token_id"]
    B = draw(st.integers(1, 3))
    if arch == "ArceeForSequenceClassification" and pad is None:
        B = 1  # HF (and refjax) refuse batches > 1 without a pad id
    T = draw(st.one_of(st.integers(1, 12), st.integers(40, 80)))  # long ones cross the rope thresholds

    padded: dict = {}
    unpadded: dict = {}
    kinds = draw(st.lists(st.sampled_from(["full", "left", "right", "middle", "empty"]), min_size=B, max_size=B))
    mask = padding_mask(rng, kinds, T)
    padded["attention_mask"] = mask
    if draw(st.integers(0, 5)) == 0:
        embeds = rng.standard_normal((B, T, D))
        padded["inputs_embeds"] = unpadded["inputs_embeds"] = embeds
    else:
        ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
        unpadded["input_ids"] = ids
        padded["input_ids"] = np.where(mask == 1, ids, pad) if pad is not None else ids
    position_kind = draw(st.sampled_from([None, "from-mask", "random"]))
    if position_kind == "from-mask":
        padded["position_ids"] = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1).astype(np.int64)
    elif position_kind == "random":  # arbitrary positions, also past max_position_embeddings
        positions = rng.integers(0, 2 * P, size=(B, T)).astype(np.int64)
        padded["position_ids"] = unpadded["position_ids"] = positions
    if draw(st.booleans()):
        labels = draw_labels(draw, rng, arch, raw, B, T)
        padded.update(labels)
        unpadded.update(labels)
    return Case(arch, raw, padded, unpadded, seed)


# --------------------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------------------

def refjax_inputs(inputs: dict, dtype: str) -> dict:
    out = {}
    for k, v in inputs.items():
        v = np.asarray(v)
        out[k] = jnp.asarray(v, JNP[dtype]) if np.issubdtype(v.dtype, np.floating) else jnp.asarray(v, jnp.int32)
    return out


def refjax_forward(params, config, inputs: dict, dtype: str):
    return FWD(params, config, **refjax_inputs(inputs, dtype), output_hidden_states=True, output_attentions=True)


SINGLE_FIELDS = ("logits", "loss", "last_hidden_state", "start_logits", "end_logits")


def compare_outputs(ours, hf: dict, dtype: str) -> float:
    """Every field HF returned, at every position; returns the worst scaled error."""
    worst = 0.0
    for field in SINGLE_FIELDS:
        mine = getattr(ours, field)
        if field not in hf:
            if field != "last_hidden_state":
                assert mine is None, f"{dtype} {field}: refjax returns it, HF does not"
            continue
        assert mine is not None, f"{dtype} {field}: HF returns it, refjax does not"
        if field != "loss":  # HF's float64 causal-LM / token-classification losses are float32
            assert mine.dtype == hf[field].dtype, f"{dtype} {field}: dtype {mine.dtype} vs HF {hf[field].dtype}"
        worst = max(worst, assert_close(f"{dtype} {field}", mine, hf[field], TOL))
    for field in ("hidden_states", "attentions"):
        theirs = hf[field]
        mine = np.asarray(getattr(ours, field))
        assert mine.shape[0] == len(theirs), f"{dtype} {field}: {mine.shape[0]} vs HF {len(theirs)}"
        for i, t in enumerate(theirs):
            worst = max(worst, assert_close(f"{dtype} {field}[{i}]", mine[i], t, TOL))
    MAX_ERR[dtype] = max(MAX_ERR[dtype], worst)
    return worst


def describe(case: Case) -> str:
    shapes = {k: list(np.shape(v)) for k, v in case.padded.items()}
    return f"{case.architecture} seed={case.seed} config={case.raw} inputs={shapes}"


def assert_config_agrees(ours, hf_cfg) -> None:
    """Every scalar field refjax parsed equals HF's config attribute; rope_scaling equal as dicts."""
    skip = {"architecture", "rope_scaling", "original_max_position_embeddings", "partial_rotary_factor"}
    # ArceeConfig defines no classifier_dropout unless config.json sets it; HF's token
    # classification then falls back to 0.1, which refjax's None also means
    implied = {"classifier_dropout": None}
    for field in dataclasses.fields(ours):
        if field.name not in skip:
            assert getattr(ours, field.name) == getattr(hf_cfg, field.name, implied.get(field.name)), field.name
    assert ours.head_dim == hf_cfg.head_dim
    assert ours.original_max_position_embeddings == getattr(hf_cfg, "original_max_position_embeddings", None)
    theirs = dict(hf_cfg.rope_scaling or {"rope_type": "default"})
    theirs.pop("type", None)  # legacy key, copied into rope_type by both
    assert ours.rope_scaling.rope_type == theirs.pop("rope_type")
    for key, value in theirs.items():
        mine = getattr(ours.rope_scaling, key)
        assert (list(mine) if isinstance(mine, tuple) else mine) == value, key


# --------------------------------------------------------------------------------------
# 1. Forward: every output field; float32 padded, float64 unpadded
# --------------------------------------------------------------------------------------

def check_forward(case: Case, log=lambda message: None) -> None:
    model = build_hf_model(case.architecture, case.raw, case.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # before any forward: seq-cls mutates problem_type
        ck32 = load_checkpoint(tmp, dtype=jnp.float32)
        ck64 = load_checkpoint(tmp, dtype=jnp.float64)
        assert ck32.config.architecture == case.architecture
        assert_config_agrees(ck32.config, model.config)
        for dtype, ck, inputs in (("float32", ck32, case.padded), ("float64", ck64, case.unpadded)):
            hf = hf_outputs(fresh_hf(case.architecture, tmp, TORCH[dtype]), inputs, TORCH[dtype])
            ours = refjax_forward(ck.params, ck.config, inputs, dtype)
            err = compare_outputs(ours, hf, dtype)
            log(f"{dtype}: worst scaled error {err:.3g}")


@settings(max_examples=30, **SETTINGS)
@given(case=arcee_cases())
def test_forward_matches_hf(case: Case):
    note(describe(case))
    check_forward(case, note)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "yarn"])
def test_forward_matches_hf_past_the_rope_threshold(rope_type):
    """A fixed case per threshold type: 72 tokens with max_position_embeddings 16 (longrope
    switches at the top-level original_max_position_embeddings 8), float32 left/right
    padded and float64 unpadded, so each run is well past the threshold."""
    rope = {"dynamic": {"rope_type": "dynamic", "factor": 3.0},
            "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0],
                         "long_factor": [1.5, 3.0, 5.0, 11.0]},
            "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}}[rope_type]
    raw = dict(model_type="arcee", architectures=["ArceeForCausalLM"], vocab_size=40, hidden_size=12,
               intermediate_size=20, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               hidden_act="relu2", max_position_embeddings=16, rope_scaling=rope, pad_token_id=0)
    if rope_type == "longrope":
        raw["original_max_position_embeddings"] = 8
    rng = np.random.default_rng(5)
    T = 72
    ids = rng.integers(1, 40, size=(2, T)).astype(np.int64)
    mask = np.ones((2, T), np.int64)
    mask[0, :9] = 0
    mask[1, -5:] = 0
    case = Case("ArceeForCausalLM", raw, {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask,
                                          "labels": ids}, {"input_ids": ids, "labels": ids}, 5)
    check_forward(case)


# --------------------------------------------------------------------------------------
# 2. Greedy generation == HF generate
# --------------------------------------------------------------------------------------

@st.composite
def generate_cases(draw, rope_type: str):
    raw = draw(raw_configs("ArceeForCausalLM", rope_types=(rope_type,), max_positions=(4, 12)))
    raw["eos_token_id"] = None
    if raw["pad_token_id"] is None:
        raw["pad_token_id"] = draw(st.integers(0, raw["vocab_size"] - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    batch = draw(st.integers(1, 3))
    T0 = draw(st.integers(1, 8))
    max_new = draw(st.integers(1, 10))
    rng = np.random.default_rng(seed)
    pads = [int(rng.integers(0, T0)) if row else 0 for row in range(batch)]  # row 0 is unpadded
    mask = np.array([[0] * p + [1] * (T0 - p) for p in pads], np.int64)
    ids = np.where(mask == 1, rng.integers(0, raw["vocab_size"], size=(batch, T0)), raw["pad_token_id"])
    eos_at = (draw(st.integers(0, batch - 1)), draw(st.integers(0, max_new - 1)))
    return raw, seed, ids.astype(np.int64), mask, max_new, eos_at


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@settings(max_examples=2, **SETTINGS)
@given(data=st.data())
def test_greedy_generate_matches_hf(rope_type, data):
    """Greedy tokens == HF generate(do_sample=False) for left-padded prompts, with
    max_position_embeddings 4-12 so prompt + new tokens cross the dynamic/longrope
    thresholds while decoding (each HF call recomputes its frequencies from its own
    positions, as refjax does). Then eos = a token HF generated: rows stop, finished rows
    get the pad id, and both return the same (possibly shorter) sequences."""
    raw, seed, ids, mask, max_new, (row, step) = data.draw(generate_cases(rope_type))
    note(f"seed={seed} config={raw} ids={ids.tolist()} mask={mask.tolist()} max_new={max_new}")
    T0, pad = ids.shape[1], raw["pad_token_id"]
    model = build_hf_model("ArceeForCausalLM", raw, seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        ck = load_checkpoint(tmp, dtype=jnp.float32)

        def ours(config):
            return np.asarray(FAMILIES["arcee"].generate(
                ck.params, config, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                max_new_tokens=max_new, sampling=Sampling(do_sample=False)))

        theirs, logits = hf_generate(fresh_hf("ArceeForCausalLM", tmp), ids, mask, max_new, pad, None)
        assert theirs.shape == (ids.shape[0], T0 + max_new)
        fresh = functools.partial(fresh_hf, "ArceeForCausalLM", tmp)  # dynamic/longrope: state per call
        ties = assert_same_tokens(ours(ck.config), theirs, logits, T0, hf_continuation(fresh, mask, pad, None), pad)
        note(f"near-ties accepted: {ties}")
        eos = int(theirs[row, T0 + step])  # checked after near-ties too
        theirs_eos, logits_eos = hf_generate(fresh(), ids, mask, max_new, pad, eos)
        note(f"eos={eos}: HF {theirs_eos.tolist()}")
        assert_same_tokens(ours(dataclasses.replace(ck.config, eos_token_id=eos)), theirs_eos, logits_eos, T0,
                           hf_continuation(fresh, mask, pad, eos), pad)


# --------------------------------------------------------------------------------------
# 3. refjax save_checkpoint -> HF from_pretrained
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@settings(max_examples=4, **SETTINGS)
@given(case=arcee_cases())
def test_save_checkpoint_loads_in_hf(sharded: bool, case: Case):
    """HF model -> save_pretrained -> refjax load -> refjax save_checkpoint (one file, or
    shards + index) -> HF from_pretrained: no missing/unexpected/mismatched keys, every
    tensor bit-identical, tying as configured, and the reloaded HF model's float32 outputs
    equal refjax's (1e-5)."""
    note(describe(case))
    model = build_hf_model(case.architecture, case.raw, case.seed)
    original = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cls = getattr(transformers, case.architecture)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "hf"), os.path.join(tmp, "refjax")
        model.save_pretrained(src, safe_serialization=True)
        ck = load_checkpoint(src)
        total = sum(v.nbytes for v in original.values())
        save_checkpoint(dst, ck, max_shard_bytes=total // 3 if sharded else None)
        files = sorted(os.listdir(dst))
        if sharded:
            shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
            assert len(shards) >= 2 and "model.safetensors.index.json" in files, files
        else:
            assert "model.safetensors" in files, files
        reloaded, info = cls.from_pretrained(dst, attn_implementation="eager", output_loading_info=True)
        again = load_checkpoint(dst)
    reloaded.eval()
    assert {k: list(v) for k, v in info.items() if v} == {}, f"HF loading info: {info}"
    assert type(reloaded) is cls and reloaded.config.architectures == [case.architecture]
    if case.architecture == "ArceeForCausalLM":
        tied = reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
        assert tied == case.raw["tie_word_embeddings"]
    state = {k: v.detach().numpy() for k, v in reloaded.state_dict().items()}
    assert state.keys() == original.keys()
    for k in original:
        assert state[k].dtype == original[k].dtype and np.array_equal(state[k], original[k]), k
    assert again.config == ck.config
    jax.tree.map(np.testing.assert_array_equal, again.params, ck.params)
    hf = hf_outputs(reloaded, case.padded, torch.float32)
    compare_outputs(refjax_forward(ck.params, ck.config, case.padded, "float32"), hf, "float32")


# --------------------------------------------------------------------------------------
# 4. A bf16 checkpoint
# --------------------------------------------------------------------------------------

@settings(max_examples=4, **SETTINGS)
@given(case=arcee_cases())
def test_bf16_checkpoint_loads(case: Case):
    """A checkpoint HF saved in bfloat16: refjax loads it (dtype=None keeps bfloat16, with
    exactly HF's values), and cast to float32 its outputs equal HF's float32-cast model (1e-5)."""
    note(describe(case))
    model = build_hf_model(case.architecture, case.raw, case.seed).to(torch.bfloat16)
    expected = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        raw_ck = load_checkpoint(tmp)
        ck = load_checkpoint(tmp, dtype=jnp.float32)
        hf32 = fresh_hf(case.architecture, tmp, torch.float32)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(raw_ck.params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(ck.params))
    state = {k: v.detach().numpy() for k, v in hf32.state_dict().items()}
    for k in expected:
        np.testing.assert_array_equal(state[k], expected[k], err_msg=k)  # HF's upcast is exact
    np.testing.assert_array_equal(np.asarray(ck.params.model.embed_tokens.table),
                                  expected[("" if case.architecture == "ArceeModel" else
                                            "transformer." if case.architecture == "ArceeForQuestionAnswering"
                                            else "model.") + "embed_tokens.weight"])
    hf = hf_outputs(hf32, case.padded, torch.float32)
    compare_outputs(refjax_forward(ck.params, ck.config, case.padded, "float32"), hf, "float32")


# --------------------------------------------------------------------------------------
# 5. The real AFM-4.5B config
# --------------------------------------------------------------------------------------

def test_afm_config_agrees_with_hf_and_meta_param_count():
    import json

    from conftest import DATA
    from refjax.params import arcee as arcee_params
    from refjax.params.io import count_params

    with open(os.path.join(DATA, "configs", "AFM-4.5B.json"), encoding="utf-8") as f:
        raw = json.load(f)
    ours = parse_arcee_config(raw)
    cfg = transformers.ArceeConfig.from_dict(raw)
    assert_config_agrees(ours, cfg)
    with torch.device("meta"):  # shapes only: no 18 GB allocation
        model = transformers.ArceeForCausalLM(cfg)
    hf_count = sum(p.numel() for p in model.parameters())
    assert count_params(arcee_params.skeleton(ours)) == hf_count == 4_619_189_760
    rope = model.model.rotary_emb
    assert rope.attention_scaling == pytest.approx(0.1 * np.log(20.0) + 1.0, rel=1e-15)
