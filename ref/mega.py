"""MEGA (Ma et al. 2022, "Mega: Moving Average Equipped Gated Attention"), as HF 4.57.6 runs it.

Mirrors `transformers/models/deprecated/mega/modeling_mega.py`: in eval mode by default, in
HF's training mode with `train=True` (its dropout sites: `DROPOUT`, feature dropout
included). HF works sequence-first [T, B, D]; refjax batch-first. One MEGA layer (paper eqs. 8-18, HF `MegaMovingAverageGatedAttention` +
`MegaNormalizedFeedForwardNetwork`):

    h = norm(x)                                  (if normalize_before_mega)
    v = act(v_proj(h))                           [B, T, E]
    e = silu(EMA(h) + omega * h)                 [B, T, D]   (the EMA: ref/mega_ema.py)
    r, (qk, gate), z = split(mx_proj(e))         sigmoid r; silu qk and gate
    q, k = qk * qk_weight + qk_bias              [B, T, Z] each
    o = act(z + h_proj(attention(q, k, v) * gate))   (chunked single-head attention: ref/mega_attention.py)
    x = x + r * (o - x)                          (then norm(x) if post-norm)
    x = x + fc2(act(fc1(norm(x))))               (normalized FFN, if use_normalized_ffn)

The math core reads top to bottom: norm -> gated attention -> normalized FFN -> block ->
model; then MEGA's cache, the HF classes (heads) as data, and `forward`. Shapes: B batch,
T tokens, S key slots, D hidden_size, E intermediate_size (values), Z
shared_representation_size (queries, keys), N ema_projection_size, L layers, V vocab.
Attention weights are per chunk, [B, C, T, S] with C chunks (C = 1 without chunking).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from refjax import heads, layers, mega_attention, mega_ema, nn, shell
from refjax.cache import write_slots
from refjax.layers import LayerOut
from refjax.params.common import Embedding, Linear
from refjax.params.mega import MegaBody, MegaConfig, MegaFFN, MegaGatedAttention, MegaLayer, MegaNorm, MegaParams
from refjax.probe import OFF, Probe
from refjax.shell import Body, Head, Tokens

NORM_EPS = 1e-5  # HF MegaSequenceNorm passes eps=1e-5 to every norm type


def sequence_norm(p: MegaNorm, config: MegaConfig, x: Float[Array, "B T D"],
                  train: bool = False) -> Float[Array, "B T D"]:
    """HF `MegaSequenceNorm` over the last axis (eval mode; `train`: HF's training mode).

    scalenorm: (scalar * x) / sqrt(mean(x^2) + eps)  (one learned scalar).
    rmsnorm: HF's `MegaRMSNorm` discards its normalisation (`input * rsqrt(...)` is computed
        and thrown away), so it returns x * weight; reproduced, not fixed.
    layernorm: torch.nn.LayerNorm. batchnorm / syncbatchnorm: eval mode uses the running
        statistics, (x - running_mean) / sqrt(running_var + eps) * weight + bias; SyncBatchNorm
        is the same in eval (it synchronises only training-time batch statistics). In training
        both use the statistics of this batch, every position (pads included) of every
        sequence, biased variance; the running statistics they would update are not returned.
    """
    t = config.normalization_type
    if t == "scalenorm":
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        if p.weight is not None:
            x = p.weight * x
        return x * jax.lax.rsqrt(mean_square + NORM_EPS)
    if t == "rmsnorm":
        return x if p.weight is None else x * p.weight
    if t == "layernorm":
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + NORM_EPS)
    elif train:  # batchnorm, syncbatchnorm (one process: its own batch)
        mean = x.mean((0, 1))
        y = (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean((0, 1)) + NORM_EPS)
    else:
        y = (x - p.running_mean) * jax.lax.rsqrt(p.running_var + NORM_EPS)
    if p.weight is not None:
        y = y * p.weight + p.bias
    return y


def mega_dropout(probe: Probe, config: MegaConfig, site: str, x: Array, rate: float) -> Array:
    """HF `MegaDropout(rate, is_featurewise=config.use_feature_dropout)` at `site`.

    Featurewise, HF calls `F.dropout2d`, which draws one keep per [N, C] of its input and
    broadcasts it over the rest; the keep-mask is recorded (and replayed) in that shape,
    batch-first like every refjax mask:
    - a sequence-first [T, B, D] input is permuted to [B, D, T]: one draw per (batch,
      feature channel), here [B, 1, D];
    - the values (`batch_first=True`, chunked [B, C, t, E]) are transposed to [B, C, E, t]:
      one draw per (batch, chunk), [B, C, 1, 1], so HF drops whole chunks of values rather
      than feature channels; reproduced as HF runs it."""
    if not config.use_feature_dropout:
        return probe.dropout(site, x, rate)
    shape = (x.shape[0], 1, x.shape[2]) if x.ndim == 3 else (*x.shape[:2], *(1,) * (x.ndim - 2))
    return probe.dropout(site, x, rate, shape)


def gated_attention(p: MegaGatedAttention, config: MegaConfig, x: Float[Array, "B T D"], mask: Array | None,
                    probe: Probe = OFF, cache: MegaLayerCache | None = None,
                    start: Int[Array, ""] | None = None) -> LayerOut:
    """HF `MegaMovingAverageGatedAttention.forward`; mask [B, T] (1 = real token) or None.
    With a cache this call's keys and values fill slots [start, start + T) and one new
    token attends over every slot (HF's incremental step). `probe` is this layer's: its
    taps and HF's four dropout calls (its `dropout` module is called twice: ".0", ".1")."""
    B, T, D = x.shape
    E, Z = config.intermediate_size, config.shared_representation_size
    act = nn.ACT2FN[config.activation]
    h = sequence_norm(p.norm, config, x, probe.train) if config.normalize_before_mega else x
    value = act(nn.linear(p.v_proj, h))  # [B, T, E]
    ema_out, state = mega_ema.gate(p.ema_gate, config, h, mask, None if cache is None else cache.ema_state)
    ema_out = probe("mega_layer.ema_gate", ema_out)
    ema_out = mega_dropout(probe, config, "mega_layer.dropout.0", ema_out, config.dropout_prob)
    base = nn.linear(p.mx_proj, ema_out)  # [B, T, D + Z + E + D]
    residual_weight = jax.nn.sigmoid(base[..., :D])
    qk_gates = jax.nn.silu(base[..., D:D + Z + E])
    intermediate = base[..., D + Z + E:]
    query_key, attention_gate = qk_gates[..., :Z], qk_gates[..., Z:]
    q = query_key * p.qk_weight[0] + p.qk_bias[0]  # [B, T, Z]
    k = query_key * p.qk_weight[1] + p.qk_bias[1]
    if cache is not None:
        cache = MegaLayerCache(write_slots(cache.keys, k, start), write_slots(cache.values, value, start), state)
    if cache is not None and T == 1:
        new_valid = jnp.ones((B, 1), bool) if mask is None else mask.astype(bool)
        weights = probe("mega_layer.attn_weights", mega_attention.decode_weights(
            p.rel_pos_bias, config, q, cache.keys, new_valid, start))  # [B, 1, 1, S]
        context = jnp.einsum("bcts,bse->bcte", weights, cache.values)  # inference only: no dropout (forward)
    else:  # a whole sequence, or a cache's prefill (queries see only this call's tokens)
        causal = None
        if config.is_decoder:
            n = T if not config.use_chunking else config.chunk_size
            causal = jnp.tril(jnp.ones((n, n), bool))
        q_c, k_c, v_c = (mega_attention.chunked(a, config) for a in (q, k, value))  # [B, C, T / C, ...]
        mask_c = None if mask is None else mega_attention.chunked(mask, config)
        weights = probe("mega_layer.attn_weights", mega_attention.weights(p.rel_pos_bias, config, q_c, k_c, mask_c,
                                                                          causal))
        # HF drops the chunked values and the weights; it returns the weights before their dropout
        v_c = mega_dropout(probe, config, "mega_layer.hidden_dropout", v_c, config.hidden_dropout_prob)
        kernel = probe.dropout("mega_layer.attention_dropout", weights, config.attention_probs_dropout_prob)
        context = jnp.einsum("bcts,bcse->bcte", kernel, v_c)
    hidden = act(intermediate + nn.linear(p.h_proj, context.reshape(B, T, E) * attention_gate))  # [B, T, D]
    hidden = mega_dropout(probe, config, "mega_layer.dropout.1", hidden, config.dropout_prob)
    out = x + residual_weight * (hidden - x)
    if not config.normalize_before_mega:
        out = sequence_norm(p.norm, config, out, probe.train)
    return LayerOut(probe("mega_layer", out), weights, cache)


def normalized_ffn(p: MegaFFN, config: MegaConfig, x: Float[Array, "B T D"], probe: Probe = OFF) -> Float[Array, "B T D"]:
    """HF `MegaNormalizedFeedForwardNetwork`: x + drop(fc2(drop(act(fc1(norm(x)))))) (pre- or post-norm)."""
    h = sequence_norm(p.norm, config, x, probe.train) if config.normalize_before_ffn else x
    a = nn.ACT2FN[config.activation](nn.linear(p.fc1, h))  # [B, T, F]
    a = mega_dropout(probe, config, "nffn.hidden_dropout", a, config.nffn_activation_dropout_prob)
    out = mega_dropout(probe, config, "nffn.dropout", nn.linear(p.fc2, a), config.dropout_prob) + x
    return out if config.normalize_before_ffn else sequence_norm(p.norm, config, out, probe.train)


def block(p: MegaLayer, config: MegaConfig, x: Float[Array, "B T D"], mask: Array | None, probe: Probe = OFF,
          cache: MegaLayerCache | None = None, start: Int[Array, ""] | None = None) -> LayerOut:
    """HF `MegaBlock` (no cross-attention); p holds ONE layer's params and `probe` is this
    layer's (`probe.layer`): "" names the block's output (HF `layers.{i}`). HF's residuals
    live inside its modules: `mega_layer` and `nffn` each return x + their branch."""
    a = gated_attention(p.mega_layer, config, x, mask, probe, cache, start)
    # "nffn" is the mega_layer output again when use_normalized_ffn is false
    out = probe("nffn", a.x if p.nffn is None else normalized_ffn(p.nffn, config, a.x, probe))
    return LayerOut(probe("", out), a.probs, a.kv, probe.recorded)


def embed(word_embeddings: Embedding, token_type_embeddings: Embedding | None, tokens: Tokens,
          pad_token_id: int | None) -> Float[Array, "B T D"]:
    """HF `MegaEmbeddings`: word [+ token type] embeddings; no positions (they enter only
    through the EMA and the relative bias). The pad row gets no gradient (HF's padding_idx)."""
    x = nn.embed(word_embeddings, tokens.input_ids, pad_token_id) if tokens.inputs_embeds is None else tokens.inputs_embeds
    if token_type_embeddings is not None:
        B, T = tokens.shape
        types = jnp.zeros((B, T), jnp.int32) if tokens.token_type_ids is None else tokens.token_type_ids
        x = x + nn.embed(token_type_embeddings, types)
    return x


def pool(p: Linear, hidden: Float[Array, "B T D"]) -> Float[Array, "B D"]:
    """HF `MegaPooler`: tanh(dense(first token))."""
    return jnp.tanh(nn.linear(p, shell.first_token(hidden)))


def model(p: MegaBody, config: MegaConfig, tokens: Tokens, cache: MegaCache | None = None, *,
          probe: Probe = OFF, remat: bool = False) -> Body:
    """HF `MegaModel`: no embedding dropout, no final norm, the last layer's output is
    last_hidden_state. With a cache, attention_mask covers only the new tokens. `probe`
    (ref/probe.py): taps, patches and dropout of this call (default: none of them)."""
    x = probe("embedding_layer", embed(p.word_embeddings, p.token_type_embeddings, tokens, config.pad_token_id))  # [B, T, D]
    start = None if cache is None else cache.length
    stack = layers.run_stack(
        lambda layer, i, x, kv: block(layer, config, x, tokens.attention_mask, probe.layer("layers", i), kv, start),
        x, p.layers, None if cache is None else cache.layers, remat=remat, taps=probe.taps)
    return Body(last_hidden_state=stack.x, hidden_states=layers.hidden_states(stack, stack.x),
                attentions=stack.attentions,
                cache=None if cache is None else updated(cache, stack.kv, tokens.shape[1]),
                taps={**probe.recorded, **layers.prefixed_taps("layers", stack.taps)} if probe.taps else None,
                pooler_output=None if p.pooler is None else pool(p.pooler, stack.x))


# Every tap `forward(..., taps=True)` returns, in dataflow order ({i} = layer index). The
# taps dict stacks per-layer taps [L, ...] under the name without ".{i}" (the layer outputs
# under "layers"). Names are HF module paths (docs/taps.md).
TAPS = ("embedding_layer", "layers.{i}.mega_layer.ema_gate", "layers.{i}.mega_layer.attn_weights",
        "layers.{i}.mega_layer", "layers.{i}.nffn", "layers.{i}")


def classifier_rate(c: MegaConfig) -> float:
    """HF's classification heads: classifier_dropout, else hidden_dropout_prob."""
    return c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout


# HF's dropout calls (HF module paths: the base model's, then the heads'), the sites of
# `forward(..., train=True)`, with the config rate each one uses, in HF's call order. The
# layers' `MegaDropout` modules are featurewise with use_feature_dropout (masks: `mega_dropout`);
# a module HF calls twice has one site per call, ".0" and ".1". MegaEmbeddings has no dropout,
# and MegaForMaskedLM's `dropout` module is never called.
DROPOUT = {
    "layers.{i}.mega_layer.dropout.0": lambda c: c.dropout_prob,  # the EMA gate's output
    "layers.{i}.mega_layer.hidden_dropout": lambda c: c.hidden_dropout_prob,  # the (chunked) values
    "layers.{i}.mega_layer.attention_dropout": lambda c: c.attention_probs_dropout_prob,  # never featurewise
    "layers.{i}.mega_layer.dropout.1": lambda c: c.dropout_prob,  # the attention output, before the gated residual
    "layers.{i}.nffn.hidden_dropout": lambda c: c.nffn_activation_dropout_prob,  # act(fc1(x))
    "layers.{i}.nffn.dropout": lambda c: c.dropout_prob,  # fc2's output, before the residual
    "classifier.dropout.0": classifier_rate,  # MegaClassificationHead: its one module, before dense
    "classifier.dropout.1": classifier_rate,  # and again before out_proj
    # MegaForMultipleChoice (on the pooled output): hidden_dropout_prob; MegaForTokenClassification: classifier's
    "dropout": lambda c: c.hidden_dropout_prob if c.architecture == "MegaForMultipleChoice" else classifier_rate(c),
}


# ---------------------------------------------------------------------------------------
# Cache: MEGA's own (keys, values and the EMA state), passed in and returned, never stored
# ---------------------------------------------------------------------------------------


class MegaLayerCache(NamedTuple):
    """One layer's decoding state (stacked [L, ...] in `MegaCache`): HF's self_key,
    self_value (preallocated here) and self_ema_state."""

    keys: jax.Array  # [B, S, Z]
    values: jax.Array  # [B, S, E]
    ema_state: jax.Array  # [B, D, N]


class MegaCache(eqx.Module):
    """Incremental decoding state: keys [L, B, S, Z], values [L, B, S, E], ema_state
    [L, B, D, N] (the EMA state after the last token) and length [] (slots filled)."""

    keys: jax.Array | tuple[jax.Array, ...]  # or L x [B, S, Z] (per_layer), likewise values and ema_state
    values: jax.Array | tuple[jax.Array, ...]
    ema_state: jax.Array | tuple[jax.Array, ...]
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[1]  # layer 0's [B, S, Z], stacked or per layer

    @property
    def layers(self) -> MegaLayerCache:
        """Per-layer state, stacked [L, ...] (what the layer scan slices) or tuples."""
        return MegaLayerCache(self.keys, self.values, self.ema_state)

    def per_layer(self) -> "MegaCache":
        """The same cache with every per-layer state as a tuple of per-layer buffers (what
        `generate` decodes with on unstacked layers: see ref/cache.py)."""
        return dataclasses.replace(self, keys=tuple(self.keys), values=tuple(self.values),
                                   ema_state=tuple(self.ema_state))


def updated(cache: MegaCache, kv: MegaLayerCache, new_tokens: int) -> MegaCache:
    """The cache after a call that wrote `new_tokens` slots: the stack's new per-layer state."""
    return MegaCache(keys=kv.keys, values=kv.values, ema_state=kv.ema_state, length=cache.length + new_tokens)


def check_cache_support(config: MegaConfig) -> None:
    """HF caches only decoders with a one-directional EMA and no chunking; refuse the rest."""
    if not config.is_decoder:
        raise ValueError("MEGA caches only decoders (config.is_decoder=true); HF ignores use_cache otherwise")
    if config.bidirectional:
        raise ValueError("a bidirectional EMA cannot decode incrementally (config.bidirectional=true; HF raises "
                         "'Bidirectional EMA does not support incremental state')")
    if config.use_chunking:
        raise ValueError("HF MEGA's incremental decoding does not work with config.use_chunking=true (its causal "
                         "mask has chunk_size rows and fails against a one-token query); refjax refuses it")


def init_cache(config: MegaConfig, batch: int, max_length: int, dtype) -> MegaCache:
    """An empty cache for `max_length` tokens."""
    check_cache_support(config)
    L, D, N = config.num_hidden_layers, config.hidden_size, config.ema_projection_size
    return MegaCache(keys=jnp.zeros((L, batch, max_length, config.shared_representation_size), dtype),
                     values=jnp.zeros((L, batch, max_length, config.intermediate_size), dtype),
                     ema_state=jnp.zeros((L, batch, D, N), dtype), length=jnp.zeros((), jnp.int32))


def unstack_layers(params: MegaParams) -> MegaParams:
    """The same params with the layers as a tuple, for decoding (see ref/layers.py)."""
    return layers.unstack_at(params, lambda p: p.mega.layers)


# ---------------------------------------------------------------------------------------
# HF classes: MegaModel, MegaFor{CausalLM,MaskedLM,SequenceClassification,MultipleChoice,
# TokenClassification,QuestionAnswering}
# ---------------------------------------------------------------------------------------


def lm_logits(params: MegaParams, config: MegaConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """HF's LM heads: optional tanh(dense(h)) (add_lm_hidden_dense_layer), then the vocab
    projection, tied to the word embeddings [V, D] when tie_word_embeddings; the bias [V] is
    always its own. -> logits [B, T, V]"""
    if params.dense is not None:
        hidden = jnp.tanh(nn.linear(params.dense, hidden))
    if params.lm_head.kernel is None:
        return {"logits": heads.lm_logits(None, params.mega.word_embeddings.table, hidden) + params.lm_head.bias}
    return {"logits": nn.linear(params.lm_head, hidden)}


def sequence_classification(params: MegaParams, config: MegaConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """HF `MegaClassificationHead`: out_proj(drop(tanh(dense(drop(h[:, 0]))))), the <s>
    token; both drops are the head's one `dropout` module, called twice. [B, num_labels]"""
    p, rate = params.classifier, classifier_rate(config)
    x = probe.dropout("classifier.dropout.0", shell.first_token(hidden), rate)
    x = probe.dropout("classifier.dropout.1", jnp.tanh(nn.linear(p.dense, x)), rate)
    return {"logits": nn.linear(p.out_proj, x)}


def multiple_choice(params: MegaParams, config: MegaConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """HF `MegaForMultipleChoice`: the pooled output [B*C, D], dropped, -> Linear(D, 1), viewed [B, C]."""
    pooled = probe.dropout("dropout", pool(params.mega.pooler, hidden), config.hidden_dropout_prob)
    return {"logits": shell.choice_logits(nn.linear(params.classifier, pooled), batch)}


def token_classification(params: MegaParams, config: MegaConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """classifier(dropout(h)) [B, T, num_labels]; HF's rate: classifier_dropout, else hidden_dropout_prob."""
    return {"logits": nn.linear(params.classifier, probe.dropout("dropout", hidden, classifier_rate(config)))}


def question_answering(params: MegaParams, config: MegaConfig, hidden, batch, probe: Probe = OFF) -> dict:
    return heads.span_logits(params.qa_outputs, hidden)  # start_logits, end_logits [B, T]


def check_sequence(config: MegaConfig, T: int, cache: MegaCache | None) -> None:
    """Length rules HF enforces (or fails on with a shape error): chunking splits the input into
    chunk_size pieces; the simple bias reaches bias_positions tokens; a cache takes one token
    at a time after the first call."""
    C = config.chunk_size
    if config.use_chunking:
        if T > C and T % C:
            raise ValueError(f"input sequence length ({T}) must be at most or a multiple of config.chunk_size ({C}) "
                             "when config.use_chunking is true (HF fails on this input)")
        if config.is_decoder and T % C:
            raise ValueError(f"input sequence length ({T}) must be a multiple of config.chunk_size ({C}) for a "
                             "chunked decoder (HF's causal mask has chunk_size rows and fails on this input)")
    window = min(T, C) if config.use_chunking else T
    if cache is not None:
        filled = int(cache.length) if nn.is_concrete(cache.length) else 0
        if filled and T != 1:
            raise ValueError(f"with a non-empty cache, input_ids must hold exactly one new token (HF's incremental "
                             f"decoding only supports length 1), got {T}")
        window = filled + T
    if config.relative_positional_bias == "simple" and window > config.bias_positions:
        what = "chunk_size" if config.chunk_size >= 0 else "max_positions"
        raise ValueError(f"sequence length {window} goes beyond the simple relative position bias "
                         f"(config.{what}={config.bias_positions})")


def check_inputs(config: MegaConfig, tokens: Tokens, cache: MegaCache | None) -> None:
    """MEGA's rules on top of the shared ones: token types need their table, a cache needs a
    decoder HF can cache, and `check_sequence`."""
    if tokens.token_type_ids is not None and not config.add_token_type_embeddings:
        raise ValueError("token_type_ids given, but config.add_token_type_embeddings is false (the model has no "
                         "token type embeddings; HF would ignore them)")
    if cache is not None:
        check_cache_support(config)
    check_sequence(config, tokens.shape[1], cache)


CLASSES = shell.Classes(
    family="mega",
    heads={
        "MegaModel": Head("base"),  # pooler_output from the model's pooler
        "MegaForCausalLM": Head("causal_lm", lm_logits),
        "MegaForMaskedLM": Head("masked_lm", lm_logits),
        "MegaForSequenceClassification": Head("sequence", sequence_classification),
        "MegaForMultipleChoice": Head("choice", multiple_choice, choices="required"),
        "MegaForTokenClassification": Head("token", token_classification),
        "MegaForQuestionAnswering": Head("qa", question_answering),
    },
    # HF's MEGA takes no position_ids: positions enter only through the EMA and the relative bias
    inputs=("input_ids", "attention_mask", "token_type_ids", "inputs_embeds", "labels", "start_positions",
            "end_positions"),
    limits=lambda c: shell.Limits(embed_width=c.hidden_size, type_vocab=c.type_vocab_size),
    check=check_inputs,
)


def forward(params: MegaParams, config: MegaConfig, input_ids=None, attention_mask=None, *,
            cache: MegaCache | None = None, output_hidden_states: bool = False, output_attentions: bool = False,
            taps: bool = False, patch=None, train: bool = False, key=None, dropout_masks=None, fast: bool = False,
            remat: bool = False, **inputs) -> heads.Output:
    """Any HF MEGA class, chosen by `config.architecture`; returns HF's output fields.

    inputs: HF's names, `token_type_ids`, `inputs_embeds`, `labels`, `start_positions`,
    `end_positions` (lists, numpy or jax). MegaForMultipleChoice takes input_ids [B, C, T]
    and labels [B]; its logits are [B, C] (hidden states [L + 1, B*C, T, D], as HF).
    attentions are HF's per-chunk weights [L, B, chunks, T', S'] (chunks = 1 without
    chunking). With a cache (decoders only, see `check_cache_support`), attention_mask
    covers only the new tokens; after the first call, one token per call (HF's incremental
    decoding). `taps=True`: every named intermediate (TAPS); `patch={name: fn or array}`
    replaces one (ref/probe.py); `train=True` with `key` (or `dropout_masks` keyed by DROPOUT
    sites): HF's training-mode dropout (not with a cache: cached decoding is inference only).
    `fast` is accepted for the shared API: MEGA has no fast path. `remat=True` recomputes
    each layer in the backward pass.
    """
    if fast:
        raise ValueError("MEGA has no fast attention path (fast=True); use fast=False")
    if train and cache is not None:
        raise ValueError("train=True with a cache: MEGA's cached decoding (init_cache, generate) is inference only; "
                         "train on whole sequences (cache=None)")
    batch = shell.prepare(CLASSES, config, dict(input_ids=input_ids, attention_mask=attention_mask, **inputs),
                          cache=cache, taps=taps, output_attentions=output_attentions, patch=patch, train=train)
    probe = Probe.for_call("mega", TAPS + tuple(DROPOUT), config.num_hidden_layers, taps=taps, patch=patch, train=train,
                           key=key, masks=dropout_masks)
    body = model(params.mega, config, batch.tokens, cache, probe=probe, remat=remat)
    return shell.finish(CLASSES, params, config, batch, body, output_hidden_states=output_hidden_states,
                        output_attentions=output_attentions, probe=probe)
