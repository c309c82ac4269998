"""Reference tier for MEGA: live comparison with HF transformers 4.57.6
(`transformers.models.deprecated.mega`).

Hypothesis draws small random MEGA configs over every option of issue 7 (bidirectional or
not, truncation, chunking, every normalization_type with and without affine, pre/post norm,
every attention_activation, simple/rotary bias, feature dropout, normalized FFN on/off,
token types, LM dense layer, tying, decoder or encoder), one of the seven HF classes and
inputs HF accepts (with chunking: at most or a multiple of chunk_size), with no, left,
right or fully padded rows. The HF model is re-initialised at random
(tools/golden_mega.reinit_mega, BatchNorm statistics included), saved with
`save_pretrained` and loaded with refjax's `load_checkpoint`; every output HF returns is
compared at every position, in float32 and float64. The draws pass no labels; fixed
examples compare every head's loss: causal LM (labels shifted, right padding), masked LM
and token classification (-100 at pads), sequence classification in its three problem
types, multiple choice, and QA with start/end positions beyond T (clamped, ignored).

Tolerance: |refjax - hf| <= 1e-5 * max(max|hf|, 1) per tensor in both dtypes: HF computes
the EMA's FFT convolution and the rotary sinusoids in float32 even in a float64 model.

HF behaviour reproduced and pinned here:
- a decoder with left padding and softmax attention gives NaN in HF (a leading pad query
  has only masked keys); refjax gives NaN at the same places (checked as a NaN pattern).
- incremental decoding (`past_key_values`) passes only the new token's mask, so past pad
  keys are attended to, and the laplace/relu2 length is 1: refjax's cache reproduces HF's
  incremental path step by step (and equals the full forward where HF's does: softmax
  attention without padding).
"""

from __future__ import annotations

import os
import sys
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

from conftest import ROOT  # noqa: E402
from hf_helpers import assert_close, quiet_torch, random_labels  # noqa: E402
from mega_helpers import FP32_TOL, FWD, make_inputs, raw_configs, seq_lengths  # noqa: E402
from refjax.params.checkpoint import load_checkpoint  # noqa: E402
from refjax import mega  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
from golden_mega import reinit_mega  # noqa: E402

pytestmark = pytest.mark.reference
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build_hf(raw: dict, seed: int):
    from transformers.models.deprecated.mega import modeling_mega
    from transformers.models.deprecated.mega.configuration_mega import MegaConfig

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    model = getattr(modeling_mega, raw["architectures"][0])(MegaConfig(**kwargs)).eval()
    reinit_mega(model, seed)
    return model


def hf_forward(model, inputs: dict, dtype) -> dict:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, output_hidden_states=True,
                    output_attentions=True, return_dict=True)
    result = {}
    for field, value in out.items():
        if isinstance(value, torch.Tensor):
            result[field] = value.numpy().copy()
        elif isinstance(value, tuple):
            result[field] = np.stack([t.numpy() for t in value])
    return result


