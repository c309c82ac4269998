"""Reference tier for I-BERT: refjax against HF live, on seeded random configs in float mode
and in quant mode (calibrated in train mode), every head.

The seeded draws miss some cases, so fixed examples cover them: force_dequant="softmax"
in quant mode (with a sequence-classification and a QA loss), and every head with labels in
float mode, the loss compared: masked LM (-100 at pads), sequence classification in
its three problem types (single-label, regression with num_labels=1, multi-label with float
labels), token classification, multiple choice, and QA with start/end positions beyond T
(HF clamps them to T and ignores them).

Float mode: fp32 within 1e-5 (scaled), fp64 within 1e-12. Quant mode: hidden states and
integer-softmax probabilities equal HF's bit for bit (a float softmax's: 1e-5), the float
heads' outputs and loss 1e-5, the calibrated state exactly (1e-5 relative where force_dequant
puts a float softmax/GELU/LayerNorm before a range: `calibration_tolerance`).
"""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference tier needs the `reference` extra (torch + transformers)")
transformers = pytest.importorskip("transformers", reason="reference tier needs the `reference` extra")


from hf_helpers import TOL, assert_close, assert_same_tree, random_labels  # noqa: E402
from ibert_helpers import build_and_save, calibrate, first_divergence, forward, integer_encoder  # noqa: E402
from ibert_helpers import padded_batch, propagate_hf_scales  # noqa: E402
from refjax.params import ibert as ibert_params  # noqa: E402
from refjax.params.checkpoint import load_checkpoint  # noqa: E402
from refjax.tooling.verify import calibration_tolerance  # noqa: E402

pytestmark = pytest.mark.reference

ARCHS = ("IBertModel", "IBertForMaskedLM", "IBertForSequenceClassification", "IBertForMultipleChoice",
         "IBertForTokenClassification", "IBertForQuestionAnswering")


def random_config(rng, quant: bool) -> tuple[str, dict]:
    heads = int(rng.choice([1, 2, 4]))
    hidden = heads * int(rng.choice([4, 8, 16]))
    pad = int(rng.choice([0, 1, 3]))
    kw = dict(vocab_size=int(rng.integers(20, 60)), hidden_size=hidden, num_attention_heads=heads,
              num_hidden_layers=int(rng.integers(1, 3)), intermediate_size=int(rng.choice([16, 32, 48])),
              max_position_embeddings=pad + 2 + int(rng.integers(10, 20)), type_vocab_size=int(rng.integers(1, 3)),
              pad_token_id=pad, quant_mode=quant, layer_norm_eps=float(rng.choice([1e-12, 1e-5])))
    if quant:
        kw["force_dequant"] = str(rng.choice(["none", "none", "gelu", "softmax", "layernorm", "nonlinear"]))
    arch = ARCHS[int(rng.integers(len(ARCHS)))]
    if arch == "IBertForSequenceClassification":
        kw["num_labels"] = int(rng.integers(1, 4))
    return arch, kw


def hf_run(model, batch, dtype):
    """One no-grad forward in `dtype` (float labels cast to it) with every output."""
    with torch.no_grad():
        model.to(dtype)
        inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
        return model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()},
                     output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("seed", range(4))
def test_float_mode_matches_hf(seed):
    rng = np.random.default_rng(seed)
    arch, kw = random_config(rng, quant=False)
    model, directory = build_and_save(arch, kw, seed)
    shape = (2, 3, 7) if arch == "IBertForMultipleChoice" else (3, int(rng.integers(1, kw["max_position_embeddings"] - kw["pad_token_id"])))
    batch = padded_batch(rng, shape, kw["vocab_size"], kw["pad_token_id"])
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        hf = hf_run(model, batch, getattr(torch, dtype))
        ck = load_checkpoint(directory, dtype=np.dtype(dtype))
        ours = forward(ck.params, ck.config, **batch, output_hidden_states=True, output_attentions=True)
        for i, h in enumerate(hf.hidden_states):
            assert_close(f"{arch} {dtype} hidden_states.{i}", ours.hidden_states[i], h.numpy(), tol)
        for i, a in enumerate(hf.attentions):
            assert_close(f"{arch} {dtype} attentions.{i}", ours.attentions[i], a.numpy(), tol)
        for field in ("logits", "start_logits", "end_logits", "pooler_output"):
            if getattr(hf, field, None) is not None:
                assert_close(f"{arch} {dtype} {field}", getattr(ours, field), getattr(hf, field).numpy(), tol)


