"""Reference tier: HF's training mode, with the same dropout masks on both sides.

refjax runs `forward(..., train=True, key=k, taps=True)`, which records the keep-mask of
every dropout site it used; those masks replace HF's `nn.Dropout` modules (one module per
site and layer, `MaskDropout`), HF runs in `train()` mode, and the outputs, the loss and
the gradient of the loss w.r.t. every parameter must agree: HF autograd against `jax.grad`
of refjax replaying the masks (`dropout_masks=`). float64; tolerance 1e-10 relative to
each tensor's scale (the two sides sum in different orders), as the live tier's TOL;
Arcee 1e-5, because HF computes its norms, RoPE and softmax in float32 even then.

Runs only with the `reference` extra (torch + transformers).
"""

from __future__ import annotations

import contextlib
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference tier needs the `reference` extra (torch + transformers)")
transformers = pytest.importorskip(
    "transformers", reason="reference tier needs the `reference` extra (torch + transformers)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hf_helpers import TOL, assert_close, quiet_torch, reinit_, scaled_error  # noqa: E402
from refjax import arcee, gpt2  # noqa: E402
from refjax.params import io  # noqa: E402
from refjax.params.checkpoint import FAMILIES as PARAM_FAMILIES, load_checkpoint  # noqa: E402
from refjax.probe import LAYER, masks_from_taps  # noqa: E402

pytestmark = pytest.mark.reference


class MaskDropout(torch.nn.Module):
    """An nn.Dropout whose mask is given: x * keep / (1 - p), as torch's dropout scales."""

    def __init__(self, keep: np.ndarray, p: float):
        super().__init__()
        self.keep = torch.from_numpy(np.array(keep, dtype=bool))
        self.p = p

    def forward(self, x):
        return x * self.keep.to(x.dtype) * (1.0 / (1.0 - self.p))


@contextlib.contextmanager
def functional_masks(keeps: list, p: float):
    """HF's functional dropout (Llama-style attention: `nn.functional.dropout(w, p, training)`)
    with given masks, one per call in call order (layer 0, 1, ...)."""
    original = torch.nn.functional.dropout
    calls = iter(keeps)

    def dropout(x, p_=0.5, training=True, inplace=False, **kw):
        p_ = kw.get("p", p_)
        if not training or p_ == 0.0:
            return x
        assert p_ == p, (p_, p)
        keep = torch.from_numpy(np.array(next(calls), dtype=bool))
        return x * keep.to(x.dtype) * (1.0 / (1.0 - p))

    torch.nn.functional.dropout = dropout
    try:
        yield
    finally:
        torch.nn.functional.dropout = original


def inject_masks(model, masks: dict, rates: dict, base_prefix: str) -> int:
    """Replace every dropout module a refjax site names with a MaskDropout of that site's
    mask (per-layer sites: mask[i] for layer i). Returns how many modules were replaced."""
    replaced = 0
    for site, keep in masks.items():
        keep = np.asarray(keep)
        layers = range(keep.shape[0]) if LAYER in site else [None]
        for i in layers:
            name = site.replace(LAYER, str(i)) if i is not None else site
            for path in (base_prefix + name, name):
                try:
                    model.get_submodule(path)
                except AttributeError:
                    continue
                parent, _, child = path.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                assert isinstance(getattr(owner, child), torch.nn.Dropout), path
                setattr(owner, child, MaskDropout(keep[i] if i is not None else keep, rates[site]))
                replaced += 1
                break
            else:
                raise AssertionError(f"no HF module for site {name}")
    return replaced


GPT2_CONFIG = dict(vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=2, embd_pdrop=0.3, attn_pdrop=0.25,
                   resid_pdrop=0.2, summary_first_dropout=0.35, summary_last_dropout=0.15, classifier_dropout=0.4,
                   num_labels=3, pad_token_id=0)

ARCEE_CONFIG = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.3, classifier_dropout=0.25,
                    num_labels=3, pad_token_id=0, hidden_act="relu2")

# Each case: (family module, HF class, config kwargs, base prefix, functional dropout site or None)
CASES = {
    "gpt2-lm": (gpt2, "GPT2LMHeadModel", GPT2_CONFIG, "transformer.", None),
    "gpt2-tokcls": (gpt2, "GPT2ForTokenClassification", GPT2_CONFIG, "transformer.", None),
    "gpt2-double-heads": (gpt2, "GPT2DoubleHeadsModel", dict(GPT2_CONFIG, summary_activation="tanh"), "transformer.",
                          None),
    "arcee-lm": (arcee, "ArceeForCausalLM", ARCEE_CONFIG, "model.", "layers.{i}.self_attn.attention_dropout"),
    "arcee-tokcls": (arcee, "ArceeForTokenClassification", ARCEE_CONFIG, "model.",
                     "layers.{i}.self_attn.attention_dropout"),
}