def compare(raw: dict, inputs: dict, seed: int) -> set[str]:
    """Every field HF returns, in float32 and float64 (float inputs, e.g. labels, cast to
    each); returns the names of the fields compared."""
    with quiet_torch(), tempfile.TemporaryDirectory() as tmp:
        model = build_hf(raw, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        for dtype_name in ("float32", "float64"):
            model.to(getattr(torch, dtype_name))
            typed = {k: v.astype(dtype_name) if v.dtype.kind == "f" else v for k, v in inputs.items()}
            theirs = hf_forward(model, typed, dtype_name)
            ck = load_checkpoint(tmp, dtype=jnp.dtype(dtype_name))
            ours = FWD(ck.params, ck.config, **{k: jnp.asarray(v) for k, v in typed.items()},
                       output_hidden_states=True, output_attentions=True)
            for field, value in theirs.items():
                mine = np.asarray(getattr(ours, field))
                assert_close(f"{dtype_name} {field}", mine.reshape(value.shape) if mine.size == value.size else mine,
                             value, FP32_TOL)
    return set(theirs)


@SETTINGS
@given(st.data(), st.integers(0, 2**31 - 1))
def test_random_configs_match_hf(data, seed):
    raw = data.draw(raw_configs())
    T = data.draw(seq_lengths(raw))
    paddings = ["none", "right"] if raw["is_decoder"] else ["none", "left", "right", "empty"]
    padding = data.draw(st.sampled_from(paddings))
    note(f"raw={raw} T={T} padding={padding}")
    compare(raw, make_inputs(raw, T, padding, np.random.default_rng(seed)), seed)


@pytest.mark.parametrize("attention", ["softmax", "laplace", "relu2"])
def test_decoder_left_padding_matches_hf_nan_pattern_and_values(attention):
    raw = dict(model_type="mega", architectures=["MegaForCausalLM"], vocab_size=40, hidden_size=16,
               num_hidden_layers=2, intermediate_size=24, ema_projection_size=3, shared_representation_size=8,
               nffn_hidden_size=20, max_positions=24, bidirectional=False, is_decoder=True,
               attention_activation=attention, add_token_type_embeddings=False, use_cache=False)
    compare(raw, make_inputs(raw, 6, "left", np.random.default_rng(0)), 0)


# Fixed examples: every head's loss (the draws above pass no labels). case: (HF class,
# config overrides, padding, random_labels kind)
LOSS_CASES = {
    "causal-lm": ("MegaForCausalLM", dict(is_decoder=True, bidirectional=False), "right", "lm"),
    "masked-lm": ("MegaForMaskedLM", {}, "left", "lm"),
    "seqcls-single": ("MegaForSequenceClassification", dict(num_labels=3), "left", "single"),
    "seqcls-regression": ("MegaForSequenceClassification", dict(num_labels=1), "right", "regression"),
    "seqcls-multi": ("MegaForSequenceClassification", dict(num_labels=3), "left", "multi"),
    "mc": ("MegaForMultipleChoice", {}, "left", "choice"),
    "tokcls": ("MegaForTokenClassification", dict(num_labels=3), "right", "token"),
    "qa": ("MegaForQuestionAnswering", {}, "left", "span"),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_every_head_loss_matches_hf(case):
    """Every head with labels on one tiny config: the loss (and every other field) at
    FP32_TOL in float32 and float64. The causal LM shifts its labels; masked LM and token
    labels are -100 at pads; sequence classification infers its problem type from
    num_labels and the label dtype; one QA start and one end position lie beyond T (HF
    clamps them to T and ignores them); decoders are right-padded (left padding is NaN)."""
    arch, extra, padding, kind = LOSS_CASES[case]
    raw = dict(model_type="mega", architectures=[arch], vocab_size=40, hidden_size=16, num_hidden_layers=1,
               intermediate_size=24, ema_projection_size=3, shared_representation_size=8, nffn_hidden_size=20,
               max_positions=24, add_token_type_embeddings=False, use_cache=False, pad_token_id=1, bos_token_id=0,
               eos_token_id=2, **extra)
    rng = np.random.default_rng(5)
    inputs = make_inputs(raw, 6, padding, rng)
    inputs.update(random_labels(kind, rng, inputs["input_ids"], inputs.get("attention_mask"),
                                num_labels=raw.get("num_labels", 2)))
    assert "loss" in compare(raw, inputs, 5)


def hf_incremental_logits(model, ids: np.ndarray, mask: np.ndarray, prompt_len: int) -> np.ndarray:
    """HF's incremental path: prefill `prompt_len` tokens with use_cache, then one token +
    past_key_values per step, the attention mask covering all tokens so far (as
    prepare_inputs_for_generation passes it). Returns the last-position logits of each call."""
    out_logits = []
    with torch.no_grad():
        out = model(torch.from_numpy(ids[:, :prompt_len]), attention_mask=torch.from_numpy(mask[:, :prompt_len]),
                    use_cache=True)
        out_logits.append(out.logits[:, -1].numpy())
        for t in range(prompt_len, ids.shape[1]):
            out = model(torch.from_numpy(ids[:, t:t + 1]), attention_mask=torch.from_numpy(mask[:, :t + 1]),
                        past_key_values=out.past_key_values, use_cache=True)
            out_logits.append(out.logits[:, -1].numpy())
    return np.stack(out_logits, 1)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(0, 2**31 - 1))
def test_cached_decoding_matches_hf_incremental_path(data, seed):
    raw = data.draw(raw_configs(architecture="MegaForCausalLM", decoder=True))
    raw.update(use_chunking=False, chunk_size=-1)
    prompt_len = data.draw(st.integers(1, 4))
    total = prompt_len + data.draw(st.integers(1, 4))
    padding = data.draw(st.sampled_from(["none", "left"]))
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, raw["vocab_size"], size=(2, total)).astype(np.int64)
    mask = np.ones_like(ids)
    if padding == "left" and prompt_len > 1:
        mask[1, : prompt_len - 1] = 0
    note(f"raw={raw} prompt_len={prompt_len} total={total} padding={padding}")
    with quiet_torch(), tempfile.TemporaryDirectory() as tmp:
        model = build_hf(raw, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        theirs = hf_incremental_logits(model, ids, mask, prompt_len)
        ck = load_checkpoint(tmp, dtype=jnp.float32)
    cache = mega.init_cache(ck.config, 2, total, jnp.float32)
    out = FWD(ck.params, ck.config, jnp.asarray(ids[:, :prompt_len]), jnp.asarray(mask[:, :prompt_len]),
              cache=cache)
    ours = [np.asarray(out.logits[:, -1])]
    for t in range(prompt_len, total):
        out = FWD(ck.params, ck.config, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache=out.cache)
        ours.append(np.asarray(out.logits[:, -1]))
    assert_close("incremental logits", np.stack(ours, 1), theirs, FP32_TOL)


@pytest.mark.parametrize("case", ["causal-lm-simple", "norm-batchnorm", "multiple-choice", "masked-lm"])
def test_save_checkpoint_round_trips_through_hf_from_pretrained(case, tmp_path):
    """refjax's save_checkpoint writes a directory HF loads with the same tensors (the dropped
    `_float_tensor` / `num_batches_tracked` buffers are rebuilt by HF)."""
    from transformers.models.deprecated.mega import modeling_mega

    from refjax.params.checkpoint import save_checkpoint

    src = os.path.join(ROOT, "golden", "mega", case)
    ck = load_checkpoint(src)
    save_checkpoint(tmp_path, ck)
    with quiet_torch():
        cls = getattr(modeling_mega, ck.config.architecture)
        theirs = cls.from_pretrained(str(tmp_path)).state_dict()
        want = cls.from_pretrained(src).state_dict()
    assert theirs.keys() == want.keys()
    for key in want:
        assert torch.equal(theirs[key], want[key]), key
