"""Arcee (AFM-4.5B, Arcee AI 2025): a Llama-style decoder with a ReLU² MLP and no gate.

Mirrors HF `transformers/models/arcee/modeling_arcee.py` (eager attention). Reads top to
bottom: embeddings -> rotary -> attention -> MLP -> decoder layer -> stack (a `lax.scan`
over stacked layers) -> heads -> `forward`.

Pre-RMSNorm layer:  x = x + o_proj(attn(rope(q), rope(k), v));  x = x + down(act(up(rms(x)))).
Grouped-query attention: K = num_key_value_heads key/value heads serve N query heads,
without materialising repeated K/V (ref/attention.py). Query scale 1/sqrt(head_dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from refjax.params.arcee import ArceeLayer, ArceeParams
from refjax.params.config import ArceeConfig
from refjax import cache as cache_lib
from refjax import heads, losses, nn, rotary
from refjax.attention import FUTURE_FINFO_MIN, causal_mask, fast_attention, softmax_attention
from refjax.cache import KVCache, write_slots
from refjax import layers
from refjax.layers import run_layers
from refjax.validate import as_arrays, check_task_labels, check_token_inputs


def attention(p: ArceeLayer, config: ArceeConfig, x, cos, sin, key_valid, causal, kv_cache, start, fast=False):
    """GQA self-attention with RoPE on q and k. x [B, T, D] (already RMS-normed)."""
    B, T, _ = x.shape
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = nn.linear(p.self_attn.q_proj, x).reshape(B, T, N, H)
    k = nn.linear(p.self_attn.k_proj, x).reshape(B, T, K, H)
    v = nn.linear(p.self_attn.v_proj, x).reshape(B, T, K, H)
    q_rot, k_rot = rotary.apply_rotary(q, cos, sin), rotary.apply_rotary(k, cos, sin)
    if kv_cache is not None:  # rotated keys are cached, as HF caches them
        k_all, v_all = write_slots(kv_cache[0], k_rot, start), write_slots(kv_cache[1], v, start)  # [B, S, K, H]
    else:
        k_all, v_all = k_rot, v
    # HF's Llama-style mask is one additive finfo.min mask for pad and future keys alike.
    filled = None if kv_cache is None else start + T
    if fast:  # jax.nn.dot_product_attention; no probabilities (see ref/attention.py)
        context, probs, scores = fast_attention(q_rot, k_all, v_all, key_valid, causal, H ** -0.5, filled), None, None
    else:
        context, probs, scores = softmax_attention(q_rot, k_all, v_all, key_valid, causal, H ** -0.5,
                                                   future_fill=FUTURE_FINFO_MIN, filled=filled)
    out = nn.linear(p.self_attn.o_proj, context.reshape(B, T, N * H))
    # projections in HF's module layout [B, T, heads * H]; rotated q, k and the context per head
    taps = {"self_attn.q_proj": q.reshape(B, T, N * H), "self_attn.k_proj": k.reshape(B, T, K * H),
            "self_attn.v_proj": v.reshape(B, T, K * H), "self_attn.q_rot": q_rot, "self_attn.k_rot": k_rot,
            "self_attn.scores": scores, "self_attn.probs": probs, "self_attn.context": context,
            "self_attn.o_proj": out}
    return out, probs, (k_all, v_all), taps


def mlp(p: ArceeLayer, config: ArceeConfig, x):
    """down_proj(act(up_proj(x))): no gate projection (AFM-4.5B uses act = relu2)."""
    up = nn.linear(p.mlp.up_proj, x)  # [B, T, F]
    act = nn.ACT2FN[config.hidden_act](up)
    out = nn.linear(p.mlp.down_proj, act)
    return out, {"mlp.up_proj": up, "mlp.act_fn": act, "mlp.down_proj": out}


def decoder_layer(p: ArceeLayer, config: ArceeConfig, x, cos, sin, key_valid, causal, kv_cache=None, start=None,
                  fast=False):
    """HF `ArceeDecoderLayer`. p holds ONE layer's params (scan slices the stack)."""
    eps = config.rms_norm_eps
    h1 = nn.rms_norm(p.input_layernorm, x, eps)
    attn_out, probs, new_kv, attn_taps = attention(p, config, h1, cos, sin, key_valid, causal, kv_cache, start, fast)
    x = x + attn_out
    h2 = nn.rms_norm(p.post_attention_layernorm, x, eps)
    mlp_out, mlp_taps = mlp(p, config, h2)
    out = x + mlp_out
    # "" names the layer's own output (HF module `layers.{i}`); "resid_attn" is x + attn before the norm
    taps = {"input_layernorm": h1, **attn_taps, "resid_attn": x, "post_attention_layernorm": h2, **mlp_taps,
            "": out}
    return out, probs, new_kv, taps


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


