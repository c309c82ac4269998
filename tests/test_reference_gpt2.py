"""Reference tier for GPT-2: live comparison with Hugging Face transformers.

Hypothesis draws small random GPT-2 configs (every flag refjax reads), one of the six HF
GPT-2 classes and inputs with padding anywhere; the HF model (eager attention, re-initialised
at a large scale so attention is peaked) is saved with `save_pretrained`, loaded with
refjax's `load_checkpoint`, and every output field HF returns is compared at every
position, in float32 and float64. Also: refjax `save_checkpoint` -> HF `from_pretrained`,
greedy generation against HF `generate`, and the real GPT-2 config.

Documented exceptions (HF 4.57.6 behaviour, not refjax bugs):
- float64 + `reorder_and_upcast_attn`: HF raises RuntimeError ("Error with upcasting");
  refjax computes the scores in float64. Only float32 is compared for those configs.
- float64 `GPT2LMHeadModel` loss: HF's `ForCausalLMLoss` casts logits with `.float()`, so
  its loss is float32; refjax keeps float64. Compared at float32 tolerance.
- HF is called with its default `use_cache=True` (see `hf_helpers.hf_outputs`): with
  `use_cache=False` and no attention_mask, HF 4.57 reads non-consecutive position_ids as
  packed sequences and masks across them; refjax, like HF's default call, does not.
- `GPT2DoubleHeadsModel` with [B, C, T] inputs and `position_ids`: HF does not flatten
  them to [B*C, T] (its embedding sum fails or broadcasts wrongly), so those cases draw none.
- `GPT2DoubleHeadsModel.__init__` sets `config.num_labels = 1`; `mc_labels` are drawn only
  for a width-1 summary (mc_logits [B, C]); otherwise HF's loss raises (see docs/design.md).

Runs only with the `reference` extra (torch + transformers); skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference tier needs the `reference` extra (torch + transformers)")
transformers = pytest.importorskip(
    "transformers", reason="reference tier needs the `reference` extra (torch + transformers)")

import jax.numpy as jnp  # noqa: E402
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import DATA  # noqa: E402
from hf_helpers import (  # noqa: E402
    GPT2_ARCHITECTURES, TOL, assert_close, assert_same_tokens, build_hf_model, hf_continuation, hf_generate, hf_outputs,
    quiet_torch, supported_activations)
from refjax.params import gpt2 as gpt2_params  # noqa: E402
from refjax.params.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from refjax.params.gpt2 import parse_gpt2_config  # noqa: E402
from refjax.params.io import count_params  # noqa: E402
from refjax import gpt2  # noqa: E402
from refjax.tooling.families import FAMILIES  # noqa: E402
from refjax.generate import Sampling  # noqa: E402

pytestmark = pytest.mark.reference

ACTIVATIONS = supported_activations()
LM_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2DoubleHeadsModel")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
SETTINGS = dict(deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JNP = {"float32": jnp.float32, "float64": jnp.float64}
TORCH = {"float32": torch.float32, "float64": torch.float64}

# Worst scaled error seen per dtype over the module (printed at the end of the module).
MAX_ERR: dict[str, float] = {"float32": 0.0, "float64": 0.0}
COMPARED: dict[str, int] = {"float32": 0, "float64": 0}


@pytest.fixture(scope="module", autouse=True)
def _torch_settings(request):
    with quiet_torch(threads=1):
        yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and COMPARED["float32"]:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\n[reference gpt2] worst scaled error vs HF: float32 {MAX_ERR['float32']:.3g} "
                f"({COMPARED['float32']} forward cases), float64 {MAX_ERR['float64']:.3g} "
                f"({COMPARED['float64']} cases)")


# --------------------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    architecture: str
    config: dict  # transformers.GPT2Config kwargs
    inputs: dict  # HF keyword -> numpy array (ints int64; floats float64, cast per run)
    seed: int


@st.composite
def gpt2_configs(draw, architecture: str, summary_types=("cls_index",)) -> dict:
    """transformers.GPT2Config kwargs with every field refjax reads drawn at random."""
    n_head = draw(st.integers(1, 4))
    vocab = draw(st.integers(16, 80))
    token = st.none() | st.integers(0, vocab - 1)
    config = dict(
        vocab_size=vocab,
        n_positions=draw(st.integers(16, 40)),
        n_embd=n_head * draw(st.integers(2, 8)),
        n_layer=draw(st.integers(1, 3)),
        n_head=n_head,
        n_inner=draw(st.none() | st.integers(1, 64)),
        activation_function=draw(st.sampled_from(ACTIVATIONS)),
        layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.1])),
        scale_attn_weights=draw(st.booleans()),
        scale_attn_by_inverse_layer_idx=draw(st.booleans()),
        reorder_and_upcast_attn=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        bos_token_id=draw(token),
        eos_token_id=draw(token),
        pad_token_id=draw(token),
        num_labels=draw(st.integers(1, 4)),
    )
    if architecture == "GPT2ForSequenceClassification":
        config["problem_type"] = draw(st.sampled_from(PROBLEM_TYPES))
    if architecture == "GPT2DoubleHeadsModel":
        config.update(
            summary_type=draw(st.sampled_from(summary_types)),
            summary_use_proj=draw(st.booleans()),
            summary_proj_to_labels=draw(st.booleans()),
            summary_activation=draw(st.sampled_from([None, "tanh", *ACTIVATIONS])),
        )
    return config


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


@st.composite
def gpt2_cases(draw, architectures=GPT2_ARCHITECTURES, summary_types=("cls_index",)) -> Case:
    arch = draw(st.sampled_from(architectures))
    cfg = draw(gpt2_configs(arch, summary_types))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    V, P, D = cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"]
    pad = cfg["pad_token_id"]

    batch = draw(st.integers(1, 4))
    if arch == "GPT2ForSequenceClassification" and pad is None:
        batch = 1  # HF (and refjax) refuse batches > 1 without a pad id
    # Multiple choice: [B, C, T] inputs, or plain [B, T] (C = None), which HF also accepts.
    choices = draw(st.sampled_from([None, 1, 2, 3])) if arch == "GPT2DoubleHeadsModel" else None
    T = draw(st.integers(1, P))
    lead = (batch,) if choices is None else (batch, choices)
    rows = int(np.prod(lead))

    x: dict[str, np.ndarray] = {}
    mask = None
    if draw(st.booleans()):  # else no attention_mask at all
        kinds = draw(st.lists(st.sampled_from(["full", "left", "right", "middle", "empty"]),
                              min_size=rows, max_size=rows))
        mask = padding_mask(rng, kinds, T).reshape(*lead, T)
        x["attention_mask"] = mask
    use_embeds = choices is None and draw(st.integers(0, 5)) == 0
    if use_embeds:
        x["inputs_embeds"] = rng.standard_normal((batch, T, D))
    else:
        ids = rng.integers(0, V, size=(*lead, T)).astype(np.int64)
        if mask is not None and pad is not None:
            ids = np.where(mask == 1, ids, pad)
        x["input_ids"] = ids
    if draw(st.booleans()):
        x["token_type_ids"] = rng.integers(0, V, size=(*lead, T)).astype(np.int64)
    if choices is None:
        position_kind = draw(st.sampled_from([None, "random", "from-mask"]))
        if position_kind == "random":
            x["position_ids"] = rng.integers(0, P, size=(batch, T)).astype(np.int64)
        elif position_kind == "from-mask":
            m = mask if mask is not None else np.ones((batch, T), np.int64)
            x["position_ids"] = np.where(m == 0, 1, np.cumsum(m, -1) - 1).astype(np.int64)

    if draw(st.booleans()):  # labels / positions for the loss
        n = cfg["num_labels"]
        if arch in LM_ARCHITECTURES:
            labels = rng.integers(0, V, size=(*lead, T)).astype(np.int64)
            labels[rng.random(labels.shape) < 0.3] = -100
            x["labels"] = labels
        elif arch == "GPT2ForTokenClassification":
            labels = rng.integers(0, n, size=(batch, T)).astype(np.int64)
            labels[rng.random(labels.shape) < 0.3] = -100
            x["labels"] = labels
        elif arch == "GPT2ForQuestionAnswering":
            x["start_positions"] = rng.integers(0, T + 3, size=(batch,)).astype(np.int64)
            x["end_positions"] = rng.integers(0, T + 3, size=(batch,)).astype(np.int64)
        elif arch == "GPT2ForSequenceClassification":
            problem = cfg["problem_type"]
            if problem is None:
                problem = "regression" if n == 1 else draw(
                    st.sampled_from(["single_label_classification", "multi_label_classification"]))
            if problem == "regression":
                x["labels"] = rng.standard_normal((batch,) if n == 1 else (batch, n))
            elif problem == "single_label_classification":
                x["labels"] = rng.integers(0, n, size=(batch,)).astype(np.int64)
            else:
                x["labels"] = rng.integers(0, 2, size=(batch, n)).astype(np.float64)
    if arch == "GPT2DoubleHeadsModel":
        if draw(st.booleans()):
            x["mc_token_ids"] = rng.integers(0, T, size=lead).astype(np.int64)
        # HF's GPT2DoubleHeadsModel.__init__ sets config.num_labels = 1 (a width-1 projection).
        summary = (1 if cfg["summary_proj_to_labels"] else D) if cfg["summary_use_proj"] else D
        # mc_labels (choice ids) only where mc_logits are [B, C]: a width-1 summary, which HF
        # squeezes. With [B, C, S] logits HF's CrossEntropy over view(-1, S) raises for C > 1.
        if choices is not None and summary == 1 and draw(st.booleans()):
            x["mc_labels"] = rng.integers(0, choices, size=(batch,)).astype(np.int64)
    return Case(arch, cfg, x, seed)


# --------------------------------------------------------------------------------------
# Running both sides
# --------------------------------------------------------------------------------------

def refjax_inputs(inputs: dict, dtype: str) -> dict:
    out = {}
    for k, v in inputs.items():
        v = np.asarray(v)
        out[k] = jnp.asarray(v, JNP[dtype]) if np.issubdtype(v.dtype, np.floating) else jnp.asarray(v, jnp.int32)
    return out


def refjax_forward(params, config, inputs: dict, dtype: str):
    return gpt2.forward(params, config, **refjax_inputs(inputs, dtype), output_hidden_states=True,
                        output_attentions=True)


def assert_config_agrees(ours, hf_config, architecture: str) -> None:
    """Every field refjax parsed equals what HF's config object holds."""
    for field in dataclasses.fields(ours):
        name = field.name
        # GPT2Config defines no summary_last_dropout / classifier_dropout unless config.json sets them;
        # HF's modules then fall back (no last dropout; 0.1): refjax's defaults say the same
        implied = {"summary_last_dropout": 0.0, "classifier_dropout": None,
                   # not a config key: the mask the writing transformers uses (params/gpt2.py: future_fill);
                   # the HF running here decides what it does, so it must be what refjax parsed
                   "future_fill": "finfo.min" if int(transformers.__version__.split(".")[0]) >= 5 else "-inf"}
        theirs = architecture if name == "architecture" else getattr(hf_config, name, implied.get(name))
        assert getattr(ours, name) == theirs, f"config field {name}: refjax {getattr(ours, name)!r} vs HF {theirs!r}"
    assert ours.head_dim == hf_config.n_embd // hf_config.n_head
    assert ours.inner_dim == (hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.n_embd)


