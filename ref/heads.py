"""Task heads and their output container, shared by every family.

Each head is a small function of the final hidden states; the family file decides which
head its architecture uses. Field names of `Output` are HF's `ModelOutput` field names.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from refjax.params.common import Linear
from refjax import nn


class Output(eqx.Module):
    """What a forward returns; fields a head does not produce stay None.

    hidden_states: [L + 1, B, T, D], HF's `output_hidden_states` tuple stacked (index 0 is
        the embedding output, the last is after the final norm).
    attentions: [L, B, N, T, S], HF's `output_attentions` tuple stacked.
    taps: named intermediates (`refjax forward --taps`); per-layer ones are stacked [L, ...].
    """

    logits: jax.Array | None = None
    loss: jax.Array | None = None
    last_hidden_state: jax.Array | None = None
    hidden_states: jax.Array | None = None
    attentions: jax.Array | None = None
    mc_logits: jax.Array | None = None
    mc_loss: jax.Array | None = None
    start_logits: jax.Array | None = None
    end_logits: jax.Array | None = None
    pooler_output: jax.Array | None = None  # [B, D] (MEGA's bare model)
    cache: Any = None
    taps: dict | None = None


def lm_logits(lm_head: Linear | None, embedding_table: jax.Array, hidden: jax.Array) -> jax.Array:
    """Next-token logits [..., V]: the untied head, or tied to the input embedding [V, D]."""
    if lm_head is None:
        return jnp.einsum("...d,vd->...v", hidden, embedding_table)
    return nn.linear(lm_head, hidden)


def last_non_pad_index(input_ids: jax.Array | None, pad_token_id: int | None, batch: int) -> jax.Array:
    """HF sequence-classification pooling index [B]: the rightmost token that is not the pad
    id (works for left and right padding; a row of only pads gives 0). Without a pad id,
    or with inputs_embeds, HF takes the last position (-1 here as T - 1)."""
    if input_ids is None or pad_token_id is None:
        if pad_token_id is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (pad_token_id is null)")
        return jnp.full((batch,), -1, jnp.int32)
    token_indices = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
    non_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.argmax(token_indices * non_pad, axis=-1).astype(jnp.int32)


def pool_at(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, T, X] at one position per row, index [B] (negative counts from the end)."""
    index = jnp.where(index < 0, index + hidden.shape[1], index)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def sequence_summary(p: Linear | None, hidden: jax.Array, cls_index: jax.Array | None, summary_type: str,
                     activation: str | None, first_dropout=None, last_dropout=None) -> jax.Array:
    """HF `GPT2SequenceSummary` (eval mode): pick or pool a vector per sequence, then the
    optional projection and activation. hidden [B, T, D] or [B, C, T, D]; cls_index [B(, C)].

    HF quirk, mirrored: "last", "first" and "mean" index axis 1 whatever the rank, so with
    multiple-choice inputs [B, C, T, D] they pick or average over *choices*, not tokens
    ("cls_index", GPT-2's default, gathers tokens correctly)."""
    if summary_type == "last":
        output = hidden[:, -1]
    elif summary_type == "first":
        output = hidden[:, 0]
    elif summary_type == "mean":
        output = hidden.mean(axis=1)
    else:  # "cls_index"; HF defaults the index to the last token
        if cls_index is None:
            output = hidden[..., -1, :]
        else:
            output = jnp.take_along_axis(hidden, cls_index[..., None, None], axis=-2)[..., 0, :]
    if first_dropout is not None:  # HF's first_dropout / last_dropout (training mode only)
        output = first_dropout(output)
    if p is not None:
        output = nn.linear(p, output)
    if activation is not None:
        output = nn.ACT2FN[activation](output)
    if last_dropout is not None:
        output = last_dropout(output)
    return output


def last_token_scores(score: Linear, hidden: jax.Array, input_ids, pad_token_id) -> jax.Array:
    """Score every token, keep the last non-pad one (HF `*ForSequenceClassification` of the
    decoder families). hidden [B, T, D] -> logits [B, num_labels]."""
    token_logits = nn.linear(score, hidden)  # [B, T, num_labels]
    return pool_at(token_logits, last_non_pad_index(input_ids, pad_token_id, hidden.shape[0]))


def span_logits(qa_outputs: Linear, hidden: jax.Array) -> dict[str, jax.Array]:
    """HF `*ForQuestionAnswering`: start and end logits [B, T] from one Linear(D, 2)."""
    span = nn.linear(qa_outputs, hidden)  # [B, T, 2]
    return {"start_logits": span[..., 0], "end_logits": span[..., 1]}
