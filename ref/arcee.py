"""Arcee (AFM-4.5B, Arcee AI 2025): a Llama-style decoder with a ReLU² MLP and no gate.

Mirrors HF `transformers/models/arcee/modeling_arcee.py` (eager attention). Pre-RMSNorm
layers, rotary positions on q and k (ref/rotary.py: every HF `rope_scaling` type):

    x = x + o_proj(attn(rope(q), rope(k), v));   x = x + down_proj(act(up_proj(rms(x))));   norm(x)

Grouped-query attention: K = num_key_value_heads key/value heads serve N query heads
without repeating K/V in memory (ref/attention.py). Query scale 1/sqrt(H).
The math core reads top to bottom: attention -> mlp -> decoder_layer -> model; then the
HF classes (heads) as data, and `forward`. Shapes as in ref/nn.py.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from refjax import attention as attn_lib
from refjax import cache as cache_lib
from refjax import heads, layers, nn, rotary, shell
from refjax.attention import FUTURE_FINFO_MIN, Mask
from refjax.cache import KVCache, LayerKV
from refjax.layers import LayerOut
from refjax.probe import OFF, Probe
from refjax.params.arcee import ArceeAttention, ArceeBody, ArceeConfig, ArceeLayer, ArceeMLP, ArceeParams
from refjax.shell import Body, Head, Tokens


def attention(p: ArceeAttention, config: ArceeConfig, x: Float[Array, "B T D"], cos: Float[Array, "B T H"],
              sin: Float[Array, "B T H"], mask: Mask, probe: Probe = OFF, kv: LayerKV | None = None,
              fast: bool = False) -> LayerOut:
    """GQA self-attention with RoPE on q and k (HF `ArceeAttention`, eager). Rotated keys
    are what the cache holds, as in HF. HF's Llama-style mask is one additive finfo.min mask
    for pad and future keys alike (`FUTURE_FINFO_MIN`)."""
    B, T, _ = x.shape
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # projections in HF's module layout [B, T, heads * H]; rotated q, k and the context per head
    q = probe("self_attn.q_proj", nn.linear(p.q_proj, x)).reshape(B, T, N, H)
    k = probe("self_attn.k_proj", nn.linear(p.k_proj, x)).reshape(B, T, K, H)
    v = probe("self_attn.v_proj", nn.linear(p.v_proj, x)).reshape(B, T, K, H)
    q_rot = probe("self_attn.q_rot", rotary.apply_rotary(q, cos, sin))
    k_rot = probe("self_attn.k_rot", rotary.apply_rotary(k, cos, sin))
    keys, values = k_rot, v
    if kv is not None:
        kv = cache_lib.write_layer(kv, k_rot, v, mask.start)
        keys, values = kv  # [B, S, K, H]
    if fast:  # jax.nn.dot_product_attention; no probabilities (ref/attention.py)
        context, probs = attn_lib.fast_attention(q_rot, keys, values, mask.key_valid, mask.causal, H ** -0.5,
                                                 mask.filled), None
    else:
        context, probs, _ = attn_lib.softmax_attention(
            q_rot, keys, values, mask.key_valid, mask.causal, H ** -0.5, future_fill=FUTURE_FINFO_MIN,
            filled=mask.filled, scores_hook=lambda s: probe("self_attn.scores", s),
            probs_hook=lambda w: probe("self_attn.probs", probe.dropout("self_attn.attention_dropout", w,
                                                                        config.attention_dropout)))
    context = probe("self_attn.context", context)
    out = probe("self_attn.o_proj", nn.linear(p.o_proj, context.reshape(B, T, N * H)))
    return LayerOut(out, probs, kv)


def mlp(p: ArceeMLP, config: ArceeConfig, x: Float[Array, "B T D"], probe: Probe = OFF) -> Float[Array, "B T D"]:
    """down_proj(act(up_proj(x))): no gate projection (AFM-4.5B: act = relu2)."""
    up = probe("mlp.up_proj", nn.linear(p.up_proj, x))  # [B, T, F]
    act = probe("mlp.act_fn", nn.ACT2FN[config.hidden_act](up))
    return probe("mlp.down_proj", nn.linear(p.down_proj, act))


def decoder_layer(p: ArceeLayer, config: ArceeConfig, x: Float[Array, "B T D"], cos: Float[Array, "B T H"],
                  sin: Float[Array, "B T H"], mask: Mask, probe: Probe = OFF, kv: LayerKV | None = None,
                  fast: bool = False) -> LayerOut:
    """HF `ArceeDecoderLayer` (pre-RMSNorm); p holds ONE layer's params (the scan slices the
    stack), `probe` is this layer's: "" names the layer's own output (HF `layers.{i}`),
    "resid_attn" the residual stream between attention and MLP."""
    h1 = probe("input_layernorm", nn.rms_norm(p.input_layernorm, x, config.rms_norm_eps))
    a = attention(p.self_attn, config, h1, cos, sin, mask, probe, kv, fast)
    x = probe("resid_attn", x + a.x)
    h2 = probe("post_attention_layernorm", nn.rms_norm(p.post_attention_layernorm, x, config.rms_norm_eps))
    out = probe("", x + mlp(p.mlp, config, h2, probe))
    return LayerOut(out, a.probs, a.kv, probe.recorded)


def model(p: ArceeBody, config: ArceeConfig, tokens: Tokens, cache: KVCache | None = None, *,
          probe: Probe = OFF, fast: bool = False, remat: bool = False) -> Body:
    """HF `ArceeModel`. Same position and cache conventions as ref/gpt2.py: positions
    default to the slot numbers; with a cache, attention_mask covers only the new tokens."""
    B, T = tokens.shape
    mask = attn_lib.mask_for(tokens.attention_mask, B, T, cache)
    position_ids = jnp.broadcast_to(mask.slots, (B, T)) if tokens.position_ids is None else tokens.position_ids
    x = nn.embed(p.embed_tokens, tokens.input_ids, config.pad_token_id) if tokens.inputs_embeds is None else tokens.inputs_embeds
    x = probe("embed_tokens", x)  # [B, T, D]
    inv_freq, attention_scaling = rotary.rope_frequencies(config, position_ids)
    cos, sin = rotary.rope_cos_sin(inv_freq, attention_scaling, position_ids, x.dtype)  # [B, T, H]
    cos, sin = probe("rotary_emb.cos", cos), probe("rotary_emb.sin", sin)
    stack = layers.run_stack(
        lambda layer, i, x, kv: decoder_layer(layer, config, x, cos, sin, mask, probe.layer("layers", i), kv, fast),
        x, p.layers, None if cache is None else cache.layers, remat=remat, taps=probe.taps)
    last = probe("norm", nn.rms_norm(p.norm, stack.x, config.rms_norm_eps))
    return Body(last_hidden_state=last, hidden_states=layers.hidden_states(stack, last), attentions=stack.attentions,
                cache=None if cache is None else cache_lib.updated(cache, stack.kv, mask.key_valid, T),
                taps={**probe.recorded, **layers.prefixed_taps("layers", stack.taps)} if probe.taps else None)


# Every tap `forward(..., taps=True)` returns, in dataflow order, as `refjax forward --taps`
# writes it ({i} = layer index). The taps dict stacks per-layer taps [L, ...] under the name
# without ".{i}" ("layers.self_attn.q_rot"; the layer outputs under "layers"). Names are HF
# module paths where a module exists, so PyTorch hooks see the same tensors (docs/taps.md).
TAPS = ("embed_tokens", "rotary_emb.cos", "rotary_emb.sin",
        "layers.{i}.input_layernorm", "layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj",
        "layers.{i}.self_attn.v_proj", "layers.{i}.self_attn.q_rot", "layers.{i}.self_attn.k_rot",
        "layers.{i}.self_attn.scores", "layers.{i}.self_attn.probs", "layers.{i}.self_attn.context",
        "layers.{i}.self_attn.o_proj", "layers.{i}.resid_attn", "layers.{i}.post_attention_layernorm",
        "layers.{i}.mlp.up_proj", "layers.{i}.mlp.act_fn", "layers.{i}.mlp.down_proj", "layers.{i}",
        "norm")


# HF's dropout sites (`forward(..., train=True)`) with the config rate each one uses. HF's
# attention dropout is functional (no module): named here after its config attribute.
DROPOUT = {
    "layers.{i}.self_attn.attention_dropout": lambda c: c.attention_dropout,
    "dropout": lambda c: 0.1 if c.classifier_dropout is None else c.classifier_dropout,  # token classification
}


# ---------------------------------------------------------------------------------------
# HF classes: ArceeModel, ArceeForCausalLM, ArceeFor{Sequence,Token}Classification,
# ArceeForQuestionAnswering
# ---------------------------------------------------------------------------------------


def causal_lm(params: ArceeParams, config: ArceeConfig, hidden, batch, probe: Probe = OFF,
              logits_to_keep: int = 0) -> dict:
    """The LM head (untied, or tied to embed_tokens [V, D]) on the last `logits_to_keep`
    positions (0 = all), as HF computes them. -> logits [B, T or n, V]"""
    kept = hidden if not logits_to_keep else hidden[:, -logits_to_keep:]
    return {"logits": heads.lm_logits(params.lm_head, params.model.embed_tokens.table, kept)}


def sequence_classification(params: ArceeParams, config: ArceeConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """Score every token, keep the last non-pad one (HF `ArceeForSequenceClassification`)."""
    return {"logits": heads.last_token_scores(params.score, hidden, batch.tokens.input_ids, config.pad_token_id)}


def token_classification(params: ArceeParams, config: ArceeConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """score(dropout(h)) [B, T, num_labels] (HF `GenericForTokenClassification`)."""
    return {"logits": nn.linear(params.score, probe.dropout("dropout", hidden, DROPOUT["dropout"](config)))}


def question_answering(params: ArceeParams, config: ArceeConfig, hidden, batch, probe: Probe = OFF) -> dict:
    return heads.span_logits(params.qa_outputs, hidden)  # start_logits, end_logits [B, T]


CLASSES = shell.Classes(
    family="arcee",
    heads={
        "ArceeModel": Head("base"),
        "ArceeForCausalLM": Head("causal_lm", causal_lm),
        "ArceeForSequenceClassification": Head("sequence", sequence_classification),
        "ArceeForTokenClassification": Head("token", token_classification),
        "ArceeForQuestionAnswering": Head("qa", question_answering),
    },
    inputs=("input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels", "start_positions",
            "end_positions"),
    # RoPE has no position table: sequences may run past max_position_embeddings, as in HF
    # (dynamic/yarn/longrope scaling decide what that means)
    limits=lambda c: shell.Limits(embed_width=c.hidden_size),
)


def forward(params: ArceeParams, config: ArceeConfig, input_ids=None, attention_mask=None, *,
            cache: KVCache | None = None, logits_to_keep: int = 0, output_hidden_states: bool = False,
            output_attentions: bool = False, taps: bool = False, patch=None, train: bool = False, key=None,
            dropout_masks=None, fast: bool = False, remat: bool = False, **inputs) -> heads.Output:
    """Any HF Arcee class, chosen by `config.architecture`; returns HF's output fields.

    inputs: HF's names, `position_ids`, `inputs_embeds`, `labels`, `start_positions`,
    `end_positions`. `logits_to_keep` (ArceeForCausalLM): logits for only the last n
    positions (0 = all), as HF; the loss then needs n = 0. `taps`, `patch`, `train`, `key`,
    `dropout_masks`: read, replace and drop at named sites (ref/probe.py; TAPS, DROPOUT).
    `fast=True`: `jax.nn.dot_product_attention` (no attentions, taps, patches or dropout).
    `remat=True`: each layer recomputed in the backward pass.
    """
    batch = shell.prepare(CLASSES, config, dict(input_ids=input_ids, attention_mask=attention_mask, **inputs),
                          cache=cache, fast=fast, taps=taps, output_attentions=output_attentions,
                          patch=patch, train=train)
    if logits_to_keep and batch.inputs["labels"] is not None and config.architecture == "ArceeForCausalLM":
        raise ValueError("labels need logits for every position: use logits_to_keep=0 with labels")
    probe = Probe.for_call("arcee", TAPS + tuple(DROPOUT), config.num_hidden_layers, taps=taps, patch=patch,
                           train=train, key=key, masks=dropout_masks)
    body = model(params.model, config, batch.tokens, cache, probe=probe, fast=fast, remat=remat)
    head_options = {"logits_to_keep": logits_to_keep} if config.architecture == "ArceeForCausalLM" else {}
    return shell.finish(CLASSES, params, config, batch, body, output_hidden_states=output_hidden_states,
                        output_attentions=output_attentions, probe=probe, **head_options)


def unstack_layers(params: ArceeParams) -> ArceeParams:
    """The same params with the layers as a tuple, for decoding (see ref/layers.py)."""
    return layers.unstack_at(params, lambda p: p.model.layers)


def init_cache(config: ArceeConfig, batch: int, max_length: int, dtype) -> KVCache:
    """An empty KV cache holding only the K = num_key_value_heads heads: [L, B, S, K, H]."""
    return cache_lib.init_cache(config.num_hidden_layers, batch, max_length, config.num_key_value_heads,
                                config.head_dim, dtype)