SINGLE_FIELDS = ("logits", "loss", "last_hidden_state", "mc_logits", "mc_loss", "start_logits", "end_logits")


def compare_outputs(case: Case, ours, hf: dict, dtype: str) -> float:
    """Every field HF returned, at every position. Returns the worst scaled error."""
    tol = TOL[dtype]
    worst = 0.0
    for field in SINGLE_FIELDS:
        mine = getattr(ours, field)
        if field not in hf:
            if field != "last_hidden_state":
                assert mine is None, f"{dtype} {field}: refjax returns it, HF does not"
            continue
        assert mine is not None, f"{dtype} {field}: HF returns it, refjax does not"
        theirs = hf[field]
        field_tol = tol
        if field == "loss" and dtype == "float64" and case.architecture == "GPT2LMHeadModel":
            # Documented: HF's ForCausalLMLoss computes in float32 (logits.float()).
            assert theirs.dtype == np.float32, "HF's causal-LM loss is no longer float32 in a float64 model"
            field_tol = TOL["float32"]
        else:
            assert mine.dtype == theirs.dtype, f"{dtype} {field}: dtype {mine.dtype} vs HF {theirs.dtype}"
        err = assert_close(f"{dtype} {field}", mine, theirs, field_tol)
        if field_tol == tol:
            worst = max(worst, err)
    for field in ("hidden_states", "attentions"):
        theirs_list = hf[field]
        mine = np.asarray(getattr(ours, field))
        assert mine.shape[0] == len(theirs_list), f"{dtype} {field}: {mine.shape[0]} vs HF {len(theirs_list)}"
        for i, theirs in enumerate(theirs_list):
            layer = mine[i]
            if layer.shape != theirs.shape and layer.size == theirs.size and layer.shape[-2:] == theirs.shape[-2:]:
                layer = layer.reshape(theirs.shape)  # HF keeps [B*C, T, D] for non-final multiple-choice states
            worst = max(worst, assert_close(f"{dtype} {field}[{i}]", layer, theirs, tol))
    MAX_ERR[dtype] = max(MAX_ERR[dtype], worst)
    COMPARED[dtype] += 1
    return worst


