"""RoFormer (Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding").

Mirrors HF `transformers/models/roformer/modeling_roformer.py` (eager; the only HF path).
Reads top to bottom: embeddings -> rotary (sinusoidal, interleaved pairs) -> self-attention ->
feed-forward -> layer -> stack (a `lax.scan` over stacked layers) -> heads -> `forward`.

BERT-style post-LayerNorm layer, no position embedding added to the input (positions enter
only through the rotation of q and k, and of v with `rotary_value`):
    a = LN(x + dense(attn(rot(q), rot(k), rot?(v))));   out = LN(a + dense(act(dense(a)))).
`is_decoder` makes the self-attention causal (any head: HF decides by the config, not the
class) and allows a KV cache. Positions are the token's index (+ the cache length): HF's
RoFormer takes no position_ids, so left padding shifts a row's positions, as in HF.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from refjax.params.roformer import RoFormerBody, RoFormerConfig, RoFormerLayer, RoFormerParams
from refjax import cache as cache_lib
from refjax import heads, losses, nn
from refjax.attention import FUTURE_FINFO_MIN, causal_mask, fast_attention, softmax_attention
from refjax.cache import KVCache, write_slots
from refjax.validate import as_arrays, check_labels, check_task_labels, check_token_inputs


def embed(p: RoFormerBody, config: RoFormerConfig, input_ids, inputs_embeds, token_type_ids):
    """HF `RoFormerEmbeddings` (+ `embeddings_project`): LN(word + token_type) [B, T, E],
    projected to [B, T, D] when embedding_size != hidden_size. No position embedding."""
    words = nn.embed(p.embeddings.word_embeddings, input_ids) if inputs_embeds is None else inputs_embeds
    if token_type_ids is None:  # HF: zeros
        token_type_ids = jnp.zeros(words.shape[:2], jnp.int32)
    types = nn.embed(p.embeddings.token_type_embeddings, token_type_ids)
    x = nn.layer_norm(p.embeddings.LayerNorm, words + types, config.layer_norm_eps)
    taps = {"embeddings.word_embeddings": words, "embeddings.token_type_embeddings": types, "embeddings.LayerNorm": x}
    if p.embeddings_project is not None:
        x = nn.linear(p.embeddings_project, x)
    taps["embeddings_project"] = x  # = embeddings.LayerNorm when there is no projection
    return x, taps


# ---------------------------------------------------------------------------------------
# Rotary embedding, RoFormer's layout (https://kexue.fm/archives/8265)
# ---------------------------------------------------------------------------------------
# The math is ref/rotary.py's `x * cos + rotate(x) * sin`, but the layout differs from
# Llama's: RoFormer rotates *adjacent pairs* (x_{2i}, x_{2i+1}) by angle p*w_i, with the
# table row [sin(p w_0..), cos(p w_0..)] repeated pairwise ([s0, s0, s1, s1, ...]), where
# Llama rotates the pairs (x_i, x_{i+d/2}) ("rotate_half"). The two agree after permuting
# the head features to [even | odd] (tested). The angles come from a stored table
# (`encoder.embed_positions.weight`, float32-rounded; see params/roformer.py), not from
# inv_freq at run time, and there is no rope_scaling.


def sinusoidal_positions(table: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows of the table at positions [T] -> (sin, cos) [T, H], each repeated pairwise
    ([s0, s0, s1, s1, ...]) as HF's `apply_rotary_position_embeddings` builds sin_pos/cos_pos."""
    rows = jnp.take(table, positions, axis=0)  # [T, H]
    sin, cos = jnp.split(rows, 2, axis=-1)  # [T, H/2] each
    return jnp.repeat(sin, 2, axis=-1), jnp.repeat(cos, 2, axis=-1)


def rotate_pairs(x: jax.Array) -> jax.Array:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] on the last axis."""
    return jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x [B, T, N, H] rotated by sin/cos [T, H] (pairwise layout): x * cos + rotate_pairs(x) * sin."""
    return x * cos[:, None, :] + rotate_pairs(x) * sin[:, None, :]


