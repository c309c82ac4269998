"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

Mirrors HF `transformers/models/gpt2/modeling_gpt2.py` with `attn_implementation="eager"`
(the only HF path that honours `scale_attn_by_inverse_layer_idx` and
`reorder_and_upcast_attn`). Pre-LayerNorm blocks, a final LayerNorm:

    x = wte(ids) + wpe(pos);   x = x + attn(ln_1(x));   x = x + mlp(ln_2(x));   ln_f(x)

The math core reads top to bottom: embed -> attention -> mlp -> block -> model; then the
HF classes (heads) as data, and `forward`. Shapes: B batch, T new tokens, S key slots,
D = n_embd, F = inner_dim, N heads, H head_dim, V vocab, L layers (ref/nn.py).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from refjax import attention as attn_lib
from refjax import cache as cache_lib
from refjax import heads, layers, nn, shell
from refjax.attention import Mask
from refjax.cache import KVCache, LayerKV
from refjax.layers import LayerOut
from refjax.probe import OFF, Probe
from refjax.params.common import Embedding
from refjax.params.gpt2 import GPT2Config
from refjax.params.gpt2 import GPT2MLP, GPT2Attention, GPT2Block, GPT2Body, GPT2Params
from refjax.shell import Body, Head, Tokens


def embed(wte: Embedding, wpe: Embedding, config: GPT2Config, tokens: Tokens, position_ids: Int[Array, "B T"],
          probe: Probe = OFF) -> Float[Array, "B T D"]:
    """drop(wte(input_ids) + wpe(position_ids) [+ wte(token_type_ids)]): GPT-2 has no
    token-type table, HF embeds token types with the *word* embedding."""
    words = probe("wte", nn.embed(wte, tokens.input_ids) if tokens.inputs_embeds is None else tokens.inputs_embeds)
    x = words + probe("wpe", nn.embed(wpe, position_ids))
    if tokens.token_type_ids is not None:
        x = x + nn.embed(wte, tokens.token_type_ids)
    return probe("drop", probe.dropout("drop", x, config.embd_pdrop))


def attention(p: GPT2Attention, config: GPT2Config, x: Float[Array, "B T D"], mask: Mask, layer_idx: Int[Array, ""],
              probe: Probe = OFF, kv: LayerKV | None = None, fast: bool = False) -> LayerOut:
    """Causal self-attention (HF `GPT2Attention`, eager): softmax(q k^T / sqrt(H) [/ (layer_idx + 1)]) v.

    `reorder_and_upcast_attn` computes scores and softmax in fp32 (we use max(dtype, fp32):
    HF *downcasts* an fp64 model there, see docs/design.md). With a cache, this call's
    k, v are written at `mask.start` and the queries attend over every slot."""
    B, T, D = x.shape
    N, H = config.n_head, config.head_dim
    qkv = probe("attn.c_attn", nn.linear(p.c_attn, x))  # [B, T, 3D]
    q, k, v = (probe(f"attn.{name}", t.reshape(B, T, N, H))  # [B, T, N, H]; this call's k, v (before any cache)
               for name, t in zip("qkv", jnp.split(qkv, 3, axis=-1)))
    if kv is not None:
        kv = cache_lib.write_layer(kv, k, v, mask.start)
        k, v = kv  # [B, S, N, H]
    scale = 1.0 / math.sqrt(H) if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale = scale / (layer_idx + 1).astype(x.dtype)
    if fast:  # jax.nn.dot_product_attention; no probabilities (ref/attention.py)
        context, probs = attn_lib.fast_attention(q, k, v, mask.key_valid, mask.causal, scale), None
    else:
        score_dtype = nn.accum_dtype(x.dtype) if config.reorder_and_upcast_attn else None
        # a v5-written config: one finfo.min mask for pad and future keys (params/gpt2.py: future_fill);
        # unfilled cache slots then need their own -inf (`filled`), as for Arcee
        v5_mask = config.future_fill == attn_lib.FUTURE_FINFO_MIN
        context, probs, _ = attn_lib.softmax_attention(
            q, k, v, mask.key_valid, mask.causal, scale, score_dtype, future_fill=config.future_fill,
            filled=mask.filled if v5_mask else None, scores_hook=lambda s: probe("attn.scores", s),
            probs_hook=lambda w: probe("attn.probs", probe.dropout("attn.attn_dropout", w, config.attn_pdrop)))
    context = probe("attn.context", context)
    out = probe("attn.c_proj", nn.linear(p.c_proj, context.reshape(B, T, D)))
    return LayerOut(probe.dropout("attn.resid_dropout", out, config.resid_pdrop), probs, kv)


