"""Interventions and training mode (core tier): `patch=` at any tap, `train=True` dropout.

Per family, on a golden checkpoint (float64, so "bit for bit" means bit for bit):
- the identity patch (a function, and the value itself as an array) equals no patch exactly;
- zeroing a layer's MLP output makes that layer's output equal its post-attention residual;
- activation patching: every tap of run A patched into run B reproduces run A;
- patched taps are what `taps=True` returns, and everything downstream sees them;
- an unknown name is an error listing near matches; jit, vmap and grad work through a patch;
- train=False is free (no random ops in the jaxpr) and equal to eval; train=True drops
  at the stated rate, scales kept entries by 1 / (1 - p), depends on the key only, and a
  call's recorded masks replayed as `dropout_masks` reproduce it exactly, jitted or not.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN, golden_inputs
from refjax import arcee, gpt2, ibert, mega, nn, roformer
from refjax.params.checkpoint import load_checkpoint
from refjax.probe import masks_from_taps, stacked

# family -> (module, golden case, the per-layer stack name, MLP output tap, post-attention
# residual tap, config changes that give every dropout site of the case a rate > 0)
FAMILIES = {
    "gpt2": (gpt2, "gpt2/lm", "h", "mlp.c_proj", "resid_attn", {}),
    "arcee": (arcee, "arcee/causal-lm", "layers", "mlp.down_proj", "resid_attn", {"attention_dropout": 0.2}),
    "roformer": (roformer, "roformer/mlm", "encoder.layer", "output.dense", "attention.output.LayerNorm", {}),
    "ibert": (ibert, "ibert/mlm", "encoder.layer", "output.dense", "pre_intermediate_act",
              {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.25}),
    # MEGA: "nffn" is HF's whole nffn module, x + drop(fc2(...)); its branch has no tap of its own
    "mega": (mega, "mega/causal-lm", "layers", "nffn", "mega_layer", {}),
}
# post-LayerNorm families: a layer's output is LayerNorm(residual + MLP), so zeroing the MLP
# leaves LayerNorm(residual): family -> (the layer's output LayerNorm params, stacked [L, ...];
# the tap of the sum residual + MLP, or None)
POST_LN = {
    "roformer": (lambda params: params.roformer.encoder.layer.output.LayerNorm, None),
    "ibert": (lambda params: params.ibert.layer.output.LayerNorm, "output.ln_input_act"),
}
# MEGA's residuals live inside HF's modules (mega_layer and nffn each return x + branch):
# zeroing "nffn" zeroes the layer; tests/test_interventions_mega.py states what does hold
RESIDUAL_INSIDE = {"mega"}
# The numeric-gradient check's tolerance where it is not 1e-6: MEGA's EMA runs its FFT in
# float32 even in float64 models (as HF), forward and backward; measured 3e-5 to 5e-5 relative
# for central differences of step 1e-6 to 1e-4
GRAD_RTOL = {"mega": 1e-4}
# An array in place of a value that feeds a LayerNorm's residual sum changes how XLA:CPU fuses
# that norm (its reductions): measured on RoFormer's output.dense, 4e-15 on the logits. A
# function in its place keeps the program and stays bit for bit; the array is equal to 1e-12.
ARRAY_PATCH_REFUSES_NORM = {"roformer"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    module, case, stack, mlp_out, resid, rates = FAMILIES[request.param]
    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float64)
    ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, **rates))
    inputs = {k: jnp.asarray(v) for k, v in golden_inputs(case).items()}
    return dataclasses.make_dataclass("F", "name module ckpt inputs stack mlp_out resid".split())(
        request.param, module, ckpt, inputs, stack, mlp_out, resid)


def run(f, **kw):
    return f.module.forward(f.ckpt.params, f.ckpt.config, **f.inputs, **kw)


def n_layers(f) -> int:
    return int(jax.tree_util.tree_leaves(run(f, taps=True).taps[f.stack])[0].shape[0])


def test_identity_patches_change_nothing(family):
    base = run(family, taps=True)
    name = f"{family.stack}.{{i}}.{family.mlp_out}"
    for patch in ({name: lambda a: a}, {name: base.taps[f"{family.stack}.{family.mlp_out}"]}):
        out = run(family, taps=True, patch=patch)
        if family.name in ARRAY_PATCH_REFUSES_NORM and not callable(patch[name]):
            for tap in base.taps:
                np.testing.assert_allclose(np.asarray(out.taps[tap]), np.asarray(base.taps[tap]), rtol=1e-12,
                                           atol=1e-12, err_msg=tap)
            np.testing.assert_allclose(np.asarray(out.logits), np.asarray(base.logits), rtol=1e-12, atol=1e-12)
            continue
        np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(base.logits))
        for tap in base.taps:
            np.testing.assert_array_equal(np.asarray(out.taps[tap]), np.asarray(base.taps[tap]), err_msg=tap)


def test_zeroed_mlp_leaves_the_attention_residual(family):
    if family.name in POST_LN:
        pytest.skip("post-LN: test_zeroed_mlp_leaves_layernorm_of_the_residual")
    if family.name in RESIDUAL_INSIDE:
        pytest.skip(f"residual inside the MLP module: tests/test_interventions_{family.name}.py")
    layer = n_layers(family) - 1
    out = run(family, taps=True, patch={f"{family.stack}.{layer}.{family.mlp_out}": lambda a: jnp.zeros_like(a)})
    stack_out, resid = out.taps[family.stack][layer], out.taps[f"{family.stack}.{family.resid}"][layer]
    np.testing.assert_array_equal(np.asarray(stack_out), np.asarray(resid))
    assert not np.any(np.asarray(out.taps[f"{family.stack}.{family.mlp_out}"][layer]))  # the patched tap is returned
    base = run(family, taps=True)  # earlier layers untouched, downstream changed
    np.testing.assert_array_equal(np.asarray(out.taps[family.stack][:layer]), np.asarray(base.taps[family.stack][:layer]))
    assert not np.allclose(np.asarray(out.logits), np.asarray(base.logits))


@pytest.mark.parametrize("layer", [0, 1])
def test_zeroed_mlp_leaves_layernorm_of_the_residual(family, layer):
    """Post-LN (RoFormer, I-BERT float mode): with the MLP output zeroed, the layer's sum is the
    residual exactly and the layer's output is its output LayerNorm of the residual, computed
    outside the layer scan (XLA may round the norm differently: 1e-13 relative)."""
    if family.name not in POST_LN:
        pytest.skip("pre-LN: test_zeroed_mlp_leaves_the_attention_residual")
    norm_params, sum_tap = POST_LN[family.name]
    out = run(family, taps=True, patch={f"{family.stack}.{layer}.{family.mlp_out}": jnp.zeros_like})
    resid = np.asarray(out.taps[f"{family.stack}.{family.resid}"][layer])
    if sum_tap is not None:
        np.testing.assert_array_equal(np.asarray(out.taps[f"{family.stack}.{sum_tap}"][layer]), resid)
    norm = jax.tree.map(lambda a: a[layer], norm_params(family.ckpt.params))
    expected = nn.layer_norm(norm, jnp.asarray(resid), family.ckpt.config.layer_norm_eps)
    np.testing.assert_allclose(np.asarray(out.taps[family.stack][layer]), np.asarray(expected), rtol=1e-13, atol=1e-13)
    assert not np.any(np.asarray(out.taps[f"{family.stack}.{family.mlp_out}"][layer]))  # the patched tap is returned
    base = run(family, taps=True)
    np.testing.assert_array_equal(np.asarray(out.taps[family.stack][:layer]), np.asarray(base.taps[family.stack][:layer]))
    assert not np.allclose(np.asarray(out.logits), np.asarray(base.logits))


def test_activation_patching_reproduces_the_source_run(family):
    """Run A (other token ids) patched into run B at one layer's output reproduces A from
    there on: every later tap and the logits equal A's."""
    a_inputs = dict(family.inputs, input_ids=(family.inputs["input_ids"] + 7) % family.ckpt.config.vocab_size)
    a = family.module.forward(family.ckpt.params, family.ckpt.config, **a_inputs, taps=True)
    layer = 0
    patched = run(family, taps=True, patch={f"{family.stack}.{layer}": a.taps[family.stack][layer]})
    np.testing.assert_array_equal(np.asarray(patched.taps[family.stack][layer:]), np.asarray(a.taps[family.stack][layer:]))
    np.testing.assert_array_equal(np.asarray(patched.logits), np.asarray(a.logits))


