"""RoFormer (Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding").

Mirrors HF `transformers/models/roformer/modeling_roformer.py` (eager; the only HF path).
BERT-style post-LayerNorm layers, no position embedding added to the input (positions enter
only through the rotation of q and k, and of v with `rotary_value`):

    x = LN(word + type) [@ embeddings_project];   a = LN(x + attn(rot q, rot k, rot? v));   LN(a + mlp(a))

`is_decoder` makes the self-attention causal (any head: HF decides by the config, not the
class) and allows a KV cache. Positions are the token's index (+ the cache length): HF's
RoFormer takes no position_ids, so left padding shifts a row's positions, as in HF.

The math core reads top to bottom: embed -> rotary -> attention -> layer -> model; then the
HF classes (heads) as data, and `forward`. Shapes: B batch, T new tokens, S key slots,
E = embedding_size, D = hidden_size, F = intermediate_size, N heads, H head_dim, P table rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from refjax import attention as attn_lib
from refjax import cache as cache_lib
from refjax import heads, layers, nn, shell
from refjax.attention import FUTURE_FINFO_MIN, Mask
from refjax.cache import KVCache, LayerKV
from refjax.layers import LayerOut
from refjax.probe import OFF, Probe
from refjax.params.common import Linear
from refjax.params.roformer import (RoFormerBody, RoFormerConfig, RoFormerEmbeddings, RoFormerLayer, RoFormerParams,
                                    RoFormerSelfAttention)
from refjax.shell import Body, Head, Tokens


def embed(p: RoFormerEmbeddings, project: Linear | None, config: RoFormerConfig, tokens: Tokens,
          probe: Probe = OFF) -> Float[Array, "B T D"]:
    """HF `RoFormerEmbeddings` (+ `embeddings_project`): dropout(LN(word + token_type)) [B, T, E],
    projected to [B, T, D] when embedding_size != hidden_size. No position embedding."""
    words = nn.embed(p.word_embeddings, tokens.input_ids, config.pad_token_id) if tokens.inputs_embeds is None else tokens.inputs_embeds
    words = probe("embeddings.word_embeddings", words)
    type_ids = tokens.token_type_ids
    if type_ids is None:  # HF: zeros
        type_ids = jnp.zeros(words.shape[:2], jnp.int32)
    types = probe("embeddings.token_type_embeddings", nn.embed(p.token_type_embeddings, type_ids))
    x = probe("embeddings.LayerNorm", nn.layer_norm(p.LayerNorm, words + types, config.layer_norm_eps))
    x = probe.dropout("embeddings.dropout", x, config.hidden_dropout_prob)
    if project is not None:
        x = nn.linear(project, x)
    return probe("embeddings_project", x)  # the encoder's input (the dropped LayerNorm without a projection)


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


def sinusoidal_positions(table: Float[Array, "P H"], positions: Int[Array, "T"]):
    """Rows of the table at positions -> (sin, cos) [T, H], each repeated pairwise
    ([s0, s0, s1, s1, ...]) as HF's `apply_rotary_position_embeddings` builds sin_pos/cos_pos."""
    rows = jnp.take(table, positions, axis=0)  # [T, H]
    sin, cos = jnp.split(rows, 2, axis=-1)  # [T, H/2] each
    return jnp.repeat(sin, 2, axis=-1), jnp.repeat(cos, 2, axis=-1)