def mlp(p: GPT2MLP, config: GPT2Config, x: Float[Array, "B T D"], probe: Probe = OFF) -> Float[Array, "B T D"]:
    """dropout(c_proj(act(c_fc(x)))) (HF `GPT2MLP`)."""
    h = probe("mlp.c_fc", nn.linear(p.c_fc, x))  # [B, T, F]
    a = probe("mlp.act", nn.ACT2FN[config.activation_function](h))
    out = probe("mlp.c_proj", nn.linear(p.c_proj, a))
    return probe.dropout("mlp.dropout", out, config.resid_pdrop)


def block(p: GPT2Block, config: GPT2Config, x: Float[Array, "B T D"], mask: Mask, layer_idx: Int[Array, ""],
          probe: Probe = OFF, kv: LayerKV | None = None, fast: bool = False) -> LayerOut:
    """HF `GPT2Block` (pre-LN); p holds ONE layer's params (the scan slices the stack), and
    `probe` is this layer's (`probe.layer`): "" names the block's own output (HF `h.{i}`),
    "resid_attn" the residual stream between attention and MLP."""
    h1 = probe("ln_1", nn.layer_norm(p.ln_1, x, config.layer_norm_epsilon))
    a = attention(p.attn, config, h1, mask, layer_idx, probe, kv, fast)
    x = probe("resid_attn", x + a.x)
    h2 = probe("ln_2", nn.layer_norm(p.ln_2, x, config.layer_norm_epsilon))
    out = probe("", x + mlp(p.mlp, config, h2, probe))
    return LayerOut(out, a.probs, a.kv, probe.recorded)


def model(p: GPT2Body, config: GPT2Config, tokens: Tokens, cache: KVCache | None = None, *,
          probe: Probe = OFF, fast: bool = False, remat: bool = False) -> Body:
    """HF `GPT2Model`. Positions default to the slot numbers: 0..T-1 without a cache (HF
    does *not* derive them from the mask), cache.length.. with one; with a cache,
    attention_mask covers only the new tokens. `probe` (ref/probe.py): taps, patches and
    dropout of this call (default: none of them)."""
    B, T = tokens.shape
    mask = attn_lib.mask_for(tokens.attention_mask, B, T, cache)
    position_ids = jnp.broadcast_to(mask.slots, (B, T)) if tokens.position_ids is None else tokens.position_ids
    x = embed(p.wte, p.wpe, config, tokens, position_ids, probe)  # [B, T, D]
    stack = layers.run_stack(lambda layer, i, x, kv: block(layer, config, x, mask, i, probe.layer("h", i), kv, fast),
                             x, p.h, None if cache is None else cache.layers, remat=remat, taps=probe.taps)
    last = probe("ln_f", nn.layer_norm(p.ln_f, stack.x, config.layer_norm_epsilon))
    return Body(last_hidden_state=last, hidden_states=layers.hidden_states(stack, last), attentions=stack.attentions,
                cache=None if cache is None else cache_lib.updated(cache, stack.kv, mask.key_valid, T),
                taps={**probe.recorded, **layers.prefixed_taps("h", stack.taps)} if probe.taps else None)