def test_unknown_patch_name_lists_near_matches(family):
    name = f"{family.stack}.0.{family.mlp_out}x"
    with pytest.raises(ValueError, match=rf"not a {family.name} site; nearest: .*{family.stack}\.0\.{family.mlp_out}"):
        run(family, patch={name: lambda a: a})
    with pytest.raises(ValueError, match=r"layer 99 does not exist"):
        run(family, patch={f"{family.stack}.99.{family.mlp_out}": lambda a: a})


def test_patch_under_jit_vmap_and_grad(family):
    params, config = family.ckpt.params, family.ckpt.config
    name = f"{family.stack}.{{i}}.{family.mlp_out}"

    def logits(params, ids, scale):
        return family.module.forward(params, config, ids, patch={name: lambda a: a * scale}).logits

    ids = family.inputs["input_ids"]
    eager = logits(params, ids, 0.5)
    np.testing.assert_allclose(np.asarray(jax.jit(logits)(params, ids, 0.5)), np.asarray(eager), rtol=1e-12, atol=1e-12)
    batched = jax.vmap(lambda s: logits(params, ids, s))(jnp.asarray([0.5, 1.0]))
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(eager), rtol=1e-12, atol=1e-12)
    grad = jax.grad(lambda s: logits(params, ids, s).sum())(0.5)
    step = 1e-6
    numeric = (logits(params, ids, 0.5 + step).sum() - logits(params, ids, 0.5 - step).sum()) / (2 * step)
    np.testing.assert_allclose(float(grad), float(numeric), rtol=GRAD_RTOL.get(family.name, 1e-6))