def rotate_pairs(x: Float[Array, "... H"]) -> Float[Array, "... H"]:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] on the last axis."""
    return jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)


def apply_rotary(x: Float[Array, "B T N H"], sin: Float[Array, "T H"], cos: Float[Array, "T H"]):
    """x rotated by sin/cos (pairwise layout): x * cos + rotate_pairs(x) * sin."""
    return x * cos[:, None, :] + rotate_pairs(x) * sin[:, None, :]


def attention(p: RoFormerSelfAttention, config: RoFormerConfig, x: Float[Array, "B T D"], sin: Float[Array, "T H"],
              cos: Float[Array, "T H"], mask: Mask, probe: Probe = OFF, kv: LayerKV | None = None,
              fast: bool = False) -> LayerOut:
    """HF `RoFormerSelfAttention`: rotary q/k (and v with rotary_value), dropout(softmax(q k^T /
    sqrt(H) + mask)) v -> context [B, T, D]. Rotated k and v are what the cache holds (as HF's)."""
    B, T, D = x.shape
    N, H = config.num_attention_heads, config.head_dim
    q, k, v = (probe(f"attention.self.{name}", nn.linear(w, x)).reshape(B, T, N, H)  # [B, T, N, H]
               for name, w in (("query", p.query), ("key", p.key), ("value", p.value)))
    q_rot = probe("attention.self.q_rot", apply_rotary(q, sin, cos))
    k_rot = probe("attention.self.k_rot", apply_rotary(k, sin, cos))
    v_rot = probe("attention.self.v_rot", apply_rotary(v, sin, cos) if config.rotary_value else v)
    keys, values = k_rot, v_rot
    if kv is not None:
        kv = cache_lib.write_layer(kv, k_rot, v_rot, mask.start)
        keys, values = kv  # [B, S, N, H]
    # HF: one additive finfo.min mask (pad keys, and future keys when is_decoder); HF divides
    # the scores by sqrt(H), we multiply by 1/sqrt(H): equal up to one rounding.
    scale = 1.0 / math.sqrt(H)
    if fast:  # jax.nn.dot_product_attention; no probabilities (ref/attention.py)
        causal = jnp.ones((T, keys.shape[1]), bool) if mask.causal is None else mask.causal
        context, probs = attn_lib.fast_attention(q_rot, keys, values, mask.key_valid, causal, scale,
                                                 mask.filled), None
    else:
        context, probs, _ = attn_lib.softmax_attention(
            q_rot, keys, values, mask.key_valid, mask.causal, scale, future_fill=FUTURE_FINFO_MIN, filled=mask.filled,
            scores_hook=lambda s: probe("attention.self.scores", s),
            probs_hook=lambda w: probe("attention.self.probs", probe.dropout(
                "attention.self.dropout", w, config.attention_probs_dropout_prob)))
    context = probe("attention.self.context", context)
    return LayerOut(context.reshape(B, T, D), probs, kv)


def layer(p: RoFormerLayer, config: RoFormerConfig, x: Float[Array, "B T D"], sin: Float[Array, "T H"],
          cos: Float[Array, "T H"], mask: Mask, probe: Probe = OFF, kv: LayerKV | None = None,
          fast: bool = False) -> LayerOut:
    """HF `RoFormerLayer` (post-LN); p holds ONE layer's params (the scan slices the stack), and
    `probe` is this layer's (`probe.layer`): "" names the layer's own output (HF `encoder.layer.{i}`).
    Each branch's dropout acts between its dense and the residual sum, as HF's."""
    eps, rate = config.layer_norm_eps, config.hidden_dropout_prob
    a = attention(p.attention.self_attention, config, x, sin, cos, mask, probe, kv, fast)
    attn_dense = probe("attention.output.dense", nn.linear(p.attention.output.dense, a.x))
    attn_dense = probe.dropout("attention.output.dropout", attn_dense, rate)
    attn_out = probe("attention.output.LayerNorm",  # HF RoFormerSelfOutput
                     nn.layer_norm(p.attention.output.LayerNorm, attn_dense + x, eps))
    inter = probe("intermediate.dense", nn.linear(p.intermediate.dense, attn_out))  # [B, T, F]
    act = probe("intermediate.intermediate_act_fn", nn.ACT2FN[config.hidden_act](inter))
    out_dense = probe("output.dense", nn.linear(p.output.dense, act))
    out_dense = probe.dropout("output.dropout", out_dense, rate)
    out = probe("", nn.layer_norm(p.output.LayerNorm, out_dense + attn_out, eps))  # HF RoFormerOutput
    return LayerOut(out, a.probs, a.kv, probe.recorded)


def model(p: RoFormerBody, config: RoFormerConfig, tokens: Tokens, cache: KVCache | None = None, *,
          probe: Probe = OFF, fast: bool = False, remat: bool = False) -> Body:
    """HF `RoFormerModel`. Positions are 0..T-1 (cache.length.. with a cache) for every row,
    as HF's `embed_positions(shape, past_key_values_length)`. With a cache, attention_mask
    covers only the new tokens. No final norm: the last layer's output is last_hidden_state.
    `probe` (ref/probe.py): taps, patches and dropout of this call (default: none of them)."""
    B, T = tokens.shape
    mask = attn_lib.mask_for(tokens.attention_mask, B, T, cache, causal=config.is_decoder)
    x = embed(p.embeddings, p.embeddings_project, config, tokens, probe)  # [B, T, D]
    table = jax.lax.stop_gradient(p.encoder.embed_positions.table)  # HF: a fixed table, read under no_grad
    sin, cos = sinusoidal_positions(table.astype(x.dtype), mask.slots)  # [T, H]
    sin, cos = probe("encoder.embed_positions.sin", sin), probe("encoder.embed_positions.cos", cos)
    stack = layers.run_stack(
        lambda lp, i, x, kv: layer(lp, config, x, sin, cos, mask, probe.layer("encoder.layer", i), kv, fast),
        x, p.encoder.layer, None if cache is None else cache.layers, remat=remat, taps=probe.taps)
    return Body(last_hidden_state=stack.x, hidden_states=layers.hidden_states(stack, stack.x),
                attentions=stack.attentions,
                cache=None if cache is None else cache_lib.updated(cache, stack.kv, mask.key_valid, T),
                taps={**probe.recorded, **layers.prefixed_taps("encoder.layer", stack.taps)} if probe.taps else None)


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


# HF's nn.Dropout modules (HF module paths: the base model's, then the heads'), the sites of
# `forward(..., train=True)`, with the config rate each one uses. RoFormer's heads read
# hidden_dropout_prob (never classifier_dropout). RoFormerClassificationHead calls its one
# `dropout` module twice, a fresh mask each time: "{i}" there counts the calls (0: on the
# first token's state, 1: after the activation), as it counts layers elsewhere.
DROPOUT = {
    "embeddings.dropout": lambda c: c.hidden_dropout_prob,
    "encoder.layer.{i}.attention.self.dropout": lambda c: c.attention_probs_dropout_prob,
    "encoder.layer.{i}.attention.output.dropout": lambda c: c.hidden_dropout_prob,
    "encoder.layer.{i}.output.dropout": lambda c: c.hidden_dropout_prob,
    "classifier.dropout.{i}": lambda c: c.hidden_dropout_prob,  # RoFormerForSequenceClassification
    "sequence_summary.first_dropout": lambda c: c.summary_first_dropout,  # RoFormerForMultipleChoice
    "sequence_summary.last_dropout": lambda c: c.summary_last_dropout,
    "dropout": lambda c: c.hidden_dropout_prob,  # RoFormerForTokenClassification
}


# ---------------------------------------------------------------------------------------
# HF classes: RoFormerFor{MaskedLM,CausalLM,SequenceClassification,MultipleChoice,
# TokenClassification,QuestionAnswering} (the shared ones live in ref/heads.py)
# ---------------------------------------------------------------------------------------


def lm_head(params: RoFormerParams, config: RoFormerConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """HF `RoFormerOnlyMLMHead`: LN(act(dense(h))) [.., E], then the decoder (tied: the word
    embeddings [V, E]) plus its bias [V]. -> logits [..., T, V]"""
    p = params.predictions
    h = nn.ACT2FN[config.hidden_act](nn.linear(p.transform.dense, hidden))
    h = nn.layer_norm(p.transform.LayerNorm, h, config.layer_norm_eps)
    return {"logits": heads.lm_logits(p.decoder, params.roformer.embeddings.word_embeddings.table, h) + p.bias}


def sequence_classification(params: RoFormerParams, config: RoFormerConfig, hidden, batch,
                            probe: Probe = OFF) -> dict:
    """HF `RoFormerClassificationHead`: out_proj(drop(act(dense(drop(h[:, 0]))))), the first
    token; both drops are the head's one `dropout` module, called twice. [B, num_labels]"""
    p = params.classifier
    calls = [probe.layer("classifier.dropout", call) for call in (0, 1)]  # "classifier.dropout.{i}"
    x = calls[0].dropout("", shell.first_token(hidden), config.hidden_dropout_prob)
    x = nn.ACT2FN[config.hidden_act](nn.linear(p.dense, x))
    x = calls[1].dropout("", x, config.hidden_dropout_prob)
    if probe.taps and all("" in call.recorded for call in calls):  # the keep-masks, stacked by call [2, B, D]
        probe.recorded["classifier.dropout"] = jnp.stack([call.recorded[""] for call in calls])
    return {"logits": nn.linear(p.out_proj, x)}


def multiple_choice(params: RoFormerParams, config: RoFormerConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """HF `RoFormerSequenceSummary` over the flattened choices [B*C, T, D] (default "last": the
    last token, padded or not), then Linear(D, 1), viewed as logits [B, C]."""
    pooled = heads.sequence_summary(
        params.sequence_summary, hidden, None, config.summary_type, config.summary_activation,
        first_dropout=lambda x: probe.dropout("sequence_summary.first_dropout", x, config.summary_first_dropout),
        last_dropout=lambda x: probe.dropout("sequence_summary.last_dropout", x, config.summary_last_dropout))
    return {"logits": shell.choice_logits(nn.linear(params.classifier, pooled), batch)}


def token_classification(params: RoFormerParams, config: RoFormerConfig, hidden, batch, probe: Probe = OFF) -> dict:
    hidden = probe.dropout("dropout", hidden, config.hidden_dropout_prob)
    return {"logits": nn.linear(params.classifier, hidden)}  # [B, T, num_labels]


def question_answering(params: RoFormerParams, config: RoFormerConfig, hidden, batch, probe: Probe = OFF) -> dict:
    return heads.span_logits(params.qa_outputs, hidden)  # start_logits, end_logits [B, T]


def check_cache(config: RoFormerConfig, tokens: Tokens, cache) -> None:
    if cache is not None and not config.is_decoder:
        raise ValueError("a KV cache needs config.is_decoder=True: a bidirectional RoFormer recomputes every "
                         "token's state when a token is added (HF uses no cache then either)")


CLASSES = shell.Classes(
    family="roformer",
    heads={
        "RoFormerModel": Head("base"),
        "RoFormerForMaskedLM": Head("masked_lm", lm_head),
        "RoFormerForCausalLM": Head("causal_lm", lm_head),
        "RoFormerForSequenceClassification": Head("sequence", sequence_classification),
        "RoFormerForMultipleChoice": Head("choice", multiple_choice, choices="required"),
        "RoFormerForTokenClassification": Head("token", token_classification),
        "RoFormerForQuestionAnswering": Head("qa", question_answering),
    },
    # HF's RoFormer takes no position_ids: positions are the token's slot
    inputs=("input_ids", "attention_mask", "token_type_ids", "inputs_embeds", "labels", "start_positions",
            "end_positions"),
    limits=lambda c: shell.Limits(embed_width=c.embedding_size, positions=c.max_position_embeddings,
                                  type_vocab=c.type_vocab_size),
    check=check_cache,
)


def forward(params: RoFormerParams, config: RoFormerConfig, input_ids=None, attention_mask=None, *,
            cache: KVCache | None = None, output_hidden_states: bool = False, output_attentions: bool = False,
            taps: bool = False, patch=None, train: bool = False, key=None, dropout_masks=None, fast: bool = False,
            remat: bool = False, **inputs) -> heads.Output:
    """Any HF RoFormer class, chosen by `config.architecture`; returns HF's output fields.

    inputs: HF's names, `token_type_ids`, `inputs_embeds`, `labels`, `start_positions`,
    `end_positions` (lists, numpy or jax). RoFormerForMultipleChoice takes input_ids
    [B, C, T] (inputs_embeds [B, C, T, E]) and labels [B]; its logits are [B, C] and hidden
    states [L + 1, B*C, T, D] (HF flattens). A cache needs `config.is_decoder` (HF caches
    only then). `taps=True`: every named intermediate (TAPS); `patch={name: fn or array}`
    replaces one (ref/probe.py); `train=True` with `key` (or `dropout_masks` keyed by DROPOUT
    sites): HF's training-mode dropout. `fast=True` uses `jax.nn.dot_product_attention` (no
    attentions, taps, patches or dropout); `remat=True` recomputes each layer in the backward pass.
    """
    batch = shell.prepare(CLASSES, config, dict(input_ids=input_ids, attention_mask=attention_mask, **inputs),
                          cache=cache, fast=fast, taps=taps, output_attentions=output_attentions, patch=patch,
                          train=train)
    probe = Probe.for_call("roformer", TAPS + tuple(DROPOUT), config.num_hidden_layers, taps=taps, patch=patch,
                           train=train, key=key, masks=dropout_masks)
    body = model(params.roformer, config, batch.tokens, cache, probe=probe, fast=fast, remat=remat)
    return shell.finish(CLASSES, params, config, batch, body, output_hidden_states=output_hidden_states,
                        output_attentions=output_attentions, probe=probe)


def unstack_layers(params: RoFormerParams) -> RoFormerParams:
    """The same params with the layers as a tuple, for decoding (see ref/layers.py)."""
    return layers.unstack_at(params, lambda p: p.roformer.encoder.layer)


def init_cache(config: RoFormerConfig, batch: int, max_length: int, dtype) -> KVCache:
    """An empty KV cache for `generate` (RoFormerForCausalLM with is_decoder): [L, B, S, N, H]."""
    return cache_lib.init_cache(config.num_hidden_layers, batch, max_length, config.num_attention_heads,
                                config.head_dim, dtype)