@pytest.mark.parametrize("seed", range(5))
def test_quant_mode_is_bit_exact_and_calibration_matches(seed):
    rng = np.random.default_rng(100 + seed)
    arch, kw = random_config(rng, quant=True)
    shape = (2, 2, 6) if arch == "IBertForMultipleChoice" else (3, int(rng.integers(2, kw["max_position_embeddings"] - kw["pad_token_id"])))
    check_quant_mode(arch, kw, seed, rng, shape)


def check_quant_mode(arch, kw, seed, rng, shape, label_kind=None):
    """Calibrate HF on two batches, then on a third: hidden states bit-exact, integer-softmax
    probabilities bit-exact (float softmax: 1e-5), the float heads' outputs and the loss of
    `label_kind`'s labels at 1e-5; refjax's calibration reproduces HF's state."""
    calib = [padded_batch(rng, shape, kw["vocab_size"], kw["pad_token_id"]) for _ in range(2)]
    model, directory = build_and_save(arch, kw, seed, calibration=calib)
    batch = padded_batch(rng, shape, kw["vocab_size"], kw["pad_token_id"])
    labels = {} if label_kind is None else random_labels(label_kind, rng, **batch, num_labels=kw.get("num_labels", 2))
    hf = hf_run(model, {**batch, **labels}, torch.float32)
    ck = load_checkpoint(directory, dtype=np.float32)
    ours = forward(ck.params, ck.config, **batch, **labels, output_hidden_states=True, output_attentions=True)
    for i, h in enumerate(hf.hidden_states):
        np.testing.assert_array_equal(np.asarray(ours.hidden_states[i]), h.numpy(), err_msg=f"{kw} hidden {i}")
    for i, a in enumerate(hf.attentions):
        if ck.config.quantized("softmax"):
            np.testing.assert_array_equal(np.asarray(ours.attentions[i]), a.numpy(), err_msg=f"{kw} attn {i}")
        else:
            assert_close(f"{arch} attentions.{i}", ours.attentions[i], a.numpy(), 1e-5)
    assert (getattr(hf, "loss", None) is None) == (label_kind is None)
    for field in ("logits", "start_logits", "end_logits", "pooler_output", "loss"):
        if getattr(hf, field, None) is not None:
            assert_close(f"{arch} {field}", getattr(ours, field), getattr(hf, field).numpy(), 1e-5)
    state = ibert_params.initial_state(ck.config)
    for b in calib:
        state = calibrate(ck.params, ck.config, state, **b)
    tol, _ = calibration_tolerance(ck.config)
    def close(path, got, want):
        got, want = np.asarray(got), np.asarray(want)
        assert np.all(np.abs(got - want) <= tol * np.maximum(np.abs(want), 1.0)), (kw, path, got, want)
    assert_same_tree(state, ck.params.state, close)  # paired by path: a missing or extra leaf fails


# Fixed examples: what the seeded draws above leave out (force_dequant="softmax", the
# classification and QA heads in float mode, every loss), each head on one tiny config.
FIXED = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32,
             max_position_embeddings=20, type_vocab_size=2, pad_token_id=1, layer_norm_eps=1e-5)
# case: (HF class, config overrides, random_labels kind)
LOSS_CASES = {
    "mlm": ("IBertForMaskedLM", {}, "lm"),
    "seqcls-single": ("IBertForSequenceClassification", dict(num_labels=3), "single"),
    "seqcls-regression": ("IBertForSequenceClassification", dict(num_labels=1), "regression"),
    "seqcls-multi": ("IBertForSequenceClassification", dict(num_labels=3), "multi"),
    "tokcls": ("IBertForTokenClassification", dict(num_labels=3), "token"),
    "mc": ("IBertForMultipleChoice", {}, "choice"),
    "qa": ("IBertForQuestionAnswering", {}, "span"),
}


def fixed_shape(arch: str) -> tuple[int, ...]:
    return (2, 3, 6) if arch == "IBertForMultipleChoice" else (3, 7)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_float_mode_head_and_loss_match_hf(case):
    """Every head with labels in float mode: logits and loss in fp32 (1e-5) and fp64 (1e-12);
    the sequence-classification problem types are inferred from num_labels and the label
    dtype, as HF infers them; one QA start and one end position lie beyond T (ignored)."""
    arch, extra, kind = LOSS_CASES[case]
    kw = dict(FIXED, quant_mode=False, **extra)
    rng = np.random.default_rng(7)
    model, directory = build_and_save(arch, kw, 7)
    batch = padded_batch(rng, fixed_shape(arch), kw["vocab_size"], kw["pad_token_id"])
    labels = random_labels(kind, rng, **batch, num_labels=kw.get("num_labels", 2))
    for dtype, tol in TOL.items():
        typed = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in labels.items()}
        hf = hf_run(model, {**batch, **typed}, getattr(torch, dtype))
        ck = load_checkpoint(directory, dtype=np.dtype(dtype))
        ours = forward(ck.params, ck.config, **batch, **typed)
        assert hf.loss is not None and np.isfinite(hf.loss.item())
        for field in ("logits", "start_logits", "end_logits", "loss"):
            if getattr(hf, field, None) is not None:
                assert_close(f"{case} {dtype} {field}", getattr(ours, field), getattr(hf, field).numpy(), tol)