# ---------------------------------------------------------------------------------------
# Training mode
# ---------------------------------------------------------------------------------------


def test_train_off_is_free_and_equals_eval(family):
    params, config = family.ckpt.params, family.ckpt.config
    ids = family.inputs["input_ids"]
    jaxpr = str(jax.make_jaxpr(lambda p: family.module.forward(p, config, ids).logits)(params))
    assert "random" not in jaxpr and "threefry" not in jaxpr
    np.testing.assert_array_equal(np.asarray(run(family, train=False, key=jax.random.key(0)).logits),
                                  np.asarray(run(family).logits))


def test_train_needs_a_key_or_masks(family):
    with pytest.raises(ValueError, match="train=True needs a PRNG key"):
        run(family, train=True)
    with pytest.raises(ValueError, match="fast=True"):
        run(family, train=True, key=jax.random.key(0), fast=True)


def test_dropout_rate_scale_and_keys(family):
    """Every site drops about its rate (binomial 5 sigma over all its entries), kept
    entries are scaled by exactly 1 / (1 - p), and the masks depend on the key only."""
    out = run(family, train=True, key=jax.random.key(1), taps=True)
    again = run(family, train=True, key=jax.random.key(1), taps=True)
    other = run(family, train=True, key=jax.random.key(2), taps=True)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(again.logits))
    assert not np.allclose(np.asarray(out.logits), np.asarray(other.logits))
    sites = [name for name in out.taps if out.taps[name].dtype == jnp.bool_]
    assert sites, "train=True with taps=True records each keep-mask"
    config = family.ckpt.config
    rates = {stacked(site): rate(config) for site, rate in family.module.DROPOUT.items()}
    for site in sites:
        keep = np.asarray(out.taps[site])
        p = rates[site.removesuffix(".keep")]  # ".keep": a site that is also a tap's name
        n = keep.size
        assert abs((1 - keep.mean()) - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12, (site, keep.mean(), p)
        assert not np.array_equal(keep, np.asarray(other.taps[site])) or n < 8, site


def test_dropout_scaling_is_inverted(family):
    """At one site: kept entries are the eval values / (1 - p), dropped ones are 0."""
    f = family
    site = "drop" if f.name == "gpt2" else None
    if site is None:
        pytest.skip("scaling checked on GPT-2's embedding dropout")
    base = run(f, taps=True)
    out = run(f, train=True, key=jax.random.key(3), taps=True)
    keep = np.asarray(out.taps["drop.keep"])  # "drop" is both a tap (the value) and a site (the mask)
    assert keep.dtype == bool
    p = f.ckpt.config.embd_pdrop
    expected = np.where(keep, np.asarray(base.taps["drop"]) / (1 - p), 0.0)
    np.testing.assert_allclose(np.asarray(out.taps["drop"]), expected, rtol=1e-15, atol=0)


def test_recorded_masks_replay_exactly(family):
    """A call's recorded masks, given back as dropout_masks, are used exactly (recorded again
    bit for bit) and reproduce its outputs to 1e-12: the layer scan is compiled even in an
    eager call, and a program that draws masks and one that reads them are fused
    differently by XLA (fp64 reassociation, not a different mask)."""
    params, config = family.ckpt.params, family.ckpt.config
    out = run(family, train=True, key=jax.random.key(4), taps=True)
    masks = masks_from_taps(out.taps, family.module.DROPOUT)
    assert masks
    replay = run(family, train=True, dropout_masks=masks, taps=True)
    for site, keep in masks_from_taps(replay.taps, family.module.DROPOUT).items():
        np.testing.assert_array_equal(np.asarray(keep), np.asarray(masks[site]), err_msg=site)
    np.testing.assert_allclose(np.asarray(replay.logits), np.asarray(out.logits), rtol=1e-12, atol=1e-12)

    def logits(params, **kw):
        return family.module.forward(params, config, **family.inputs, train=True, **kw).logits

    with_key = jax.jit(lambda p: logits(p, key=jax.random.key(4)))(params)
    with_masks = jax.jit(lambda p: logits(p, dropout_masks=masks))(params)
    np.testing.assert_allclose(np.asarray(with_masks), np.asarray(with_key), rtol=1e-12, atol=1e-12)


# RoFormer's and I-BERT's classification heads call one HF dropout module twice.
TWO_CALL_HEADS = {"roformer": ("roformer/seqcls-single", {"hidden_dropout_prob": 0.3}),
                  "ibert": ("ibert/seqcls", {"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.1})}


@pytest.mark.parametrize("name", sorted(TWO_CALL_HEADS))
def test_classification_head_draws_two_masks_from_one_module(name):
    """HF's classification head calls `self.dropout` twice: two independent masks, recorded
    stacked [2, B, D] and replayed as "classifier.dropout.{i}" (or one call by number)."""
    from refjax import ibert, roformer

    module = {"roformer": roformer, "ibert": ibert}[name]
    case, rates = TWO_CALL_HEADS[name]
    ckpt = load_checkpoint(os.path.join(GOLDEN, case), dtype=jnp.float64)
    ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, **rates))
    inputs = {k: jnp.asarray(v) for k, v in golden_inputs(case, ("input_ids", "attention_mask", "token_type_ids")).items()}

    def run(**kw):
        return module.forward(ckpt.params, ckpt.config, **inputs, taps=True, train=True, **kw)

    out = run(key=jax.random.key(1))
    keep = np.asarray(out.taps["classifier.dropout"])
    B, D = inputs["input_ids"].shape[0], ckpt.config.hidden_size
    assert keep.shape == (2, B, D) and not np.array_equal(keep[0], keep[1])
    masks = masks_from_taps(out.taps, module.DROPOUT)
    assert set(masks) == {"embeddings.dropout", "encoder.layer.{i}.attention.self.dropout",
                          "encoder.layer.{i}.attention.output.dropout", "encoder.layer.{i}.output.dropout",
                          "classifier.dropout.{i}"}
    replay = run(dropout_masks=masks)
    np.testing.assert_array_equal(np.asarray(replay.taps["classifier.dropout"]), keep)
    np.testing.assert_allclose(np.asarray(replay.logits), np.asarray(out.logits), rtol=1e-12, atol=1e-12)
    # one call by number: keep everything in call 0 and the rest of the masks as recorded
    again = run(dropout_masks=dict(masks, **{"classifier.dropout.0": np.ones((B, D), bool)}))
    np.testing.assert_array_equal(np.asarray(again.taps["classifier.dropout"][0]), np.ones((B, D), bool))
    np.testing.assert_array_equal(np.asarray(again.taps["classifier.dropout"][1]), keep[1])