def attention(p: RoFormerLayer, config: RoFormerConfig, x, sin, cos, key_valid, causal, kv_cache, start, fast=False):
    """HF `RoFormerSelfAttention`: rotary q/k (and v with rotary_value), softmax(q k^T /
    sqrt(H) + mask) v. x [B, T, D]. Rotated k and v are what the cache holds (as HF's)."""
    B, T, D = x.shape
    N, H = config.num_attention_heads, config.head_dim
    sp = p.attention.self_attention
    q = nn.linear(sp.query, x).reshape(B, T, N, H)
    k = nn.linear(sp.key, x).reshape(B, T, N, H)
    v = nn.linear(sp.value, x).reshape(B, T, N, H)
    q_rot, k_rot = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
    v_rot = apply_rotary(v, sin, cos) if config.rotary_value else v
    if kv_cache is not None:
        k_all, v_all = write_slots(kv_cache[0], k_rot, start), write_slots(kv_cache[1], v_rot, start)  # [B, S, N, H]
    else:
        k_all, v_all = k_rot, v_rot
    filled = None if kv_cache is None else start + T
    # HF: one additive finfo.min mask (pad keys, and future keys when is_decoder); HF divides
    # the scores by sqrt(H), we multiply by 1/sqrt(H): equal up to one rounding.
    scale = 1.0 / math.sqrt(H)
    if fast:
        if causal is None:
            causal = jnp.ones((T, k_all.shape[1]), bool)
        context, probs, scores = fast_attention(q_rot, k_all, v_all, key_valid, causal, scale, filled), None, None
    else:
        context, probs, scores = softmax_attention(q_rot, k_all, v_all, key_valid, causal, scale,
                                                   future_fill=FUTURE_FINFO_MIN, filled=filled)
    taps = {"attention.self.query": q.reshape(B, T, D), "attention.self.key": k.reshape(B, T, D),
            "attention.self.value": v.reshape(B, T, D), "attention.self.q_rot": q_rot,
            "attention.self.k_rot": k_rot, "attention.self.v_rot": v_rot, "attention.self.scores": scores,
            "attention.self.probs": probs, "attention.self.context": context}
    return context.reshape(B, T, D), probs, (k_all, v_all), taps


def layer(p: RoFormerLayer, config: RoFormerConfig, x, sin, cos, key_valid, causal, kv_cache=None, start=None,
          fast=False):
    """HF `RoFormerLayer` (post-LN). p holds ONE layer's params (scan slices the stack)."""
    eps = config.layer_norm_eps
    context, probs, new_kv, taps = attention(p, config, x, sin, cos, key_valid, causal, kv_cache, start, fast)
    attn_dense = nn.linear(p.attention.output.dense, context)
    attn_out = nn.layer_norm(p.attention.output.LayerNorm, attn_dense + x, eps)  # HF RoFormerSelfOutput
    inter = nn.linear(p.intermediate.dense, attn_out)  # [B, T, F]
    act = nn.ACT2FN[config.hidden_act](inter)
    out_dense = nn.linear(p.output.dense, act)
    out = nn.layer_norm(p.output.LayerNorm, out_dense + attn_out, eps)  # HF RoFormerOutput
    taps.update({"attention.output.dense": attn_dense, "attention.output.LayerNorm": attn_out,
                 "intermediate.dense": inter, "intermediate.intermediate_act_fn": act, "output.dense": out_dense,
                 "": out})
    return out, probs, new_kv, taps


# Every tap `forward(..., taps=True)` returns, in dataflow order ({i} = layer index). The
# taps dict stacks per-layer taps [L, ...] under the name without ".{i}" (the layer outputs
# under "encoder.layer"). Names are HF module paths where a module exists (docs/taps.md).
# `embeddings_project` is the LayerNorm output itself when embedding_size == hidden_size.
TAPS = ("embeddings.word_embeddings", "embeddings.token_type_embeddings", "embeddings.LayerNorm",
        "embeddings_project", "encoder.embed_positions.sin", "encoder.embed_positions.cos",
        "encoder.layer.{i}.attention.self.query", "encoder.layer.{i}.attention.self.key",
        "encoder.layer.{i}.attention.self.value", "encoder.layer.{i}.attention.self.q_rot",
        "encoder.layer.{i}.attention.self.k_rot", "encoder.layer.{i}.attention.self.v_rot",
        "encoder.layer.{i}.attention.self.scores", "encoder.layer.{i}.attention.self.probs",
        "encoder.layer.{i}.attention.self.context", "encoder.layer.{i}.attention.output.dense",
        "encoder.layer.{i}.attention.output.LayerNorm", "encoder.layer.{i}.intermediate.dense",
        "encoder.layer.{i}.intermediate.intermediate_act_fn", "encoder.layer.{i}.output.dense",
        "encoder.layer.{i}")