@pytest.mark.parametrize("case", ["seqcls-single", "qa"])
def test_quant_mode_force_dequant_softmax_is_bit_exact_with_loss(case):
    """force_dequant="softmax" (a float softmax inside the integer encoder; the seeded
    draws never pick it), calibrated as above: hidden states bit-exact, probabilities and
    the float head's logits and loss (on quantized hidden states) at 1e-5, the calibrated
    state as `calibration_tolerance` says."""
    arch, extra, kind = LOSS_CASES[case]
    kw = dict(FIXED, quant_mode=True, force_dequant="softmax", **extra)
    check_quant_mode(arch, kw, 11, np.random.default_rng(11), fixed_shape(arch), label_kind=kind)


@pytest.mark.parametrize("seed", range(3))
def test_scale_propagating_hf_matches_propagate_scales_and_the_integer_path(seed):
    """HF patched to hand each layer its true input scale (ibert_helpers.propagate_hf_scales),
    calibrated and run live: refjax's `propagate_scales=True` forward equals it bit for bit,
    `calibrate(..., propagate_scales=True)` reproduces its buffers (1e-6), and the integer path
    equals that forward up to a first divergence of at most one 8-bit step
    (tests/test_integer_ibert.py says where and why such a divergence happens)."""
    rng = np.random.default_rng(300 + seed)
    arch, kw = random_config(rng, quant=True)
    kw.update(num_hidden_layers=2, force_dequant="none")  # the hand-off matters from layer 1 on
    shape = (2, 2, 6) if arch == "IBertForMultipleChoice" else (3, int(rng.integers(2, kw["max_position_embeddings"] - kw["pad_token_id"])))
    calib = [padded_batch(rng, shape, kw["vocab_size"], kw["pad_token_id"]) for _ in range(2)]
    model, directory = build_and_save(arch, kw, seed, calibration=calib, patch=propagate_hf_scales)
    batch = padded_batch(rng, shape, kw["vocab_size"], kw["pad_token_id"])
    hf = hf_run(model, batch, torch.float32)
    ck = load_checkpoint(directory, dtype=np.float32)
    ours = forward(ck.params, ck.config, **batch, output_hidden_states=True, output_attentions=True,
                   taps=True, propagate_scales=True)
    for i, h in enumerate(hf.hidden_states):
        np.testing.assert_array_equal(np.asarray(ours.hidden_states[i]), h.numpy(), err_msg=f"{kw} hidden {i}")
    for i, a in enumerate(hf.attentions):
        np.testing.assert_array_equal(np.asarray(ours.attentions[i]), a.numpy(), err_msg=f"{kw} attn {i}")
    unpatched = build_and_save(arch, kw, seed, calibration=calib)[0]
    assert not np.array_equal(hf_run(unpatched, batch, torch.float32).hidden_states[2].numpy(),
                              hf.hidden_states[2].numpy()), "the patch changed nothing"
    state = ibert_params.initial_state(ck.config)
    for b in calib:
        state = calibrate(ck.params, ck.config, state, **b, propagate_scales=True)
    # 1e-6 relative: one seed's layer-1 context max (unrounded probs @ v, read by calibration)
    # came out one float32 ulp from torch's (its matmul summation order; forward unaffected)
    assert_same_tree(state, ck.params.state, lambda path, got, want: np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=1e-6, atol=0, err_msg=f"{kw} {path}"))
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    int_taps = integer_encoder(ck.params, ck.config, ck.params.state, flat["input_ids"], flat["attention_mask"],
                               taps=True).taps
    divergence = first_divergence(ours.taps, int_taps, ck.config.num_hidden_layers)
    assert divergence is None or divergence[2] <= 1, divergence
    if divergence is None:
        ints = forward(ck.params, ck.config, **batch, output_hidden_states=True, integer=True)
        for i, h in enumerate(hf.hidden_states):
            np.testing.assert_array_equal(np.asarray(ints.hidden_states[i]), h.numpy(), err_msg=f"{kw} int {i}")
