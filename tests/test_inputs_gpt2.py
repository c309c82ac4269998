"""Input validation of ref.gpt2.forward and generate on the golden GPT-2 checkpoints.

Every bad input raises ValueError naming the argument (and the bad value / shapes)
*before compute*: the tests replace the compute with a function that fails the test if
it is reached. Edge cases that are valid (batch of one, length one, a fully padded row,
boundary ids) must work and give finite outputs.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors
from refjax import generate as generate_lib
from refjax import gpt2
from refjax.tooling.families import FAMILIES
from refjax.generate import Sampling

GEN = FAMILIES["gpt2"].generate


def _case(name):
    path = os.path.join(GOLDEN, "gpt2", name)
    ck = load_checkpoint(path)
    inputs, _ = read_safetensors(os.path.join(path, "golden.safetensors"))
    return ck, {k: jnp.asarray(np.array(v)) for k, v in inputs.items() if not k.startswith(("float", "text."))}


@pytest.fixture(scope="module")
def lm():
    return _case("lm")


@pytest.fixture(scope="module")
def dh():
    return _case("double-heads")


@pytest.fixture(scope="module")
def tokcls():
    return _case("tokcls")


class ComputeReached(AssertionError):
    pass


@pytest.fixture
def no_compute(monkeypatch):
    """Any call into the transformer / decode loop fails: validation must come first."""

    def boom(*args, **kwargs):
        raise ComputeReached("validation did not stop the call before compute")

    monkeypatch.setattr(gpt2, "model", boom)
    monkeypatch.setattr(generate_lib, "_generate", boom)


def fwd(case, **kw):
    ck, _ = case
    return gpt2.forward(ck.params, ck.config, **kw)


# --------------------------------------------------------------------------------------
# forward: bad inputs
# --------------------------------------------------------------------------------------


def test_id_below_zero(lm, no_compute):
    ids = lm[1]["input_ids"].at[1, 3].set(-1)
    with pytest.raises(ValueError, match=r"input_ids contains -1, outside \[0, 320\) \(vocab_size=320\)"):
        fwd(lm, input_ids=ids)


@pytest.mark.parametrize("bad", [320, 321, 2**31 - 1])
def test_id_at_or_above_vocab(lm, no_compute, bad):
    ids = lm[1]["input_ids"].at[0, -1].set(bad)
    with pytest.raises(ValueError, match=rf"input_ids contains {bad}, outside \[0, 320\) \(vocab_size=320\)"):
        fwd(lm, input_ids=ids)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bool_])
def test_non_integer_ids(lm, no_compute, dtype):
    ids = lm[1]["input_ids"].astype(dtype)
    with pytest.raises(ValueError, match=rf"input_ids must be integers, got dtype {jnp.dtype(dtype).name}"):
        fwd(lm, input_ids=ids)


@pytest.mark.parametrize("shape", [(0, 12), (4, 0), (0, 0)], ids=["empty-batch", "empty-seq", "empty-both"])
def test_empty_input(lm, no_compute, shape):
    ids = jnp.zeros(shape, jnp.int32)
    with pytest.raises(ValueError, match=rf"input_ids must be a non-empty .* got {re.escape(str(list(shape)))}"):
        fwd(lm, input_ids=ids)


@pytest.mark.parametrize("shape", [(12,), (1, 1, 1, 12)])
def test_wrong_rank(lm, no_compute, shape):
    with pytest.raises(ValueError, match=rf"input_ids must be .*\[batch, seq\].*{re.escape(str(list(shape)))}"):
        fwd(lm, input_ids=jnp.ones(shape, jnp.int32))


def test_sequence_longer_than_positions(lm, no_compute):
    ids = jnp.ones((2, 49), jnp.int32)
    with pytest.raises(ValueError, match=r"sequence length 49 exceeds .*n_positions=48"):
        fwd(lm, input_ids=ids)


def test_embeds_longer_than_positions(lm, no_compute):
    embeds = jnp.zeros((1, 60, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"sequence length 60 exceeds .*n_positions=48"):
        fwd(lm, inputs_embeds=embeds)


@pytest.mark.parametrize("name", ["attention_mask", "token_type_ids", "position_ids"])
@pytest.mark.parametrize("shape", [(4, 11), (3, 12), (4, 12, 1), (12,)])
def test_side_input_shape_mismatch(lm, no_compute, name, shape):
    with pytest.raises(ValueError, match=rf"{name} has shape {re.escape(str(list(shape)))}; input_ids has \[4, 12\]"):
        fwd(lm, input_ids=lm[1]["input_ids"], **{name: jnp.zeros(shape, jnp.int32)})


@pytest.mark.parametrize("bad", [-1, 320])
def test_token_type_ids_out_of_range(lm, no_compute, bad):
    ids = lm[1]["input_ids"]
    tt = jnp.zeros_like(ids).at[2, 5].set(bad)
    with pytest.raises(ValueError, match=rf"token_type_ids contains {bad}, outside \[0, 320\)"):
        fwd(lm, input_ids=ids, token_type_ids=tt)


@pytest.mark.parametrize("bad", [-1, 48, 1000])
def test_position_ids_out_of_range(lm, no_compute, bad):
    ids = lm[1]["input_ids"]
    pos = jnp.broadcast_to(jnp.arange(12, dtype=ids.dtype), ids.shape).at[0, -1].set(bad)
    with pytest.raises(ValueError, match=rf"position_ids contains {bad}, outside \[0, 48\) \(n_positions=48\)"):
        fwd(lm, input_ids=ids, position_ids=pos)


@pytest.mark.parametrize("name", ["token_type_ids", "position_ids"])
def test_float_side_ids(lm, no_compute, name):
    ids = lm[1]["input_ids"]
    with pytest.raises(ValueError, match=rf"{name} must be integers"):
        fwd(lm, input_ids=ids, **{name: jnp.zeros(ids.shape, jnp.float32)})


def test_both_input_ids_and_embeds(lm, no_compute):
    ids = lm[1]["input_ids"]
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        fwd(lm, input_ids=ids, inputs_embeds=jnp.zeros((4, 12, 16), jnp.float32))


def test_neither_input_ids_nor_embeds(lm, no_compute):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        fwd(lm, attention_mask=lm[1]["attention_mask"])


@pytest.mark.parametrize("shape", [(4, 12, 15), (4, 12, 32), (4, 12), (1, 4, 12, 16)])
def test_inputs_embeds_wrong_width(lm, no_compute, shape):
    with pytest.raises(ValueError, match=rf"inputs_embeds must be \[batch, seq, 16\], got {re.escape(str(list(shape)))}"):
        fwd(lm, inputs_embeds=jnp.zeros(shape, jnp.float32))


@pytest.mark.parametrize("bad", [-1, 10, 11])
def test_mc_token_ids_outside_sequence(dh, no_compute, bad):
    ids, mc = dh[1]["input_ids"], dh[1]["mc_token_ids"]  # [2, 3, 10], [2, 3]
    with pytest.raises(ValueError, match=rf"mc_token_ids contains {bad}, outside \[0, 10\) \(sequence length=10\)"):
        fwd(dh, input_ids=ids, mc_token_ids=mc.at[1, 2].set(bad))


def test_mc_token_ids_wrong_shape(dh, no_compute):
    """mc_token_ids must be [batch, choices]; today a shape mismatch dies in take_along_axis
    ("Incompatible shapes for broadcasting") without naming the argument."""
    ids, mc = dh[1]["input_ids"], dh[1]["mc_token_ids"]
    with pytest.raises(ValueError, match=r"mc_token_ids"):
        fwd(dh, input_ids=ids, mc_token_ids=mc[:, :2])


@pytest.mark.parametrize("bad", [320, -5])
def test_labels_out_of_vocab(lm, bad):
    ids = lm[1]["input_ids"]
    labels = lm[1]["labels"].at[0, 4].set(bad)
    with pytest.raises(ValueError, match=rf"labels contains {bad}, outside \[0, 320\)"):
        fwd(lm, input_ids=ids, labels=labels)


def test_labels_validated_before_compute(lm, no_compute):
    """The labels range is checked only after the whole forward pass (ref/gpt2.py forward)."""
    ids = lm[1]["input_ids"]
    with pytest.raises(ValueError, match=r"labels contains 320"):
        fwd(lm, input_ids=ids, labels=lm[1]["labels"].at[0, 4].set(320))


def test_labels_ignore_index_is_allowed(lm):
    out = fwd(lm, input_ids=lm[1]["input_ids"], labels=lm[1]["labels"])
    assert (lm[1]["labels"] == -100).any() and jnp.isfinite(out.loss)


def test_labels_wrong_shape(lm, no_compute):
    """labels [4, 11] vs input_ids [4, 12]: today a broadcasting error from inside the loss."""
    with pytest.raises(ValueError, match=r"labels has shape \[4, 11\]; input_ids has \[4, 12\]"):
        fwd(lm, input_ids=lm[1]["input_ids"], labels=lm[1]["labels"][:, :-1])


@pytest.mark.parametrize("bad", [5, 99, -3])
def test_token_classification_labels_out_of_range(tokcls, bad):
    """num_labels=5: torch's cross_entropy raises "Target 99 is out of bounds"; refjax returns
    a NaN loss (or, for -3, silently a wrapped-around value)."""
    ids = tokcls[1]["input_ids"]
    labels = tokcls[1]["labels"].at[0, 1].set(bad)
    with pytest.raises(ValueError, match=rf"labels contains {bad}, outside \[0, 5\) \(num_labels=5\)"):
        fwd(tokcls, input_ids=ids, labels=labels)


def test_mc_labels_out_of_range(dh):
    """3 choices: mc_labels 7 gives a NaN mc_loss instead of an error."""
    ids, mc = dh[1]["input_ids"], dh[1]["mc_token_ids"]
    with pytest.raises(ValueError, match=r"mc_labels contains 7, outside \[0, 3\)"):
        fwd(dh, input_ids=ids, mc_token_ids=mc, mc_labels=jnp.asarray([0, 7]))


def test_python_list_ids(lm):
    """A nested list must either work like an array or raise TypeError/ValueError naming
    input_ids; today: AttributeError: 'list' object has no attribute 'shape'."""
    try:
        out = fwd(lm, input_ids=[[1, 2, 3]])
    except (TypeError, ValueError) as e:
        assert "input_ids" in str(e)
    else:
        assert out.logits.shape == (1, 3, 320)


# --------------------------------------------------------------------------------------
# forward: valid edge cases
# --------------------------------------------------------------------------------------


def test_boundary_values_are_accepted(lm):
    ids = jnp.asarray([[0, 319] * 24], jnp.int32)  # 48 tokens = n_positions, ids 0 and V-1
    pos = jnp.asarray([list(range(47, -1, -1))], jnp.int32)
    tt = jnp.full_like(ids, 319)
    out = fwd(lm, input_ids=ids, position_ids=pos, token_type_ids=tt, labels=ids)
    assert out.logits.shape == (1, 48, 320)
    assert jnp.isfinite(out.logits).all() and jnp.isfinite(out.loss)


def test_batch_of_one_matches_batch(lm):
    ids, mask = lm[1]["input_ids"], lm[1]["attention_mask"]
    full = fwd(lm, input_ids=ids, attention_mask=mask).logits
    for b in (0, 3):
        one = fwd(lm, input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        assert one.shape == (1, 12, 320)
        np.testing.assert_allclose(one[0], full[b], rtol=1e-5, atol=1e-5)


def test_length_one_matches_first_position(lm):
    ids = lm[1]["input_ids"]
    full = fwd(lm, input_ids=ids).logits
    one = fwd(lm, input_ids=ids[:, :1]).logits
    assert one.shape == (4, 1, 320)
    np.testing.assert_allclose(one[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)


def test_fully_padded_row_is_finite(lm):
    ids, mask = lm[1]["input_ids"], lm[1]["attention_mask"]
    padded = mask.at[1].set(0)
    out = fwd(lm, input_ids=ids, attention_mask=padded, output_hidden_states=True, output_attentions=True)
    assert jnp.isfinite(out.logits).all()
    assert jnp.isfinite(out.hidden_states).all()
    assert jnp.isfinite(out.attentions).all()
    ref = fwd(lm, input_ids=ids, attention_mask=mask).logits
    for b in (0, 2, 3):  # other rows are untouched
        np.testing.assert_allclose(out.logits[b], ref[b], rtol=1e-5, atol=1e-5)


def test_all_rows_fully_padded_is_finite(lm):
    ids = lm[1]["input_ids"]
    out = fwd(lm, input_ids=ids, attention_mask=jnp.zeros_like(ids))
    assert jnp.isfinite(out.logits).all()


def test_double_heads_two_dim_input(dh):
    """GPT2DoubleHeadsModel also takes [batch, seq] with mc_token_ids [batch], as HF does."""
    ids, mc = dh[1]["input_ids"], dh[1]["mc_token_ids"]
    out3 = fwd(dh, input_ids=ids, mc_token_ids=mc)
    out2 = fwd(dh, input_ids=ids[0], mc_token_ids=mc[0])
    assert out2.mc_logits.shape == (3,)
    np.testing.assert_allclose(out2.mc_logits, out3.mc_logits[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------


def gen(case, ids=None, mask=None, **kw):
    ck, inputs = case
    ids = inputs["generate.input_ids"] if ids is None else ids
    mask = inputs["generate.attention_mask"] if mask is None else mask
    return GEN(ck.params, ck.config, ids, mask, **kw)


@pytest.mark.parametrize("n", [-1, -100, 2.0, "3", None, True])
def test_generate_bad_max_new_tokens(lm, no_compute, n):
    with pytest.raises(ValueError, match=rf"max_new_tokens must be an integer >= 0, got {re.escape(repr(n))}"):
        gen(lm, max_new_tokens=n)


def test_generate_past_positions(lm, no_compute):
    # the golden prompts are [3, 7] with 7 real tokens in the longest row
    with pytest.raises(ValueError, match=r"prompt \(7 tokens\) \+ max_new_tokens \(42\) = 49 exceeds .*48 positions"):
        gen(lm, max_new_tokens=42)


def test_generate_exactly_to_positions(lm):
    seqs = gen(lm, max_new_tokens=41)  # 7 + 41 = 48 = n_positions
    assert seqs.shape[0] == 3 and 7 < seqs.shape[1] <= 48


def test_generate_right_padded_prompt(lm, no_compute):
    mask = lm[1]["generate.attention_mask"][:, ::-1]  # left-padded -> right-padded
    with pytest.raises(ValueError, match=r"left-padded"):
        gen(lm, mask=mask, max_new_tokens=3)


def test_generate_hole_in_mask(lm, no_compute):
    mask = jnp.ones((3, 7), jnp.int32).at[0, 3].set(0)
    with pytest.raises(ValueError, match=r"left-padded"):
        gen(lm, mask=mask, max_new_tokens=3)


def test_generate_non_lm_head(tokcls, no_compute):
    ck, inputs = tokcls
    with pytest.raises(ValueError, match=r"GPT2ForTokenClassification is not a language model.*GPT2LMHeadModel"):
        GEN(ck.params, ck.config, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=3)


@pytest.mark.parametrize("arch", ["GPT2Model", "GPT2ForSequenceClassification", "GPT2ForQuestionAnswering"])
def test_generate_other_non_lm_heads(lm, no_compute, arch):
    ck, inputs = lm
    config = dataclasses.replace(ck.config, architecture=arch)
    with pytest.raises(ValueError, match=rf"{arch} is not a language model"):
        GEN(ck.params, config, inputs["generate.input_ids"], max_new_tokens=3)


def test_generate_bad_prompt_ids(lm, no_compute):
    ids = lm[1]["generate.input_ids"]
    with pytest.raises(ValueError, match=r"input_ids contains 320"):
        gen(lm, ids=ids.at[0, -1].set(320), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be integers"):
        gen(lm, ids=ids.astype(jnp.float32), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be a non-empty \[batch, seq\] array, got shape \[0, 7\]"):
        gen(lm, ids=ids[:0], mask=lm[1]["generate.attention_mask"][:0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask has shape \[3, 6\]; input_ids has \[3, 7\]"):
        gen(lm, mask=lm[1]["generate.attention_mask"][:, 1:], max_new_tokens=2)


def test_generate_zero_new_tokens_returns_prompt(lm):
    ids = lm[1]["generate.input_ids"]
    np.testing.assert_array_equal(gen(lm, max_new_tokens=0), ids)


def test_generate_batch_one_length_one(lm):
    ck, _ = lm
    seqs = GEN(ck.params, ck.config, jnp.asarray([[5]], jnp.int32), max_new_tokens=4,
               sampling=Sampling(do_sample=False))
    assert seqs.shape[0] == 1 and 1 < seqs.shape[1] <= 5
    assert int(seqs[0, 0]) == 5
    assert ((seqs >= 0) & (seqs < 320)).all()