def make_inputs(arch: str, config: dict, rng) -> dict[str, np.ndarray]:
    B, T = 2, 7
    if arch == "GPT2DoubleHeadsModel":
        C = 3
        ids = rng.integers(1, config["vocab_size"], (B, C, T))
        return dict(input_ids=ids, mc_token_ids=rng.integers(0, T, (B, C)), labels=ids,
                    mc_labels=rng.integers(0, C, (B,)))
    ids = rng.integers(1, config["vocab_size"], (B, T))
    mask = np.ones((B, T), np.int64)
    if arch.startswith("Arcee"):  # right padding: HF's fp64 Arcee turns a fully padded query row
        mask[1, -2:] = 0          # into NaN (fp32 softmax of an fp64 mask, docs/design.md)
    else:  # left padding: pad queries see no real key, and HF's gradient reaches their scores
        mask[1, :2] = 0
    labels = ids if arch.endswith(("LMHeadModel", "CausalLM")) else rng.integers(0, config["num_labels"], (B, T))
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_mode_matches_hf_with_the_same_masks(case):
    module, arch, config_kwargs, base_prefix, functional_site = CASES[case]
    # HF's float64 Arcee still runs RMSNorm, RoPE and softmax in float32 (docs/design.md):
    # compared at float32 tolerance; GPT-2 is float64 throughout.
    tol = TOL["float32"] if arch.startswith("Arcee") else TOL["float64"]
    rng = np.random.default_rng(0)
    with quiet_torch():
        torch.manual_seed(0)
        hf_config = getattr(transformers, arch).config_class(**config_kwargs)
        model = getattr(transformers, arch)._from_config(hf_config, attn_implementation="eager").double()
        reinit_(model, 0)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            ckpt = load_checkpoint(d, dtype=jnp.float64)
        inputs = make_inputs(arch, config_kwargs, rng)
        arrays = {k: jnp.asarray(v, jnp.int32) for k, v in inputs.items()}
        ours = module.forward(ckpt.params, ckpt.config, **arrays, train=True, key=jax.random.key(0), taps=True)
        masks = masks_from_taps(ours.taps, module.DROPOUT)
        rates = {site: rate(ckpt.config) for site, rate in module.DROPOUT.items()}
        functional = masks.pop(functional_site) if functional_site else np.zeros((0,))
        assert inject_masks(model, masks, rates, base_prefix) >= len(masks)
        model.train()
        # HF's causal-LM loss runs `logits.float()` (an fp64 model's loss in fp32, see
        # docs/design.md); the same shifted cross-entropy is computed here in fp64 instead.
        causal = arch.endswith(("LMHeadModel", "CausalLM"))
        hf_inputs = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items() if not (causal and k == "labels")}
        with functional_masks(list(functional), rates.get(functional_site, 0.0)):
            out = model(**hf_inputs, return_dict=True)
        if causal:
            logits, labels = out.logits, torch.from_numpy(np.array(inputs["labels"]))
            out.loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         labels[:, 1:].reshape(-1))
        losses = [n for n in ("loss", "mc_loss") if getattr(out, n, None) is not None]
        assert losses
        sum(getattr(out, n) for n in losses).backward()

    for field in ("logits", "mc_logits", "loss", "mc_loss"):
        theirs = getattr(out, field, None)
        if theirs is not None:
            assert_close(field, np.asarray(getattr(ours, field)), theirs.detach().numpy(), tol)

    if functional_site:
        masks[functional_site] = functional

    def loss(params):
        o = module.forward(params, ckpt.config, **arrays, train=True, dropout_masks=masks)
        return sum(getattr(o, n) for n in losses)

    grads = jax.grad(loss)(ckpt.params)
    ours_named = io.tensors_from_tree(grads, PARAM_FAMILIES[ckpt.family].module.name_rules(ckpt.config))
    theirs_named = {n: p.grad.detach().numpy() for n, p in model.named_parameters() if p.grad is not None}
    errors = {}
    for name, g in ours_named.items():
        hf_name = name if name in theirs_named else base_prefix + name
        if hf_name not in theirs_named:
            continue
        errors[name] = scaled_error(np.asarray(g), theirs_named[hf_name])
    assert len(errors) == len(ours_named), sorted(set(ours_named) - set(errors))
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"gradients differ (scaled error > {tol}): {bad}"