def model(p: ArceeParams, config: ArceeConfig, input_ids=None, attention_mask=None, position_ids=None,
          inputs_embeds=None, cache: KVCache | None = None, want_taps=False, fast=False, remat=False):
    """HF `ArceeModel`: returns (last_hidden_state, hidden_states, attentions, new_cache, taps).

    Same position and cache conventions as ref/gpt2.py: positions default to the slot
    numbers; with a cache, attention_mask covers only the new tokens.
    """
    body = p.model
    B, T = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    start = jnp.zeros((), jnp.int32) if cache is None else cache.length
    slots = start + jnp.arange(T, dtype=jnp.int32)  # [T]
    if position_ids is None:
        position_ids = jnp.broadcast_to(slots, (B, T))
    new_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    key_valid = new_valid if cache is None else write_slots(cache.key_valid, new_valid, start)  # [B, S]
    causal = causal_mask(slots, key_valid.shape[1])  # [T, S]

    x = nn.embed(body.embed_tokens, input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
    inv_freq, attention_scaling = rotary.rope_frequencies(config, position_ids)
    cos, sin = rotary.rope_cos_sin(inv_freq, attention_scaling, position_ids, x.dtype)  # [B, T, H]
    embed_x = x

    def step(x, layer):
        layer_params, _, kv = layer
        x_in = x
        x, probs, new_kv, taps = decoder_layer(layer_params, config, x, cos, sin, key_valid, causal, kv, start, fast)
        return x, (x_in, probs, new_kv if cache is not None else None, taps if want_taps else None)

    kv_stack = None if cache is None else (cache.keys, cache.values)
    # a lax.scan over the stacked layers (or a loop over `ref.layers.unstack`ed ones)
    x, (layer_inputs, attentions, new_kv, layer_taps) = run_layers(step, x, body.layers, kv_stack, remat)
    last = nn.rms_norm(body.norm, x, config.rms_norm_eps)
    hidden_states = jnp.concatenate([layer_inputs, last[None]], axis=0)  # [L + 1, B, T, D]
    new_cache = None
    if cache is not None:
        new_cache = KVCache(keys=new_kv[0], values=new_kv[1], key_valid=key_valid, length=start + T)
    taps = None
    if want_taps:
        taps = {"embed_tokens": embed_x, "rotary_emb.cos": cos, "rotary_emb.sin": sin,
                **{f"layers.{k}" if k else "layers": v for k, v in layer_taps.items()}, "norm": last}
    return last, hidden_states, attentions, new_cache, taps


def forward(params: ArceeParams, config: ArceeConfig, input_ids=None, attention_mask=None, position_ids=None,
            inputs_embeds=None, labels=None, start_positions=None, end_positions=None, cache: KVCache | None = None,
            *, logits_to_keep: int = 0, output_hidden_states=False, output_attentions=False,
            taps=False, fast=False, remat=False) -> heads.Output:
    """Any HF Arcee class, chosen by `config.architecture`; returns HF's output fields.

    `logits_to_keep` (ArceeForCausalLM): compute logits for only the last n positions
    (0 = all), as HF does; the loss then needs n = 0 (HF shifts labels against all logits).
    RoPE has no position table, so sequences may run past max_position_embeddings
    (dynamic/yarn/longrope scaling decide what that means), as in HF.
    `fast=True` uses `jax.nn.dot_product_attention` (no attentions or attention taps).
    `remat=True` recomputes each layer in the backward pass (`jax.checkpoint`).
    """
    x = as_arrays(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  inputs_embeds=inputs_embeds, labels=labels, start_positions=start_positions,
                  end_positions=end_positions)
    input_ids, attention_mask, position_ids, inputs_embeds, labels, start_positions, end_positions = x.values()
    arch = config.architecture
    if fast and (output_attentions or taps):
        raise ValueError("fast=True computes no attention probabilities; use fast=False for attentions or taps")
    shape = check_token_inputs(vocab_size=config.vocab_size, hidden_size=config.hidden_size, input_ids=input_ids,
                               attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                               cache=cache, max_positions=None)
    if arch == "ArceeForCausalLM":
        check_task_labels("lm", labels, shape, config.vocab_size)
        if labels is not None and logits_to_keep:
            raise ValueError("labels need logits for every position: use logits_to_keep=0 with labels")
    elif arch == "ArceeForSequenceClassification":
        check_task_labels("sequence", labels, shape, config.num_labels, config.problem_type)
    elif arch == "ArceeForTokenClassification":
        check_task_labels("token", labels, shape, config.num_labels)

    last, hidden_states, attentions, new_cache, tap_values = model(
        params, config, input_ids, attention_mask, position_ids, inputs_embeds, cache, taps, fast, remat)
    out = dict(last_hidden_state=last, cache=new_cache, taps=tap_values,
               hidden_states=hidden_states if output_hidden_states else None,
               attentions=attentions if output_attentions else None)
    if arch == "ArceeForCausalLM":
        kept = last if not logits_to_keep else last[:, -logits_to_keep:]
        out["logits"] = heads.lm_logits(params.lm_head, params.model.embed_tokens.table, kept)
        if labels is not None:
            out["loss"] = losses.causal_lm_loss(out["logits"], labels)
    elif arch == "ArceeForSequenceClassification":
        out["logits"], out["loss"] = heads.sequence_classification(
            params.score, last, input_ids, config.pad_token_id, config.num_labels, config.problem_type, labels)
    elif arch == "ArceeForTokenClassification":
        out["logits"], out["loss"] = heads.token_classification(params.score, last, config.num_labels, labels)
    elif arch == "ArceeForQuestionAnswering":
        out["start_logits"], out["end_logits"], out["loss"] = heads.question_answering(
            params.qa_outputs, last, start_positions, end_positions)
    return heads.Output(**out)


def unstack_layers(params):
    """The same params with the layers as a tuple, for decoding (see ref/layers.py)."""
    return layers.unstack_at(params, lambda p: p.model.layers)


def init_cache(config: ArceeConfig, batch: int, max_length: int, dtype) -> KVCache:
    """An empty KV cache holding only the K = num_key_value_heads heads: [L, B, S, K, H]."""
    return cache_lib.init_cache(config.num_hidden_layers, batch, max_length, config.num_key_value_heads,
                                config.head_dim, dtype)