# Every tap `forward(..., taps=True)` returns, in dataflow order, as `refjax forward --taps`
# writes it ({i} = layer index). The taps dict stacks per-layer taps [L, ...] under the name
# without ".{i}" ("h.attn.q"; the block outputs under "h"). Names are HF module paths where
# a module exists, so PyTorch hooks on the same names see the same tensors (docs/taps.md).
TAPS = ("wte", "wpe", "drop",
        "h.{i}.ln_1", "h.{i}.attn.c_attn", "h.{i}.attn.q", "h.{i}.attn.k", "h.{i}.attn.v", "h.{i}.attn.scores",
        "h.{i}.attn.probs", "h.{i}.attn.context", "h.{i}.attn.c_proj", "h.{i}.resid_attn", "h.{i}.ln_2",
        "h.{i}.mlp.c_fc", "h.{i}.mlp.act", "h.{i}.mlp.c_proj", "h.{i}",
        "ln_f")


# HF's nn.Dropout modules (HF module paths: the base model's, then the heads'), the sites of
# `forward(..., train=True)`, with the config rate each one uses.
DROPOUT = {
    "drop": lambda c: c.embd_pdrop,
    "h.{i}.attn.attn_dropout": lambda c: c.attn_pdrop,
    "h.{i}.attn.resid_dropout": lambda c: c.resid_pdrop,
    "h.{i}.mlp.dropout": lambda c: c.resid_pdrop,
    "multiple_choice_head.first_dropout": lambda c: c.summary_first_dropout,  # GPT2DoubleHeadsModel
    "multiple_choice_head.last_dropout": lambda c: c.summary_last_dropout,
    "dropout": lambda c: 0.1 if c.classifier_dropout is None else c.classifier_dropout,  # token classification
}


# ---------------------------------------------------------------------------------------
# HF classes: GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2For{Sequence,Token}Classification,
# GPT2ForQuestionAnswering (the shared ones live in ref/heads.py)
# ---------------------------------------------------------------------------------------


def lm_logits(params: GPT2Params, config: GPT2Config, hidden, batch, probe: Probe) -> dict:
    """The LM head: untied, or tied to wte [V, D]. -> logits [..., T, V]"""
    return {"logits": heads.lm_logits(params.lm_head, params.transformer.wte.table, hidden)}


def double_heads(params: GPT2Params, config: GPT2Config, hidden, batch, probe: Probe) -> dict:
    """HF `GPT2DoubleHeadsModel`: LM logits [B, C, T, V] and one multiple-choice score per
    choice from `GPT2SequenceSummary` at mc_token_ids ([B, C]; squeezed as HF does)."""
    mc_logits = heads.sequence_summary(
        params.multiple_choice_head, hidden, batch.inputs["mc_token_ids"], config.summary_type,
        config.summary_activation,
        first_dropout=lambda x: probe.dropout("multiple_choice_head.first_dropout", x, config.summary_first_dropout),
        last_dropout=lambda x: probe.dropout("multiple_choice_head.last_dropout", x, config.summary_last_dropout))
    if mc_logits.shape[-1] == 1:  # HF `.squeeze(-1)`
        mc_logits = mc_logits[..., 0]
    return {**lm_logits(params, config, hidden, batch, probe), "mc_logits": mc_logits}


def check_double_heads(config: GPT2Config, batch) -> None:
    from refjax.validate import check_labels

    shape, mc_labels = batch.shape, batch.inputs["mc_labels"]
    check_labels(batch.inputs["mc_token_ids"], "mc_token_ids", shape[:-1], shape[-1], "sequence length")
    check_labels(mc_labels, "mc_labels", shape[:1], batch.choices, "choices")
    width = config.summary_size if config.summary_use_proj else config.n_embd
    if mc_labels is not None and width != 1:  # HF fails here too, with a shape error
        raise ValueError(f"mc_labels need one logit per choice, but this config's summary gives {width} "
                         f"(summary_use_proj={config.summary_use_proj}, "
                         f"summary_proj_to_labels={config.summary_proj_to_labels})")


def sequence_classification(params: GPT2Params, config: GPT2Config, hidden, batch, probe: Probe) -> dict:
    """Score every token, keep the last non-pad one (HF `GPT2ForSequenceClassification`)."""
    return {"logits": heads.last_token_scores(params.score, hidden, batch.tokens.input_ids, config.pad_token_id)}


