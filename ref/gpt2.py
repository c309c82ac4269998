"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

Mirrors HF `transformers/models/gpt2/modeling_gpt2.py` with `attn_implementation="eager"`
(the only HF path that honours `scale_attn_by_inverse_layer_idx` and
`reorder_and_upcast_attn`). Reads top to bottom: embeddings -> attention -> MLP -> block
-> stack (a `lax.scan` over stacked layers) -> heads -> `forward`.

Pre-LayerNorm block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x));  final ln_f.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from params.config import GPT2Config
from params.gpt2 import GPT2Block, GPT2Body, GPT2Params
from ref import heads, losses, nn
from ref.attention import causal_mask, fast_attention, softmax_attention
from ref import cache as cache_lib
from ref.cache import KVCache, write_slots
from ref import layers
from ref.layers import run_layers
from ref.validate import as_arrays, check_labels, check_task_labels, check_token_inputs


def embed(p: GPT2Body, config: GPT2Config, input_ids, inputs_embeds, position_ids, token_type_ids):
    """wte(input_ids) + wpe(position_ids) [+ wte(token_type_ids)]  (GPT-2 has no token-type
    table: HF embeds token types with the *word* embedding). -> ([B, T, D], taps)"""
    words = nn.embed(p.wte, input_ids) if inputs_embeds is None else inputs_embeds
    positions = nn.embed(p.wpe, position_ids)
    x = words + positions
    if token_type_ids is not None:
        x = x + nn.embed(p.wte, token_type_ids)
    return x, {"wte": words, "wpe": positions, "drop": x}  # HF's `drop` (identity in eval) sees the sum


def attention(p: GPT2Block, config: GPT2Config, x, layer_idx, key_valid, causal, kv_cache, start, fast=False):
    """Causal self-attention of one layer. x [B, T, D] (already ln_1-normed).

    HF eager order: scores = q k^T / sqrt(H) [/ (layer_idx + 1)], masked with finfo.min,
    softmax, probs @ v. `reorder_and_upcast_attn` computes scores and softmax in fp32
    (we use max(dtype, fp32): HF *downcasts* an fp64 model here, see docs).
    """
    B, T, D = x.shape
    N, H = config.n_head, config.head_dim
    qkv = nn.linear(p.attn.c_attn, x)  # [B, T, 3D]
    q, k, v = (t.reshape(B, T, N, H) for t in jnp.split(qkv, 3, axis=-1))  # [B, T, N, H]
    taps = {"attn.c_attn": qkv, "attn.q": q, "attn.k": k, "attn.v": v}  # this step's k, v (before any cache)
    if kv_cache is not None:  # attend over every cache slot, this step's keys written in
        k = write_slots(kv_cache[0], k, start)  # [B, S, N, H]
        v = write_slots(kv_cache[1], v, start)
    scale = 1.0 / math.sqrt(H) if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale = scale / (layer_idx + 1).astype(x.dtype)
    score_dtype = nn.accum_dtype(x.dtype) if config.reorder_and_upcast_attn else None
    if fast:  # jax.nn.dot_product_attention; no probabilities (see ref/attention.py)
        context, probs, scores = fast_attention(q, k, v, key_valid, causal, scale), None, None
    else:
        context, probs, scores = softmax_attention(q, k, v, key_valid, causal, scale, score_dtype)
    out = nn.linear(p.attn.c_proj, context.reshape(B, T, D))
    taps.update({"attn.scores": scores, "attn.probs": probs, "attn.context": context, "attn.c_proj": out})
    return out, probs, (k, v), taps


def mlp(p: GPT2Block, config: GPT2Config, x):
    """c_proj(act(c_fc(x))). x [B, T, D] -> [B, T, D]."""
    h = nn.linear(p.mlp.c_fc, x)  # [B, T, F]
    a = nn.ACT2FN[config.activation_function](h)
    out = nn.linear(p.mlp.c_proj, a)
    return out, {"mlp.c_fc": h, "mlp.act": a, "mlp.c_proj": out}


def block(p: GPT2Block, config: GPT2Config, x, layer_idx, key_valid, causal, kv_cache=None, start=None, fast=False):
    """HF `GPT2Block` (pre-LN). p holds ONE layer's params (scan slices the stack)."""
    eps = config.layer_norm_epsilon
    h1 = nn.layer_norm(p.ln_1, x, eps)
    attn_out, probs, new_kv, attn_taps = attention(p, config, h1, layer_idx, key_valid, causal, kv_cache, start, fast)
    x = x + attn_out
    h2 = nn.layer_norm(p.ln_2, x, eps)
    mlp_out, mlp_taps = mlp(p, config, h2)
    out = x + mlp_out
    # "" names the block's own output (HF module `h.{i}`); "resid_attn" is x + attn before ln_2
    taps = {"ln_1": h1, **attn_taps, "resid_attn": x, "ln_2": h2, **mlp_taps, "": out}
    return out, probs, new_kv, taps