def model(p: RoFormerBody, config: RoFormerConfig, input_ids=None, attention_mask=None, token_type_ids=None,
          inputs_embeds=None, cache: KVCache | None = None, want_taps=False, fast=False, remat=False):
    """HF `RoFormerModel`: returns (last_hidden_state, hidden_states, attentions, new_cache, taps).

    Positions are 0..T-1 (cache.length.. with a cache) for every row, as HF's
    `embed_positions(shape, past_key_values_length)`. With a cache, attention_mask covers
    only the new tokens. No final norm: the last layer's output is last_hidden_state.
    """
    B, T = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    start = jnp.zeros((), jnp.int32) if cache is None else cache.length
    slots = start + jnp.arange(T, dtype=jnp.int32)  # [T]
    new_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    key_valid = new_valid if cache is None else write_slots(cache.key_valid, new_valid, start)  # [B, S]
    causal = causal_mask(slots, key_valid.shape[1]) if config.is_decoder else None  # [T, S]

    x, embed_taps = embed(p, config, input_ids, inputs_embeds, token_type_ids)  # [B, T, D]
    sin, cos = sinusoidal_positions(p.encoder.embed_positions.table.astype(x.dtype), slots)  # [T, H]

    def step(x, layer_in):
        layer_params, kv = layer_in
        x_in = x
        x, probs, new_kv, taps = layer(layer_params, config, x, sin, cos, key_valid, causal, kv, start, fast)
        return x, (x_in, probs, new_kv if cache is not None else None, taps if want_taps else None)

    kv_stack = None if cache is None else (cache.keys, cache.values)
    x, (layer_inputs, attentions, new_kv, layer_taps) = jax.lax.scan(
        jax.checkpoint(step) if remat else step, x, (p.encoder.layer, kv_stack))
    hidden_states = jnp.concatenate([layer_inputs, x[None]], axis=0)  # [L + 1, B, T, D]
    new_cache = None
    if cache is not None:
        new_cache = KVCache(keys=new_kv[0], values=new_kv[1], key_valid=key_valid, length=start + T)
    taps = None
    if want_taps:
        taps = {**embed_taps, "encoder.embed_positions.sin": sin, "encoder.embed_positions.cos": cos,
                **{f"encoder.layer.{k}" if k else "encoder.layer": v for k, v in layer_taps.items()}}
    return x, hidden_states, attentions, new_cache, taps


# ---------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------


def lm_head(params: RoFormerParams, config: RoFormerConfig, hidden):
    """HF `RoFormerOnlyMLMHead`: LN(act(dense(h))) [.., E], then the decoder (tied: the word
    embeddings [V, E]) plus its bias [V]. -> logits [..., V]"""
    p = params.predictions
    h = nn.ACT2FN[config.hidden_act](nn.linear(p.transform.dense, hidden))
    h = nn.layer_norm(p.transform.LayerNorm, h, config.layer_norm_eps)
    return heads.lm_logits(p.decoder, params.roformer.embeddings.word_embeddings.table, h) + p.bias


def classification_head(params: RoFormerParams, config: RoFormerConfig, hidden):
    """HF `RoFormerClassificationHead`: out_proj(act(dense(h[:, 0]))), the first token. [B, num_labels]"""
    p = params.classifier
    x = nn.ACT2FN[config.hidden_act](nn.linear(p.dense, hidden[:, 0]))
    return nn.linear(p.out_proj, x)