def token_classification(params: GPT2Params, config: GPT2Config, hidden, batch, probe: Probe) -> dict:
    """classifier(dropout(h)) [B, T, num_labels]; HF's rate: classifier_dropout, else 0.1."""
    return {"logits": nn.linear(params.classifier, probe.dropout("dropout", hidden, DROPOUT["dropout"](config)))}


def question_answering(params: GPT2Params, config: GPT2Config, hidden, batch, probe: Probe) -> dict:
    return heads.span_logits(params.qa_outputs, hidden)  # start_logits, end_logits [B, T]


CLASSES = shell.Classes(
    family="gpt2",
    heads={
        "GPT2Model": Head("base"),
        "GPT2LMHeadModel": Head("causal_lm", lm_logits),
        "GPT2DoubleHeadsModel": Head("double_heads", double_heads, choices="optional", unflatten=True,
                                     check=check_double_heads),
        "GPT2ForSequenceClassification": Head("sequence", sequence_classification),
        "GPT2ForTokenClassification": Head("token", token_classification),
        "GPT2ForQuestionAnswering": Head("qa", question_answering),
    },
    inputs=("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
            "mc_token_ids", "mc_labels", "start_positions", "end_positions"),
    # GPT-2 embeds token types with the word table, so they index the vocabulary
    limits=lambda c: shell.Limits(embed_width=c.n_embd, positions=c.n_positions, positions_field="n_positions",
                                  type_vocab=c.vocab_size),
)


def forward(params: GPT2Params, config: GPT2Config, input_ids=None, attention_mask=None, *,
            cache: KVCache | None = None, output_hidden_states: bool = False, output_attentions: bool = False,
            taps: bool = False, patch=None, train: bool = False, key=None, dropout_masks=None, fast: bool = False,
            remat: bool = False, **inputs) -> heads.Output:
    """Any HF GPT-2 class, chosen by `config.architecture`; returns HF's output fields.

    inputs: HF's names, `token_type_ids`, `position_ids`, `inputs_embeds`, `labels`,
    `mc_token_ids`, `mc_labels`, `start_positions`, `end_positions` (lists, numpy or jax).
    GPT2DoubleHeadsModel takes input_ids [B, C, T] (C choices) and mc_token_ids [B, C];
    its logits are [B, C, T, V] and hidden states [L + 1, B, C, T, D], as HF reshapes them.
    `taps=True`: every named intermediate (TAPS); `patch={name: fn or array}` replaces one
    (ref/probe.py); `train=True` with `key` (or `dropout_masks` keyed by DROPOUT sites):
    HF's training-mode dropout. `fast=True`: `jax.nn.dot_product_attention` (equal on real
    tokens, tested; no attentions, taps, patches or dropout). `remat=True`: each layer
    recomputed in the backward pass.
    """
    batch = shell.prepare(CLASSES, config, dict(input_ids=input_ids, attention_mask=attention_mask, **inputs),
                          cache=cache, fast=fast, taps=taps, output_attentions=output_attentions,
                          patch=patch, train=train)
    probe = Probe.for_call("gpt2", TAPS + tuple(DROPOUT), config.n_layer, taps=taps, patch=patch, train=train, key=key,
                           masks=dropout_masks)
    body = model(params.transformer, config, batch.tokens, cache, probe=probe, fast=fast, remat=remat)
    return shell.finish(CLASSES, params, config, batch, body, output_hidden_states=output_hidden_states,
                        output_attentions=output_attentions, probe=probe)


def unstack_layers(params: GPT2Params) -> GPT2Params:
    """The same params with the layers as a tuple, for decoding (see ref/layers.py)."""
    return layers.unstack_at(params, lambda p: p.transformer.h)


def init_cache(config: GPT2Config, batch: int, max_length: int, dtype) -> KVCache:
    """An empty KV cache for `generate`: [L, B, max_length, N, H] keys and values."""
    return cache_lib.init_cache(config.n_layer, batch, max_length, config.n_head, config.head_dim, dtype)