# Every tap `forward(..., taps=True)` returns, in dataflow order, as `refjax forward --taps`
# writes it ({i} = layer index). The taps dict stacks per-layer taps [L, ...] under the name
# without ".{i}" ("h.attn.q"; the block outputs under "h"). Names are HF module paths where
# a module exists, so PyTorch hooks on the same names see the same tensors (docs/taps.md).
TAPS = ("wte", "wpe", "drop",
        "h.{i}.ln_1", "h.{i}.attn.c_attn", "h.{i}.attn.q", "h.{i}.attn.k", "h.{i}.attn.v", "h.{i}.attn.scores",
        "h.{i}.attn.probs", "h.{i}.attn.context", "h.{i}.attn.c_proj", "h.{i}.resid_attn", "h.{i}.ln_2",
        "h.{i}.mlp.c_fc", "h.{i}.mlp.act", "h.{i}.mlp.c_proj", "h.{i}",
        "ln_f")


def transformer(p: GPT2Body, config: GPT2Config, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, cache: KVCache | None = None, want_taps=False, fast=False, remat=False):
    """HF `GPT2Model`: returns (last_hidden_state, hidden_states, attentions, new_cache, taps).

    input_ids [B, T]; attention_mask [B, T] (1 = real token; padding anywhere).
    Without a cache, positions default to 0..T-1 (as HF: *not* derived from the mask).
    With a cache, the T tokens go into slots [cache.length, cache.length + T), positions
    default to those slot numbers, and attention_mask covers only the new tokens.
    """
    B, T = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    start = jnp.zeros((), jnp.int32) if cache is None else cache.length
    slots = start + jnp.arange(T, dtype=jnp.int32)  # [T]
    if position_ids is None:
        position_ids = jnp.broadcast_to(slots, (B, T))
    new_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    key_valid = new_valid if cache is None else write_slots(cache.key_valid, new_valid, start)  # [B, S]
    causal = causal_mask(slots, key_valid.shape[1])  # [T, S]

    x, embed_taps = embed(p, config, input_ids, inputs_embeds, position_ids, token_type_ids)  # [B, T, D]

    def step(x, layer):
        layer_params, layer_idx, kv = layer
        x_in = x
        x, probs, new_kv, taps = block(layer_params, config, x, layer_idx, key_valid, causal, kv, start, fast)
        return x, (x_in, probs, new_kv if cache is not None else None, taps if want_taps else None)

    kv_stack = None if cache is None else (cache.keys, cache.values)
    # a lax.scan over the stacked layers (or a loop over `ref.layers.unstack`ed ones)
    x, (block_inputs, attentions, new_kv, layer_taps) = run_layers(step, x, p.h, kv_stack, remat)
    last = nn.layer_norm(p.ln_f, x, config.layer_norm_epsilon)
    hidden_states = jnp.concatenate([block_inputs, last[None]], axis=0)  # [L + 1, B, T, D]
    new_cache = None
    if cache is not None:
        new_cache = KVCache(keys=new_kv[0], values=new_kv[1], key_valid=key_valid, length=start + T)
    taps = None
    if want_taps:
        taps = {**embed_taps, **{f"h.{k}" if k else "h": v for k, v in layer_taps.items()}, "ln_f": last}
    return last, hidden_states, attentions, new_cache, taps


