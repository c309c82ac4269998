"""Task heads and their output container, shared by every family.

Each head is a small function of the final hidden states; the family file decides which
head its architecture uses. Field names of `Output` are HF's `ModelOutput` field names.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from params.common import Linear
from ref import nn


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
    cache: Any = None
    taps: dict | None = None


def tied_lm_logits(embedding_table: jax.Array, hidden: jax.Array) -> jax.Array:
    """Logits from an LM head tied to the input embedding: [B, T, D] x [V, D] -> [B, T, V]."""
    return jnp.einsum("btd,vd->btv", hidden, embedding_table)


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
                     activation: str | None) -> jax.Array:
    """HF `GPT2SequenceSummary` (eval mode): pick or pool a vector per sequence, then the
    optional projection and activation. hidden [..., T, D]; cls_index [...]."""
    if summary_type == "last":
        output = hidden[..., -1, :]
    elif summary_type == "first":
        output = hidden[..., 0, :]
    elif summary_type == "mean":
        output = hidden.mean(axis=-2)
    else:  # "cls_index"; HF defaults the index to the last token
        if cls_index is None:
            output = hidden[..., -1, :]
        else:
            output = jnp.take_along_axis(hidden, cls_index[..., None, None], axis=-2)[..., 0, :]
    if p is not None:
        output = nn.linear(p, output)
    if activation is not None:
        output = nn.ACT2FN[activation](output)
    return output