def forward(params: RoFormerParams, config: RoFormerConfig, input_ids=None, attention_mask=None,
            token_type_ids=None, inputs_embeds=None, labels=None, start_positions=None, end_positions=None,
            cache: KVCache | None = None, *, output_hidden_states=False, output_attentions=False, taps=False,
            fast=False, remat=False) -> heads.Output:
    """Any HF RoFormer class, chosen by `config.architecture`; returns HF's output fields.

    RoFormerForMultipleChoice takes input_ids [B, C, T] (inputs_embeds [B, C, T, E]) and
    labels [B]; its logits are [B, C] and hidden states [L + 1, B*C, T, D] (HF flattens).
    A cache needs `config.is_decoder` (HF caches only then). `fast=True` uses
    `jax.nn.dot_product_attention` (no attentions or attention taps); `remat=True`
    recomputes each layer in the backward pass.
    """
    x = as_arrays(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  inputs_embeds=inputs_embeds, labels=labels, start_positions=start_positions,
                  end_positions=end_positions)
    input_ids, attention_mask, token_type_ids, inputs_embeds, labels, start_positions, end_positions = x.values()
    arch = config.architecture
    if fast and (output_attentions or taps):
        raise ValueError("fast=True computes no attention probabilities; use fast=False for attentions or taps")
    if cache is not None and not config.is_decoder:
        raise ValueError("a KV cache needs config.is_decoder=True: a bidirectional RoFormer recomputes every "
                         "token's state when a token is added (HF uses no cache then either)")
    choices = None
    if arch == "RoFormerForMultipleChoice":
        shape = input_ids.shape if input_ids is not None else (None if inputs_embeds is None
                                                               else inputs_embeds.shape[:-1])
        if shape is not None and len(shape) != 3:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(f"RoFormerForMultipleChoice needs {name} of shape [batch, choices, seq"
                             f"{', embedding_size' if name == 'inputs_embeds' else ''}], got "
                             f"{list(input_ids.shape if input_ids is not None else inputs_embeds.shape)}")
        if shape is not None:
            choices = shape[:2]
            for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
                if value is not None and tuple(value.shape) != tuple(shape):
                    raise ValueError(f"{name} has shape {list(value.shape)}; input_ids has {list(shape)}")

            def flat(a, keep):  # [B, C, T, ...] -> [B*C, T, ...], as HF views the choices
                return None if a is None else a.reshape(-1, *a.shape[2:2 + keep])

            input_ids, attention_mask, token_type_ids = (flat(a, 1) for a in (input_ids, attention_mask,
                                                                              token_type_ids))
            inputs_embeds = flat(inputs_embeds, 2)
    shape = check_token_inputs(
        vocab_size=config.vocab_size, hidden_size=config.embedding_size, input_ids=input_ids,
        attention_mask=attention_mask, position_ids=None, inputs_embeds=inputs_embeds, cache=cache,
        max_positions=config.max_position_embeddings, token_type_ids=token_type_ids,
        type_vocab_size=config.type_vocab_size)
    if arch in ("RoFormerForMaskedLM", "RoFormerForCausalLM"):
        check_task_labels("lm", labels, shape, config.vocab_size)
    elif arch == "RoFormerForSequenceClassification":
        check_task_labels("sequence", labels, shape, config.num_labels, config.problem_type)
    elif arch == "RoFormerForTokenClassification":
        check_task_labels("token", labels, shape, config.num_labels)
    elif arch == "RoFormerForMultipleChoice":
        check_labels(labels, "labels", choices[:1], choices[1], "choices")

    last, hidden_states, attentions, new_cache, tap_values = model(
        params.roformer, config, input_ids, attention_mask, token_type_ids, inputs_embeds, cache, taps, fast, remat)
    out = dict(last_hidden_state=last, cache=new_cache, taps=tap_values,
               hidden_states=hidden_states if output_hidden_states else None,
               attentions=attentions if output_attentions else None)
    if arch == "RoFormerForMaskedLM":
        out["logits"] = lm_head(params, config, last)
        if labels is not None:  # every position predicts its own label (no shift)
            out["loss"] = losses.cross_entropy(out["logits"].reshape(-1, config.vocab_size), labels.reshape(-1))
    elif arch == "RoFormerForCausalLM":
        out["logits"] = lm_head(params, config, last)
        if labels is not None:
            out["loss"] = losses.causal_lm_loss(out["logits"], labels)
    elif arch == "RoFormerForSequenceClassification":
        out["logits"] = classification_head(params, config, last)
        if labels is not None:
            out["loss"] = losses.sequence_classification_loss(out["logits"], labels, config.num_labels,
                                                              config.problem_type)
    elif arch == "RoFormerForMultipleChoice":
        # HF RoFormerSequenceSummary (default "last": the last token, padded or not), then Linear(D, 1)
        pooled = heads.sequence_summary(params.sequence_summary, last, None, config.summary_type,
                                        config.summary_activation)
        out["logits"] = nn.linear(params.classifier, pooled).reshape(choices)  # [B, C]
        if labels is not None:
            out["loss"] = losses.cross_entropy(out["logits"], labels.reshape(-1))
    elif arch == "RoFormerForTokenClassification":
        out["logits"], out["loss"] = heads.token_classification(params.classifier, last, config.num_labels, labels)
    elif arch == "RoFormerForQuestionAnswering":
        out["start_logits"], out["end_logits"], out["loss"] = heads.question_answering(
            params.qa_outputs, last, start_positions, end_positions)
    return heads.Output(**out)


def init_cache(config: RoFormerConfig, batch: int, max_length: int, dtype) -> KVCache:
    """An empty KV cache for `generate` (RoFormerForCausalLM with is_decoder): [L, B, S, N, H]."""
    return cache_lib.init_cache(config.num_hidden_layers, batch, max_length, config.num_attention_heads,
                                config.head_dim, dtype)
