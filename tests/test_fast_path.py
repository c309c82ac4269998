"""The fast path (`fast=True`: jax.nn.dot_product_attention) against the readable path.

Same weights, same inputs. Tolerances: float32 1e-5 relative to max|readable| on every
real (non-pad) token — pad-query rows are implementation-defined in the fast path, as in
HF's SDPA; greedy tokens exactly; bfloat16 (weights and compute; softmax and norms
accumulate in fp32) within 3e-2 relative of the float32 readable path.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN
from refjax import generate as generate_lib
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors
from refjax.tooling.families import FAMILIES

CASES = ["gpt2/lm", "gpt2/lm-inverse-layer-idx", "gpt2/lm-noscale", "gpt2/seqcls-single", "gpt2/double-heads",
         "arcee/causal-lm", "arcee/mqa", "arcee/bias", "arcee/rope-yarn", "arcee/rope-dynamic", "arcee/qa"]


def _inputs(golden):
    return {k: jnp.asarray(golden[k]) for k in ("input_ids", "attention_mask", "mc_token_ids") if k in golden}


def _main_output(out):
    return out.logits if out.logits is not None else out.start_logits


def _rel_err(a, b, mask):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None and a.shape[: mask.ndim] == mask.shape:
        a, b = a[mask], b[mask]
    return np.abs(a - b).max() / max(np.abs(b).max(), 1.0)


@pytest.mark.parametrize("case", CASES)
def test_fast_forward_equals_readable(case):
    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float32)
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    forward = FAMILIES[ckpt.family].forward
    inputs = _inputs(golden)
    readable = forward(ckpt.params, ckpt.config, **inputs)
    fast = jax.jit(forward, static_argnames=("config", "fast"))(ckpt.params, ckpt.config, **inputs, fast=True)
    mask = np.asarray(golden["attention_mask"]).astype(bool)
    assert _rel_err(_main_output(fast), _main_output(readable), mask) <= 1e-5
    assert _rel_err(fast.last_hidden_state, readable.last_hidden_state, mask) <= 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if "lm" in c])
def test_fast_generation_equals_readable(case):
    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float32)
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    family = FAMILIES[ckpt.family]
    prompt, mask = golden["generate.input_ids"], golden["generate.attention_mask"]
    readable, readable_logits = family.generate(ckpt.params, ckpt.config, prompt, mask, max_new_tokens=10,
                                                return_logits=True)
    fast, fast_logits = family.generate(ckpt.params, ckpt.config, prompt, mask, max_new_tokens=10,
                                        return_logits=True, fast=True)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(readable))
    np.testing.assert_array_equal(np.asarray(fast), golden["generate.sequences"])
    assert _rel_err(fast_logits, readable_logits, None) <= 1e-5


@pytest.mark.parametrize("case", ["gpt2/lm", "arcee/causal-lm"])
def test_bfloat16_policy_close_to_float32(case):
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    inputs = _inputs(golden)
    ref32 = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float32)
    bf16 = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.bfloat16)
    forward = FAMILIES[ref32.family].forward
    expected = forward(ref32.params, ref32.config, **inputs).logits
    for fast in (False, True):
        got = forward(bf16.params, bf16.config, **inputs, fast=fast).logits
        assert got.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        assert _rel_err(got, expected, np.asarray(golden["attention_mask"]).astype(bool)) <= 3e-2


def test_fast_path_refuses_attentions_and_taps():
    ckpt = load_checkpoint(os.path.join(GOLDEN, "gpt2", "lm"))
    ids = jnp.ones((1, 4), jnp.int32)
    for flag in ("output_attentions", "taps"):
        with pytest.raises(ValueError, match="fast=True"):
            FAMILIES["gpt2"].forward(ckpt.params, ckpt.config, ids, fast=True, **{flag: True})


@pytest.mark.parametrize("case", ["gpt2/lm", "arcee/causal-lm"])
def test_remat_gives_the_same_loss_and_gradients(case):
    """remat=True (jax.checkpoint per layer) changes memory, not math: fp64, within 1e-12."""
    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float64)
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    forward = FAMILIES[ckpt.family].forward
    inputs = {k: jnp.asarray(golden[k]) for k in ("input_ids", "attention_mask", "labels")}

    def loss(params, remat):
        return forward(params, ckpt.config, **inputs, remat=remat).loss

    plain = jax.value_and_grad(loss)(ckpt.params, False)
    rematted = jax.jit(jax.value_and_grad(loss), static_argnums=1)(ckpt.params, True)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(rematted)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-12)


UNSTACK_CASES = ["gpt2/lm", "gpt2/double-heads", "arcee/causal-lm", "arcee/mqa", "arcee/qa", "roformer/causal-lm"]


@pytest.mark.parametrize("case", UNSTACK_CASES)
def test_unstacked_layers_give_the_same_outputs(case):
    """`unstack_layers` (a loop over per-layer buffers instead of a scan over the stack) is
    a re-layout, not new math: every output equals the stacked forward's within 1e-6 of its
    scale (the same ops; XLA may schedule the reductions differently), hidden states and
    attentions included, eager and jitted, readable and fast."""
    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float32)
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    family = FAMILIES[ckpt.family]
    unstacked = family.unstack_layers(ckpt.params)
    assert isinstance(jax.tree_util.tree_leaves(unstacked)[0], jax.Array)
    inputs = _inputs(golden)
    for fast in (False, True):
        kw = dict(output_hidden_states=True, output_attentions=not fast, fast=fast)
        stacked_out = family.forward(ckpt.params, ckpt.config, **inputs, **kw)
        jitted = jax.jit(family.forward, static_argnames=("config", "output_hidden_states", "output_attentions", "fast"))
        for out in (family.forward(unstacked, ckpt.config, **inputs, **kw), jitted(unstacked, ckpt.config, **inputs, **kw)):
            for name in ("logits", "start_logits", "mc_logits", "hidden_states", "attentions"):
                a, b = getattr(out, name), getattr(stacked_out, name)
                assert (a is None) == (b is None), name
                if a is not None:
                    assert _rel_err(a, b, None) <= 1e-6, name


@pytest.mark.parametrize("case", ["gpt2/lm", "arcee/causal-lm", "roformer/causal-lm", "mega/causal-lm"])
def test_unstacked_generation_equals_stacked(case):
    """generate on per-layer buffers (the default for a small model, `unstack=True`, or
    params passed unstacked) gives the stacked decode's tokens exactly and its step logits
    within 1e-6 of their scale."""
    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float32)
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    family = FAMILIES[ckpt.family]
    prompt, mask = golden["generate.input_ids"], golden["generate.attention_mask"]
    assert family._unstack(ckpt.params, None) and not family._unstack(ckpt.params, False)
    for fast in (False, True) if ckpt.family != "mega" else (False,):  # MEGA has no fast attention path
        ref_seqs, ref_logits = family.generate(ckpt.params, ckpt.config, prompt, mask, max_new_tokens=10,
                                               return_logits=True, fast=fast, unstack=False)
        for params, unstack in ((ckpt.params, None), (family.unstack_layers(ckpt.params), False)):
            seqs, logits = family.generate(params, ckpt.config, prompt, mask, max_new_tokens=10, return_logits=True,
                                           fast=fast, unstack=unstack)
            np.testing.assert_array_equal(np.asarray(seqs), np.asarray(ref_seqs))
            assert _rel_err(logits, ref_logits, None) <= 1e-6


@pytest.mark.parametrize("case", ["gpt2/lm", "arcee/causal-lm", "roformer/causal-lm", "mega/causal-lm"])
def test_per_layer_cache_gives_the_same_forward(case):
    """A cache held per layer (`cache.per_layer()`: what `generate` decodes with on unstacked
    layers) is a re-layout: a prefill and then a one-token step give the stacked cache's
    logits (within 1e-6 of their scale) and the same cache contents, and the cache comes back
    in the layout it was given (a tuple of L buffers), on unstacked layers (a loop) and on
    the stack (the scan stacks it)."""
    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float32)
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    family, config = FAMILIES[ckpt.family], ckpt.config
    prompt, mask = jnp.asarray(golden["generate.input_ids"]), jnp.asarray(golden["generate.attention_mask"])
    B, T = prompt.shape
    positions = ((lambda p: dict(position_ids=p)) if family.takes_position_ids else (lambda p: {}))
    step_ids = prompt[:, -1:]

    def prefill_and_step(params, cache):
        first = family.forward(params, config, prompt, mask, **positions(generate_lib.prompt_positions(mask)),
                               cache=cache)
        second = family.forward(params, config, step_ids, jnp.ones((B, 1), jnp.int32),
                                **positions(jnp.sum(mask, -1, keepdims=True).astype(jnp.int32)), cache=first.cache)
        return first, second

    stacked_cache = family.init_cache(config, B, T + 1, jnp.float32)
    ref_first, ref_second = prefill_and_step(ckpt.params, stacked_cache)
    per_layer_fields = [f.name for f in dataclasses.fields(stacked_cache)
                        if getattr(stacked_cache, f.name).ndim >= 3]  # [L, B, ...]: keys, values (MEGA: ema_state)
    assert len(per_layer_fields) >= 2
    for params in (family.unstack_layers(ckpt.params), ckpt.params):
        first, second = prefill_and_step(params, stacked_cache.per_layer())
        for out, ref in ((first, ref_first), (second, ref_second)):
            assert _rel_err(out.logits, ref.logits, None) <= 1e-6
            for name in per_layer_fields:
                buffers, stacked = getattr(out.cache, name), getattr(ref.cache, name)
                assert type(buffers) is tuple and len(buffers) == stacked.shape[0], name
                assert _rel_err(jnp.stack(buffers), stacked, None) <= 1e-6, name
            assert out.cache.max_length == ref.cache.max_length == T + 1


def test_generate_keeps_a_big_stack(monkeypatch):
    """Above UNSTACK_MAX_BYTES generate does not copy the layer weights unless asked."""
    from refjax.tooling import families

    ckpt = load_checkpoint(os.path.join(GOLDEN, "gpt2/lm"), dtype=jnp.float32)
    family = FAMILIES["gpt2"]
    monkeypatch.setattr(families, "UNSTACK_MAX_BYTES", 1000)
    assert not family._unstack(ckpt.params, None) and family._unstack(ckpt.params, True)


LAYER_STACKS = {"gpt2": ("n_layer", lambda p: p.transformer.h), "arcee": ("num_hidden_layers", lambda p: p.model.layers),
                "roformer": ("num_hidden_layers", lambda p: p.roformer.encoder.layer),
                "mega": ("num_hidden_layers", lambda p: p.mega.layers)}


@pytest.mark.parametrize("case", ["gpt2/lm", "arcee/causal-lm", "roformer/mlm", "mega/causal-lm"])
def test_bfloat16_scan_never_upcasts_the_whole_stack(case, monkeypatch):
    """A jitted bf16 forward over stacked layers holds no fp32 copy of a stacked weight (on
    jaxlib < 0.12, XLA:CPU upcasts bf16 and hoists the convert out of the scan unless the scan
    slices bit patterns: ref/layers.py), and the bit-pattern scan changes no logit bit. The
    golden model is deepened to 7 layers so that [7, ...] names only stacked weights."""
    import dataclasses

    import equinox as eqx

    from refjax import layers

    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.bfloat16)
    golden, _ = read_safetensors(os.path.join(GOLDEN, case, "golden.safetensors"))
    family, inputs = FAMILIES[ckpt.family], _inputs(golden)
    field, where = LAYER_STACKS[ckpt.family]
    deeper = jax.tree.map(lambda a: jnp.concatenate([a] * 7)[:7], where(ckpt.params))
    params = eqx.tree_at(where, ckpt.params, deeper)
    config = dataclasses.replace(ckpt.config, **{field: 7})
    forward = jax.jit(lambda params, inputs: family.forward(params, config, **inputs).logits)
    hlo = forward.lower(params, inputs).compile().as_text()
    stacked = [leaf.shape for leaf in jax.tree_util.tree_leaves(deeper) if leaf.ndim >= 2]
    for shape in stacked:
        assert f"f32[{','.join(map(str, shape))}]" not in hlo, shape
    # The other way round (plain scan where the bit-pattern one runs, and back): same bits.
    default = layers.cpu_upcasts_half_floats()
    monkeypatch.setattr(layers, "cpu_upcasts_half_floats", lambda: not default)
    flipped = jax.jit(lambda params, inputs: family.forward(params, config, **inputs).logits)
    np.testing.assert_array_equal(np.asarray(flipped(params, inputs), np.float32),
                                  np.asarray(forward(params, inputs), np.float32))
