"""I-BERT (Kim et al., 2021, "I-BERT: Integer-only BERT Quantization").

Mirrors HF `transformers/models/ibert/modeling_ibert.py`. With `quant_mode=False` it is
RoBERTa: post-LN encoder, exact GELU, positions pad_token_id + 1 + (count of non-pad
tokens so far). With `quant_mode=True` every module is its quantized twin from
`ref/quant.py` and every activation carries its scaling factor: an `Act(x, s)`, x a float
tensor equal to integers * s, s [1] or [D] (None in float mode). `force_dequant`
switches GELU, softmax and/or LayerNorm back to float (`config.quantized(...)`).

The activation ranges (HF's QuantAct buffers) are the explicit state `params.state`,
threaded through the modules as a value (`Quant`: state in, state out); `calibrate` is
HF's train-mode range update as a pure function. Every intermediate passes through a
`Probe` (ref/probe.py: taps, patches, HF's dropout); in quant mode a tap is the tensor of
an (x, s) pair, and a patch replaces the tensor and keeps its scale s. `forward(train=True)`
drops out at HF's sites with the ranges frozen (see `forward`). Beyond HF:
`propagate_scales` hands each layer its input's true scale, and `integer=True` runs
ref/ibert_int.py, the same encoder on integer tensors. Reads top to bottom: quantization
state -> embeddings -> attention -> layer -> model; then the HF classes as data, `forward`
and `calibrate`. Shapes: B batch, T tokens, S keys, D hidden, N heads, H head dim, L
layers (ref/nn.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from refjax import heads, ibert_int, layers, nn, quant, shell
from refjax.params.common import Linear
from refjax.params.ibert import IBertAttentionOutput, IBertBody, IBertConfig, IBertEmbeddings, IBertLayer
from refjax.params.ibert import IBertParams, IBertQuantState, IBertSelfAttention
from refjax.probe import OFF, Probe
from refjax.quant import Act, Quant, act
from refjax.shell import Body, Head, Tokens


# --------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------


def with_defaults(config: IBertConfig, tokens: Tokens) -> Tokens:
    """HF's defaults: token type 0, and RoBERTa positions: pad_token_id + cumsum(non-pad) at
    real tokens, pad_token_id at pads (`create_position_ids_from_input_ids`); with
    inputs_embeds, pad + 1 .. pad + T."""
    B, T = tokens.shape
    pad, ids, position_ids = config.pad_token_id, tokens.input_ids, tokens.position_ids
    if position_ids is None and ids is not None:
        real = (ids != pad).astype(jnp.int32)
        position_ids = jnp.cumsum(real, axis=1, dtype=jnp.int32) * real + pad
    elif position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(pad + 1, T + pad + 1, dtype=jnp.int32), (B, T))
    token_type_ids = jnp.zeros((B, T), jnp.int32) if tokens.token_type_ids is None else tokens.token_type_ids
    return tokens._replace(position_ids=position_ids, token_type_ids=token_type_ids)


def tap(probe: Probe, name: str, a: Act) -> Act:
    """`probe(name, a.x)` for a quantized activation: a patch replaces the tensor, the scale
    stays (a patched x need not be integers * s; the next QuantAct requantizes it)."""
    return Act(probe(name, a.x), a.s)


def embed(p: IBertEmbeddings, config: IBertConfig, q: Quant, tokens: Tokens, probe: Probe = OFF) -> tuple[Quant, Act]:
    """HF `IBertEmbeddings`: words + token types (QuantAct embeddings_act1), + positions
    (embeddings_act1 again: HF never uses embeddings_act2), LayerNorm, dropout, QuantAct."""

    def lookup(table, ids: Int[Array, "B T"], padding_idx: int | None = None) -> Act:
        """QuantEmbedding (an 8-bit table in quant mode). HF's word and position tables have
        padding_idx = pad_token_id: the pad row gets no gradient (same values, stopped)."""
        a = Act(*quant.quant_embedding(table, ids)) if config.quant_mode else Act(jnp.take(table, ids, axis=0))
        return a._replace(x=nn.no_grad_at_padding(a.x, ids, padding_idx))

    pad = config.pad_token_id
    if tokens.inputs_embeds is None:
        words = lookup(p.word_embeddings.table, tokens.input_ids, pad)
    else:
        words = Act(tokens.inputs_embeds)
    words = tap(probe, "embeddings.word_embeddings", words)
    q, x = act(q, "embeddings_act1", 16, words, lookup(p.token_type_embeddings.table, tokens.token_type_ids))
    q, x = act(q, "embeddings_act1", 16, x, lookup(p.position_embeddings.table, tokens.position_ids, pad))
    q, normed = quant.layer_norm(p.LayerNorm, q, "LayerNorm", x)
    normed = tap(probe, "embeddings.LayerNorm", normed)
    dropped = Act(probe.dropout("embeddings.dropout", normed.x, config.hidden_dropout_prob), normed.s)
    q, out = act(q, "output_activation", 8, dropped)
    return q, tap(probe, "embeddings", out)


# --------------------------------------------------------------------------------------
# Encoder layer
# --------------------------------------------------------------------------------------


class Out(NamedTuple):
    """What attention and a layer return."""

    out: Act  # [B, T, D]
    probs: Float[Array, "B N T S"]  # after the attention dropout, as HF returns them


def attention(p: IBertSelfAttention, config: IBertConfig, q: Quant, h: Act, mask_add: Float[Array, "B 1 1 S"],
              probe: Probe = OFF) -> tuple[Quant, Out]:
    """HF `IBertSelfAttention`: quantized q/k/v, scores / sqrt(H) + additive mask,
    IntSoftmax, dropout, probs @ v, requantized context."""
    B, T, D = h.x.shape
    N, H = config.num_attention_heads, config.head_dim
    q, query = act(q, "attention.self.query_activation", 8, quant.linear(p.query, q, h))
    q, key = act(q, "attention.self.key_activation", 8, quant.linear(p.key, q, h))
    q, value = act(q, "attention.self.value_activation", 8, quant.linear(p.value, q, h))
    query, key, value = (tap(probe, f"attention.self.{name}", a) for name, a in
                         (("query", query), ("key", key), ("value", value)))
    heads_of = lambda t: t.reshape(B, T, N, H).transpose(0, 2, 1, 3)  # [B, N, T, H]
    if config.quant_mode:  # torch's summation order, bit for bit (see quant.sequential_dot)
        scores = quant.div(quant.sequential_dot(heads_of(query.x), heads_of(key.x)), math.sqrt(H))  # [B, N, T, S]
        scores_scale = quant.div(query.s * key.s, math.sqrt(H))
    else:
        scores, scores_scale = jnp.einsum("bnth,bnsh->bnts", heads_of(query.x), heads_of(key.x)) / math.sqrt(H), None
    scores = probe("attention.self.scores", scores + mask_add)
    if config.quantized("softmax"):
        # A query whose keys are all padding: HF's scores are all ~finfo.min, which / scale overflows
        # to -inf, and -inf - max = NaN for the whole row. refjax departs from HF there: the row gets
        # equal scores, i.e. uniform attention, as float mode gives it (docs/design.md, I-BERT).
        no_key = jnp.all(mask_add <= jnp.finfo(scores.dtype).min / 2, axis=-1, keepdims=True)
        scores = jnp.where(no_key, jnp.zeros_like(scores), scores)
        q, exp = act(q, "attention.self.softmax.act", 16, Act(*quant.int_softmax_exp(scores, scores_scale)))
        probs = Act(*quant.int_softmax_normalize(exp.x, exp.s))
    else:
        probs = Act(jax.nn.softmax(scores, axis=-1))
    probs = tap(probe, "attention.self.softmax", probs)
    # HF drops the (quantized) probabilities themselves: kept ones become q * s / (1 - p), off
    # the grid of s; the context's QuantAct rounds context / (s * s_v) as HF's does
    probs = Act(probe.dropout("attention.self.dropout", probs.x, config.attention_probs_dropout_prob), probs.s)
    if config.quant_mode:  # calibration reads the unrounded context's min/max: torch's order again
        context = quant.sequential_dot(probs.x, heads_of(value.x).swapaxes(-1, -2), fused=False)  # [B, N, T, H]
    else:
        context = jnp.einsum("bnts,bnsh->bnth", probs.x, heads_of(value.x))
    context = Act(context.transpose(0, 2, 1, 3).reshape(B, T, D), None if probs.s is None else probs.s * value.s)
    q, out = act(q, "attention.self.output_activation", 8, context)
    return q, Out(tap(probe, "attention.self", out), probs.x)


def output(p: IBertAttentionOutput, config: IBertConfig, q: Quant, prefix: str, h: Act, residual: Act,
           probe: Probe = OFF) -> tuple[Quant, Act]:
    """HF `IBertSelfOutput` / `IBertOutput`: dense, dropout, + residual at 22 bits,
    LayerNorm, 8 bits."""
    y = tap(probe, f"{prefix}.dense", quant.linear(p.dense, q, h))
    y = Act(probe.dropout(f"{prefix}.dropout", y.x, config.hidden_dropout_prob), y.s)
    q, r = act(q, f"{prefix}.ln_input_act", 22, y, residual)
    r = tap(probe, f"{prefix}.ln_input_act", r)
    q, normed = quant.layer_norm(p.LayerNorm, q, f"{prefix}.LayerNorm", r)
    normed = tap(probe, f"{prefix}.LayerNorm", normed)
    q, out = act(q, f"{prefix}.output_activation", 8, normed)
    return q, tap(probe, prefix, out)


def layer(p: IBertLayer, config: IBertConfig, q: Quant, h: Act, mask_add: Float[Array, "B 1 1 S"],
          probe: Probe = OFF) -> tuple[Quant, Out]:
    """HF `IBertLayer` (post-LN): attention block, then the requantized FFN block. `probe`
    is this layer's (`probe.layer`): "" names the layer's own output (HF `encoder.layer.{i}`)."""
    q, attn = attention(p.attention_self, config, q, h, mask_add, probe)
    q, a = output(p.attention_output, config, q, "attention.output", attn.out, h, probe)
    q, a = act(q, "pre_intermediate_act", 8, a)
    a = tap(probe, "pre_intermediate_act", a)
    inter = tap(probe, "intermediate.dense", quant.linear(p.intermediate, q, a))  # [B, T, F]
    g = tap(probe, "intermediate.intermediate_act_fn", quant.gelu(q, inter))
    q, i = act(q, "intermediate.output_activation", 8, g)
    q, i = act(q, "pre_output_act", 8, i)
    i = tap(probe, "intermediate", i)  # HF's pre_output_act output (docs/taps.md)
    q, out = output(p.output, config, q, "output", i, a, probe)
    return q, Out(tap(probe, "", out), attn.probs)


# --------------------------------------------------------------------------------------
# Model: the encoder and HF's pooler
# --------------------------------------------------------------------------------------


def pooler(p: Linear, hidden: Float[Array, "B T D"]) -> Float[Array, "B D"]:
    """HF `IBertPooler` (float in both modes): tanh(dense(hidden[:, 0]))."""
    return jnp.tanh(nn.linear(p, shell.first_token(hidden)))


def model(p: IBertBody, config: IBertConfig, state: IBertQuantState, tokens: Tokens, *, training: bool = False,
          probe: Probe = OFF, propagate_scales: bool = False) -> tuple[Body, IBertQuantState]:
    """HF `IBertModel` -> (its outputs, the quantization state after the call: moved only
    when `training`, i.e. calibrating). `propagate_scales`: hand each layer its input's true
    scale (the previous layer's output scale) instead of HF's embedding scale. `probe`
    (ref/probe.py): taps, patches and dropout of this call (default: none of them)."""
    tokens = with_defaults(config, tokens)
    B, T = tokens.shape
    dtype = p.embeddings.word_embeddings.table.dtype
    mask = jnp.ones((B, T), dtype) if tokens.attention_mask is None else tokens.attention_mask.astype(dtype)
    mask_add = ((1.0 - mask) * jnp.finfo(dtype).min)[:, None, None, :]  # HF get_extended_attention_mask
    q, x = embed(p.embeddings, config, Quant(config, state.embeddings, training), tokens, probe)

    def step(h: Act, xs):
        p_layer, index, layer_state = xs
        layer_probe = probe.layer("encoder.layer", index)
        q_layer, out = layer(p_layer, config, Quant(config, layer_state, training), h, mask_add, layer_probe)
        # HF quirk, reproduced by default: IBertLayer drops its output's scaling factor, so every
        # layer is told the *embedding* output's scale (x / s is then not an integer after layer 0)
        carry = out.out if propagate_scales else Act(out.out.x, h.s)
        return carry, (h.x, out.probs, q_layer.state, layer_probe.recorded if probe.taps else None)

    last, (inputs, attentions, layer_state, layer_taps) = layers.run_layers(step, x, p.layer, state.layer)
    pooled = None if p.pooler is None else probe("pooler", pooler(p.pooler, last.x))  # only where the head has one
    tap_values = {**probe.recorded, **layers.prefixed_taps("encoder.layer", layer_taps)} if probe.taps else None
    body = Body(last_hidden_state=last.x, hidden_states=jnp.concatenate([inputs, last.x[None]], axis=0),
                attentions=attentions, taps=tap_values, pooler_output=pooled)
    return body, IBertQuantState(q.state, layer_state)


def integer_model(p: IBertBody, config: IBertConfig, state: IBertQuantState, tokens: Tokens) -> Body:
    """`model` with `ibert_int.integer_encoder` (int8/int32 arithmetic, true scales), its
    integers dequantized (q * s) for the float pooler and heads."""
    enc = ibert_int.integer_encoder(p, config, state, with_defaults(config, tokens))
    dtype = p.embeddings.word_embeddings.table.dtype
    hidden = enc.hidden.astype(dtype) * enc.scales.reshape(-1, 1, 1, 1)  # [L + 1, B, T, D]
    return Body(last_hidden_state=hidden[-1], hidden_states=hidden, attentions=enc.probs.astype(dtype) * enc.probs_scale,
                pooler_output=None if p.pooler is None else pooler(p.pooler, hidden[-1]))


# Every tap `forward(..., taps=True)` returns, in dataflow order ({i} = layer index; stacked
# [L, ...] under "encoder.layer.<name>"). "pooler" only where the head builds a pooler.
TAPS = ("embeddings.word_embeddings", "embeddings.LayerNorm", "embeddings",
        "encoder.layer.{i}.attention.self.query", "encoder.layer.{i}.attention.self.key",
        "encoder.layer.{i}.attention.self.value", "encoder.layer.{i}.attention.self.scores",
        "encoder.layer.{i}.attention.self.softmax", "encoder.layer.{i}.attention.self",
        "encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.attention.output.ln_input_act",
        "encoder.layer.{i}.attention.output.LayerNorm", "encoder.layer.{i}.attention.output",
        "encoder.layer.{i}.pre_intermediate_act", "encoder.layer.{i}.intermediate.dense",
        "encoder.layer.{i}.intermediate.intermediate_act_fn", "encoder.layer.{i}.intermediate",
        "encoder.layer.{i}.output.dense", "encoder.layer.{i}.output.ln_input_act", "encoder.layer.{i}.output.LayerNorm",
        "encoder.layer.{i}.output", "encoder.layer.{i}", "pooler")


# HF's nn.Dropout modules (HF module paths: the base model's, then the heads'), the sites of
# `forward(..., train=True)`, with the config rate each one uses. I-BERT's heads read
# hidden_dropout_prob (IBertConfig has no classifier_dropout). IBertClassificationHead calls
# its one `dropout` module twice, a fresh mask each time: "{i}" there counts the calls (0: on
# the first token's state, 1: after the tanh), as it counts layers elsewhere.
DROPOUT = {
    "embeddings.dropout": lambda c: c.hidden_dropout_prob,
    "encoder.layer.{i}.attention.self.dropout": lambda c: c.attention_probs_dropout_prob,
    "encoder.layer.{i}.attention.output.dropout": lambda c: c.hidden_dropout_prob,
    "encoder.layer.{i}.output.dropout": lambda c: c.hidden_dropout_prob,
    "classifier.dropout.{i}": lambda c: c.hidden_dropout_prob,  # IBertForSequenceClassification
    "dropout": lambda c: c.hidden_dropout_prob,  # IBertFor{MultipleChoice,TokenClassification}
}


# ---------------------------------------------------------------------------------------
# HF classes: IBertModel, IBertFor{MaskedLM, SequenceClassification, MultipleChoice,
# TokenClassification, QuestionAnswering}. The heads are float in both modes.
# ---------------------------------------------------------------------------------------


def masked_lm(params: IBertParams, config: IBertConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """HF `IBertLMHead`: dense, GELU, LayerNorm, decoder (tied to the word table by default)."""
    h = params.lm_head
    y = nn.layer_norm(h.layer_norm, nn.gelu_erf(nn.linear(h.dense, hidden)), config.layer_norm_eps)
    kernel = h.decoder.kernel if h.decoder.kernel is not None else params.ibert.embeddings.word_embeddings.table.T
    return {"logits": nn.linear(Linear(kernel, h.decoder.bias), y)}  # [B, T, V]


def sequence_classification(params: IBertParams, config: IBertConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """HF `IBertClassificationHead`: out_proj(drop(tanh(dense(drop(hidden[:, 0]))))); both
    drops are the head's one `dropout` module, called twice. [B, num_labels]"""
    c = params.classifier
    calls = [probe.layer("classifier.dropout", call) for call in (0, 1)]  # "classifier.dropout.{i}"
    x = calls[0].dropout("", shell.first_token(hidden), config.hidden_dropout_prob)
    x = calls[1].dropout("", jnp.tanh(nn.linear(c.dense, x)), config.hidden_dropout_prob)
    if probe.taps and all("" in call.recorded for call in calls):  # the keep-masks, stacked by call [2, B, D]
        probe.recorded["classifier.dropout"] = jnp.stack([call.recorded[""] for call in calls])
    return {"logits": nn.linear(c.out_proj, x)}


def multiple_choice(params: IBertParams, config: IBertConfig, hidden, batch, probe: Probe = OFF) -> dict:
    """One score per choice from the pooled output (the "pooler" tap, patched as the body's
    is), after HF's `dropout`: [B*C, T, D] -> [B, C]."""
    pooled = probe.dropout("dropout", probe("pooler", pooler(params.ibert.pooler, hidden)), config.hidden_dropout_prob)
    return {"logits": shell.choice_logits(nn.linear(params.classifier, pooled), batch)}


def token_classification(params: IBertParams, config: IBertConfig, hidden, batch, probe: Probe = OFF) -> dict:
    hidden = probe.dropout("dropout", hidden, config.hidden_dropout_prob)
    return {"logits": nn.linear(params.classifier, hidden)}  # [B, T, num_labels]


def question_answering(params: IBertParams, config: IBertConfig, hidden, batch, probe: Probe = OFF) -> dict:
    return heads.span_logits(params.qa_outputs, hidden)  # start_logits, end_logits [B, T]


def check_inputs(config: IBertConfig, tokens: Tokens, cache) -> None:
    """I-BERT's rules on top of the shared ones: RoBERTa positions fit the table; quant mode
    needs float64 (HF's requantization)."""
    if tokens.position_ids is None and tokens.shape[-1] > config.max_tokens:
        raise ValueError(
            f"sequence length {tokens.shape[-1]} exceeds the position table: RoBERTa-style positions start at "
            f"pad_token_id + 1 = {config.pad_token_id + 1}, so max_position_embeddings - pad_token_id - 1 = "
            f"{config.max_tokens} tokens fit (max_position_embeddings={config.max_position_embeddings})")
    if config.quant_mode and not jax.config.jax_enable_x64:
        raise ValueError("quant_mode=True needs jax_enable_x64: HF's FixedPointMul requantizes in float64")


CLASSES = shell.Classes(
    family="ibert",
    heads={
        "IBertModel": Head("base"),
        "IBertForMaskedLM": Head("masked_lm", masked_lm),
        "IBertForSequenceClassification": Head("sequence", sequence_classification),
        "IBertForMultipleChoice": Head("choice", multiple_choice, choices="optional"),
        "IBertForTokenClassification": Head("token", token_classification),
        "IBertForQuestionAnswering": Head("qa", question_answering),
    },
    inputs=("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
            "start_positions", "end_positions"),
    limits=lambda c: shell.Limits(embed_width=c.hidden_size, positions=c.max_position_embeddings,
                                  type_vocab=c.type_vocab_size),
    check=check_inputs,
)


def check_options(config: IBertConfig, inputs: dict, *, cache, fast: bool, taps: bool, propagate_scales: bool,
                  integer: bool, patch=None, train: bool = False) -> None:
    """What I-BERT's forward refuses: a cache, the fast path, and the beyond-HF modes where
    they cannot run."""
    if cache is not None:
        raise ValueError("I-BERT is an encoder: it takes no cache")
    if fast:
        raise ValueError("I-BERT has no fast path (fast=True): its attention is integer softmax (use fast=False)")
    if (integer or propagate_scales) and not config.quant_mode:
        raise ValueError(f"{'integer' if integer else 'propagate_scales'}=True needs a quant_mode=True model "
                         f"(this config has quant_mode=False)")
    if integer:
        if config.force_dequant != "none":
            raise ValueError(f"integer=True needs every nonlinearity integer-only, but force_dequant="
                             f"{config.force_dequant!r} makes some float (use force_dequant='none')")
        if inputs.get("inputs_embeds") is not None:
            raise ValueError("integer=True takes input_ids: inputs_embeds are float vectors, not table rows")
        if taps:
            raise ValueError("integer=True has no taps: ref.ibert_int.integer_encoder returns every layer's integers")
        if patch or train:
            raise ValueError(f"integer=True runs the integer-only encoder, which has no "
                             f"{'patches' if patch else 'dropout (train=True)'}: use integer=False, the fake-quant "
                             f"model HF runs, which takes patch= and train=")


def forward(params: IBertParams, config: IBertConfig, input_ids=None, attention_mask=None, *, cache=None,
            output_hidden_states: bool = False, output_attentions: bool = False, taps: bool = False, patch=None,
            train: bool = False, key=None, dropout_masks=None, fast: bool = False,
            state: IBertQuantState | None = None, propagate_scales: bool = False, integer: bool = False,
            **inputs) -> heads.Output:
    """Any HF I-BERT class, chosen by `config.architecture`; returns HF's output fields.

    inputs: HF's names, `token_type_ids`, `position_ids`, `inputs_embeds`, `labels`,
    `start_positions`, `end_positions`. `state`: activation ranges (default `params.state`,
    as loaded from the checkpoint). IBertForMultipleChoice takes [B, C, T] inputs; its
    hidden states are [L+1, B*C, T, D] as HF returns them. Quant mode only:
    `propagate_scales=True` fixes HF's scale hand-off between layers (see `model`);
    `integer=True` runs `ibert_int.integer_encoder` and dequantizes its integers (q * s)
    for the float heads (no taps, patches or dropout there).

    `taps=True`: every named intermediate (TAPS); `patch={name: fn or array}` replaces one
    (ref/probe.py); in quant mode a tap is the tensor x of an activation (x, s) and a patch
    replaces x and keeps s. `train=True` with `key` (or `dropout_masks` keyed by DROPOUT
    sites): HF's training-mode dropout, at HF's sites in both modes. In quant mode HF's
    `train()` also moves every QuantAct range and IntLayerNorm shift (that update is
    `calibrate`); `forward(train=True)` does NOT: it runs with the ranges of `state` frozen,
    i.e. HF's model in `train()` with its QuantAct and IntLayerNorm modules put back in
    `eval()` (dropout on, quantization ranges fixed). In quant mode `jax.grad` is the exact
    derivative of the fake-quant forward (0 through rounding), not HF's straight-through
    estimates. Eager calls retrace the layer scan: jit it for repeated calls."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **inputs)
    check_options(config, inputs, cache=cache, fast=fast, taps=taps, propagate_scales=propagate_scales,
                  integer=integer, patch=patch, train=train)
    batch = shell.prepare(CLASSES, config, inputs, taps=taps, output_attentions=output_attentions, patch=patch,
                          train=train)
    probe = Probe.for_call("ibert", TAPS + tuple(DROPOUT), config.num_hidden_layers, taps=taps, patch=patch,
                           train=train, key=key, masks=dropout_masks)
    state = params.state if state is None else state
    if integer:
        body = integer_model(params.ibert, config, state, batch.tokens)
    else:
        body, _ = model(params.ibert, config, state, batch.tokens, probe=probe, propagate_scales=propagate_scales)
    return shell.finish(CLASSES, params, config, batch, body, output_hidden_states=output_hidden_states,
                        output_attentions=output_attentions, probe=probe)


def calibrate(params: IBertParams, config: IBertConfig, state: IBertQuantState, input_ids=None, attention_mask=None,
              *, propagate_scales: bool = False, **inputs) -> IBertQuantState:
    """One calibration batch: HF's model in train mode with dropout off, as a pure function
    (state -> state). Every QuantAct moves its range to the batch's min/max (first batch)
    or by EMA (momentum 0.95); quantized LayerNorms raise their shift on overflow.
    `propagate_scales=True` calibrates the scale-propagating model that `integer=True` runs."""
    batch = shell.prepare(CLASSES, config, dict(input_ids=input_ids, attention_mask=attention_mask, **inputs))
    return model(params.ibert, config, state, batch.tokens, training=True, propagate_scales=propagate_scales)[1]