def forward(params: GPT2Params, config: GPT2Config, input_ids=None, attention_mask=None, token_type_ids=None,
            position_ids=None, inputs_embeds=None, labels=None, mc_token_ids=None, mc_labels=None,
            start_positions=None, end_positions=None, cache: KVCache | None = None, *,
            output_hidden_states=False, output_attentions=False, taps=False, fast=False, remat=False) -> heads.Output:
    """Any HF GPT-2 class, chosen by `config.architecture`; returns HF's output fields.

    `fast=True` uses `jax.nn.dot_product_attention` (same weights; equal to the readable
    path on real tokens, tested); it cannot return attentions or attention taps.
    `remat=True` recomputes each layer in the backward pass (`jax.checkpoint`) instead of
    storing its activations: same values and gradients, less memory when training.

    GPT2DoubleHeadsModel takes input_ids [B, C, T] (C choices) and mc_token_ids [B, C];
    its logits are [B, C, T, V] and hidden states [L + 1, B, C, T, D], as HF reshapes them.
    """
    x = as_arrays(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels, mc_token_ids=mc_token_ids,
                  mc_labels=mc_labels, start_positions=start_positions, end_positions=end_positions)
    input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels, mc_token_ids, mc_labels, \
        start_positions, end_positions = x.values()
    arch = config.architecture
    if fast and (output_attentions or taps):
        raise ValueError("fast=True computes no attention probabilities; use fast=False for attentions or taps")
    shape = check_token_inputs(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids, inputs_embeds=inputs_embeds, cache=cache, max_positions=config.n_positions,
        positions_field="n_positions", token_type_ids=token_type_ids, type_vocab_size=config.vocab_size,
        allow_choices=arch == "GPT2DoubleHeadsModel")
    if arch in ("GPT2LMHeadModel", "GPT2DoubleHeadsModel"):
        check_task_labels("lm", labels, shape, config.vocab_size)
    elif arch == "GPT2ForSequenceClassification":
        check_task_labels("sequence", labels, shape, config.num_labels, config.problem_type)
    elif arch == "GPT2ForTokenClassification":
        check_task_labels("token", labels, shape, config.num_labels)
    if arch == "GPT2DoubleHeadsModel":
        check_labels(mc_token_ids, "mc_token_ids", shape[:-1], shape[-1], "sequence length")
        check_labels(mc_labels, "mc_labels", shape[:1], shape[1] if len(shape) == 3 else None, "choices")
        width = config.summary_size if config.summary_use_proj else config.n_embd
        if mc_labels is not None and width != 1:  # HF fails here too, with a shape error
            raise ValueError(f"mc_labels need one logit per choice, but this config's summary gives {width} "
                             f"(summary_use_proj={config.summary_use_proj}, "
                             f"summary_proj_to_labels={config.summary_proj_to_labels})")
    outer_shape = input_ids.shape[:-1] if input_ids is not None else inputs_embeds.shape[:-2]

    def flat(x):  # [B, C, T] -> [B*C, T], as HF views multiple-choice inputs
        return None if x is None else x.reshape(-1, x.shape[-1])

    last, hidden_states, attentions, new_cache, tap_values = transformer(
        params.transformer, config, flat(input_ids), flat(attention_mask), flat(token_type_ids),
        flat(position_ids), inputs_embeds, cache, taps, fast, remat)
    T, D = last.shape[1], last.shape[2]
    last = last.reshape(*outer_shape, T, D)
    out = dict(last_hidden_state=last, cache=new_cache, taps=tap_values,
               hidden_states=hidden_states.reshape(-1, *outer_shape, T, D) if output_hidden_states else None,
               attentions=attentions if output_attentions else None)

    if arch in ("GPT2LMHeadModel", "GPT2DoubleHeadsModel"):
        out["logits"] = heads.lm_logits(params.lm_head, params.transformer.wte.table, last)
        if labels is not None:
            out["loss"] = losses.causal_lm_loss(out["logits"], labels)
    if arch == "GPT2DoubleHeadsModel":
        mc_logits = heads.sequence_summary(params.multiple_choice_head, last, mc_token_ids, config.summary_type,
                                           config.summary_activation)
        if mc_logits.shape[-1] == 1:  # HF `.squeeze(-1)`
            mc_logits = mc_logits[..., 0]
        out["mc_logits"] = mc_logits
        if mc_labels is not None:
            out["mc_loss"] = losses.cross_entropy(mc_logits.reshape(-1, mc_logits.shape[-1]), mc_labels.reshape(-1))
    elif arch == "GPT2ForSequenceClassification":
        out["logits"], out["loss"] = heads.sequence_classification(
            params.score, last, input_ids, config.pad_token_id, config.num_labels, config.problem_type, labels)
    elif arch == "GPT2ForTokenClassification":
        out["logits"], out["loss"] = heads.token_classification(params.classifier, last, config.num_labels, labels)
    elif arch == "GPT2ForQuestionAnswering":
        out["start_logits"], out["end_logits"], out["loss"] = heads.question_answering(
            params.qa_outputs, last, start_positions, end_positions)
    return heads.Output(**out)


def unstack_layers(params):
    """The same params with the layers as a tuple, for decoding (see ref/layers.py)."""
    return layers.unstack_at(params, lambda p: p.transformer.h)


def init_cache(config: GPT2Config, batch: int, max_length: int, dtype) -> KVCache:
    """An empty KV cache for `generate`: [L, B, max_length, N, H] keys and values."""
    return cache_lib.init_cache(config.n_layer, batch, max_length, config.n_head, config.head_dim, dtype)