def describe(case: Case) -> str:
    shapes = {k: list(np.shape(v)) for k, v in case.inputs.items()}
    return f"{case.architecture} seed={case.seed} config={case.config} inputs={shapes}"


# --------------------------------------------------------------------------------------
# 1. Forward: every output field, float32 and float64
# --------------------------------------------------------------------------------------

@settings(max_examples=20, **SETTINGS)
@given(case=gpt2_cases())
def test_forward_matches_hf(case: Case):
    note(describe(case))
    model = build_hf_model(case.architecture, case.config, case.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # before any forward: seq-cls mutates problem_type
        ck32 = load_checkpoint(tmp, dtype=jnp.float32)
        ck64 = load_checkpoint(tmp, dtype=jnp.float64)
    assert ck32.config.architecture == case.architecture
    assert_config_agrees(ck32.config, model.config, case.architecture)

    for dtype, ck in (("float32", ck32), ("float64", ck64)):
        model.to(TORCH[dtype])
        if dtype == "float64" and case.config["reorder_and_upcast_attn"]:
            # Documented: HF's upcast path insists on float32 attention weights.
            with pytest.raises(RuntimeError, match="upcasting"):
                hf_outputs(model, case.inputs, TORCH[dtype])
            continue
        hf = hf_outputs(model, case.inputs, TORCH[dtype])
        ours = refjax_forward(ck.params, ck.config, case.inputs, dtype)
        err = compare_outputs(case, ours, hf, dtype)
        note(f"{dtype}: worst scaled error {err:.3g}")


# --------------------------------------------------------------------------------------
# 1b. GPT2DoubleHeadsModel details: summary types, the forced single label
# --------------------------------------------------------------------------------------

def _save_and_load(model, tmp):
    model.save_pretrained(tmp, safe_serialization=True)
    return load_checkpoint(tmp, dtype=jnp.float32)


@pytest.mark.parametrize("summary_type", ["cls_index", "last", "first", "mean"])
@pytest.mark.parametrize("choices", [None, 3])
def test_double_heads_summary_types_match_hf(summary_type, choices):
    """GPT2SequenceSummary with every summary_type refjax accepts, on [B, T] and
    [B, C, T] inputs. (HF 4.57.6 indexes `hidden_states[:, -1]` / `[:, 0]` / `.mean(dim=1)`,
    i.e. the *choice* axis of [B, C, T, D] multiple-choice states; refjax must give the
    same outputs or refuse the config.)"""
    cfg = dict(vocab_size=24, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=None, eos_token_id=None,
               summary_type=summary_type, summary_use_proj=True, summary_proj_to_labels=True,
               summary_activation="tanh")
    model = build_hf_model("GPT2DoubleHeadsModel", cfg, seed=11)
    lead = (2,) if choices is None else (2, choices)
    ids = np.random.default_rng(11).integers(0, 24, size=(*lead, 5)).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        ck = _save_and_load(model, tmp)
    hf = hf_outputs(model, {"input_ids": ids}, torch.float32)
    ours = gpt2.forward(ck.params, ck.config, jnp.asarray(ids, jnp.int32))
    assert_close("mc_logits", ours.mc_logits, hf["mc_logits"], TOL["float32"])
    assert_close("logits", ours.logits, hf["logits"], TOL["float32"])


@pytest.mark.parametrize("labels_in_config", ["num_labels=3", "no id2label"])
def test_double_heads_config_labels_are_forced_to_one(labels_in_config):
    """HF's GPT2DoubleHeadsModel.__init__ sets config.num_labels = 1, so its checkpoint
    always holds a [1, D] multiple_choice_head.summary; a config.json that says otherwise
    (num_labels/id2label of another size, or none at all, whose default is 2) still loads
    in HF. refjax must load it too, with the same outputs."""
    cfg = dict(vocab_size=24, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=None, eos_token_id=None)
    model = build_hf_model("GPT2DoubleHeadsModel", cfg, seed=5)
    ids = np.random.default_rng(5).integers(0, 24, size=(2, 2, 6)).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        path = os.path.join(tmp, "config.json")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        raw.pop("id2label", None)
        raw.pop("label2id", None)
        if labels_in_config == "num_labels=3":
            raw["num_labels"] = 3
        with open(path, "w", encoding="utf-8") as f:
            json.dump(raw, f)
        hf_model, info = transformers.GPT2DoubleHeadsModel.from_pretrained(
            tmp, attn_implementation="eager", output_loading_info=True)
        assert not any(info.values()), info
        ck = load_checkpoint(tmp, dtype=jnp.float32)
    hf = hf_outputs(hf_model.eval(), {"input_ids": ids}, torch.float32)
    ours = gpt2.forward(ck.params, ck.config, jnp.asarray(ids, jnp.int32))
    assert_close("mc_logits", ours.mc_logits, hf["mc_logits"], TOL["float32"])


# --------------------------------------------------------------------------------------
# 2. refjax save_checkpoint -> HF from_pretrained
# --------------------------------------------------------------------------------------

def _outputs_agree(a: dict, b: dict) -> None:
    """Outputs of two HF models with bit-identical weights. Not bitwise: torch may pick
    another matmul kernel for a reloaded (differently laid out) weight, 1 ulp apart; the
    HF -> save_pretrained -> from_pretrained round trip shows the same."""
    assert a.keys() == b.keys()
    for k in a:
        xs, ys = (a[k], b[k]) if isinstance(a[k], list) else ([a[k]], [b[k]])
        assert len(xs) == len(ys), k
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert x.dtype == y.dtype, k
            assert_close(f"reloaded {k}[{i}]", x, y, 1e-6)


@settings(max_examples=12, **SETTINGS)
@given(case=gpt2_cases(), sharded=st.booleans())
def test_save_checkpoint_loads_in_hf(case: Case, sharded: bool):
    note(describe(case))
    model = build_hf_model(case.architecture, case.config, case.seed)
    original = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
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
        cls = getattr(transformers, case.architecture)
        reloaded, info = cls.from_pretrained(dst, attn_implementation="eager", output_loading_info=True)
    reloaded.eval()
    assert {k: list(v) for k, v in info.items() if v} == {}, f"HF loading info: {info}"
    assert type(reloaded) is cls and reloaded.config.architectures == [case.architecture]
    if getattr(reloaded, "lm_head", None) is not None:
        tied = reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
        assert tied == case.config["tie_word_embeddings"]
    state = {k: v.detach().numpy() for k, v in reloaded.state_dict().items()}
    assert state.keys() == original.keys()
    for k in original:
        assert state[k].dtype == original[k].dtype and np.array_equal(state[k], original[k]), k
    _outputs_agree(hf_outputs(reloaded, case.inputs, torch.float32),
                         hf_outputs(model, case.inputs, torch.float32))


# --------------------------------------------------------------------------------------
# 3. Greedy generation == HF generate
# --------------------------------------------------------------------------------------

@st.composite
def generate_cases(draw):
    arch = draw(st.sampled_from(LM_ARCHITECTURES))
    cfg = draw(gpt2_configs(arch))
    cfg.update(eos_token_id=None, bos_token_id=None)  # eos is chosen per run below
    if cfg["pad_token_id"] is None:
        cfg["pad_token_id"] = draw(st.integers(0, cfg["vocab_size"] - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    batch = draw(st.integers(1, 3))
    T0 = draw(st.integers(1, 10))
    max_new = draw(st.integers(1, min(10, cfg["n_positions"] - T0)))
    rng = np.random.default_rng(seed)
    pads = [int(rng.integers(0, T0)) if row else 0 for row in range(batch)]  # row 0 is unpadded
    mask = np.array([[0] * p + [1] * (T0 - p) for p in pads], np.int64)
    ids = np.where(mask == 1, rng.integers(0, cfg["vocab_size"], size=(batch, T0)), cfg["pad_token_id"])
    eos_row = draw(st.integers(0, batch - 1))
    eos_step = draw(st.integers(0, max_new - 1))
    return arch, cfg, seed, ids.astype(np.int64), mask, max_new, (eos_row, eos_step)


def _check_generation(arch, cfg, seed, ids, mask, max_new, eos_at):
    model = build_hf_model(arch, cfg, seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        ck = load_checkpoint(tmp, dtype=jnp.float32)
    T0, pad = ids.shape[1], cfg["pad_token_id"]
    ops = FAMILIES["gpt2"]

    def ours(config):
        return np.asarray(ops.generate(ck.params, config, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                                       max_new_tokens=max_new, sampling=Sampling(do_sample=False)))

    # No eos: every row runs max_new steps.
    theirs, logits = hf_generate(model, ids, mask, max_new, pad, None)
    assert theirs.shape == (ids.shape[0], T0 + max_new)
    ties = assert_same_tokens(ours(ck.config), theirs, logits, T0, hf_continuation(lambda: model, mask, pad, None), pad)
    note(f"near-ties accepted: {ties}")
    # eos = a token HF generated: that row stops there; finished rows are padded, and when
    # every row has finished HF returns shorter sequences. Checked after near-ties too.
    row, step = eos_at
    eos = int(theirs[row, T0 + step])
    theirs_eos, logits_eos = hf_generate(model, ids, mask, max_new, pad, eos)
    assert np.any(theirs_eos[:, T0:] == eos)
    mine_eos = ours(dataclasses.replace(ck.config, eos_token_id=eos))
    note(f"eos={eos}: HF {theirs_eos.tolist()}")
    assert_same_tokens(mine_eos, theirs_eos, logits_eos, T0, hf_continuation(lambda: model, mask, pad, eos), pad)


@settings(max_examples=10, **SETTINGS)
@given(case=generate_cases())
def test_greedy_generate_matches_hf(case):
    arch, cfg, seed, ids, mask, max_new, eos_at = case
    note(f"{arch} seed={seed} config={cfg} ids={ids.tolist()} mask={mask.tolist()} max_new={max_new} eos_at={eos_at}")
    _check_generation(arch, cfg, seed, ids, mask, max_new, eos_at)


def test_greedy_generate_all_rows_hit_eos():
    """Two rows with the same real tokens after one masked position (different ids under
    the mask) decode identically, so both hit eos at the same step: HF returns sequences
    shorter than T0 + max_new_tokens, and refjax must return the same."""
    cfg = dict(vocab_size=48, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0,
               eos_token_id=None, bos_token_id=None)
    model = build_hf_model("GPT2LMHeadModel", cfg, seed=7)
    real = np.random.default_rng(7).integers(1, 48, size=5)
    ids = np.array([[0, *real], [7, *real]], np.int64)
    mask = np.array([[0, 1, 1, 1, 1, 1]] * 2, np.int64)
    T0, max_new = 6, 8
    theirs, _ = hf_generate(model, ids, mask, max_new, 0, None)
    np.testing.assert_array_equal(theirs[0, T0:], theirs[1, T0:])
    eos = int(theirs[0, T0 + 2])
    theirs_eos, _ = hf_generate(model, ids, mask, max_new, 0, eos)
    assert theirs_eos.shape[1] <= T0 + 3 < T0 + max_new
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        ck = load_checkpoint(tmp, dtype=jnp.float32)
    config = dataclasses.replace(ck.config, eos_token_id=eos)
    mine = np.asarray(FAMILIES["gpt2"].generate(ck.params, config, jnp.asarray(ids, jnp.int32),
                                                jnp.asarray(mask, jnp.int32), max_new_tokens=max_new))
    np.testing.assert_array_equal(mine, theirs_eos)


def test_greedy_generate_stops_at_any_eos_of_a_list():
    """config.json may give eos_token_id as a list (HF: generation stops at any of them).
    refjax's parser accepts the list, so generate must stop at every id in it, as HF does."""
    cfg = dict(vocab_size=48, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0,
               eos_token_id=None, bos_token_id=None)
    model = build_hf_model("GPT2LMHeadModel", cfg, seed=3)
    ids = np.array([[5, 6, 7, 8], [0, 9, 10, 11]], np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int64)
    T0, max_new = 4, 8
    free, _ = hf_generate(model, ids, mask, max_new, 0, None)
    never = next(t for t in range(1, 48) if t not in free)  # an eos id that is never generated
    eos_list = [never, int(free[0, T0 + 1])]
    model.config.eos_token_id = eos_list
    model.generation_config.eos_token_id = eos_list
    theirs, _ = hf_generate(model, ids, mask, max_new, 0, eos_list)
    assert np.isin(theirs[0, T0:], eos_list).any()  # HF stopped row 0 at the second id
    with tempfile.TemporaryDirectory() as tmp:
        ck = _save_and_load(model, tmp)
        with open(os.path.join(tmp, "config.json"), encoding="utf-8") as f:
            assert json.load(f)["eos_token_id"] == eos_list
    mine = np.asarray(FAMILIES["gpt2"].generate(ck.params, ck.config, jnp.asarray(ids, jnp.int32),
                                                jnp.asarray(mask, jnp.int32), max_new_tokens=max_new))
    np.testing.assert_array_equal(mine, theirs)


# --------------------------------------------------------------------------------------
# 4. The real GPT-2 config
# --------------------------------------------------------------------------------------

def test_real_gpt2_config_and_param_count():
    with open(os.path.join(DATA, "configs", "gpt2.json"), encoding="utf-8") as f:
        raw = json.load(f)
    ours = parse_gpt2_config(raw)
    hf_config = transformers.GPT2Config.from_dict(raw)
    assert ours.architecture == "GPT2LMHeadModel"
    assert_config_agrees(ours, hf_config, "GPT2LMHeadModel")
    ours_count = count_params(gpt2_params.skeleton(ours))
    with torch.device("meta"):  # shapes only: no 0.5 GB allocation
        model = transformers.GPT2LMHeadModel(hf_config)
    hf_count = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert ours_count == hf_count == 124_439_808
