"""Losses with HF's semantics (`transformers/loss/loss_utils.py`, torch.nn losses).

All are means over the counted items; `ignore_index` targets are not counted, and a
batch where every target is ignored gives NaN (0 / 0), exactly as torch does.
Losses accumulate in at least fp32. Deliberate deviation: HF's causal-LM loss casts
logits with `.float()`, which *downcasts* an fp64 model's logits to fp32; refjax keeps
fp64 (so fp64 gradient checks work) and matches HF's fp64 loss to fp32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from refjax.nn import accum_dtype

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss default, HF's label padding value


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(accum_dtype(x.dtype))


def cross_entropy(logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """`torch.nn.functional.cross_entropy(logits [M, C], targets [M], ignore_index)`, mean."""
    logits = _upcast(logits)
    counted = targets != ignore_index
    safe_targets = jnp.where(counted, targets, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, safe_targets[:, None], axis=-1)[:, 0]
    total = jnp.sum(jnp.where(counted, -picked, 0.0))
    return total / jnp.sum(counted).astype(total.dtype)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Next-token loss: position t predicts labels[t + 1] (HF `ForCausalLMLoss`).

    logits [..., T, V], labels [..., T]; labels are shifted left and padded with -100."""
    shifted = jnp.concatenate([labels[..., 1:], jnp.full_like(labels[..., :1], IGNORE_INDEX)], axis=-1)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1))


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """`torch.nn.MSELoss()`: mean squared error."""
    return jnp.mean(jnp.square(_upcast(prediction) - target.astype(_upcast(prediction).dtype)))


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`torch.nn.BCEWithLogitsLoss()`: mean of max(x,0) - x y + log(1 + exp(-|x|))."""
    x = _upcast(logits)
    y = targets.astype(x.dtype)
    return jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))))


def infer_problem_type(problem_type: str | None, num_labels: int, labels: jax.Array) -> str:
    """HF's rule when config.problem_type is null: one label -> regression; integer labels
    -> single-label classification; otherwise multi-label."""
    if problem_type is not None:
        return problem_type
    if num_labels == 1:
        return "regression"
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(logits: jax.Array, labels: jax.Array, num_labels: int,
                                 problem_type: str | None) -> jax.Array:
    """HF `*ForSequenceClassification` loss; logits [B, num_labels]."""
    problem_type = infer_problem_type(problem_type, num_labels, labels)
    if problem_type == "regression":
        if num_labels == 1:  # HF squeezes both sides
            return mse(jnp.squeeze(logits), jnp.squeeze(labels))
        return mse(logits, labels)
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    return bce_with_logits(logits, labels)


def span_loss(start_logits: jax.Array, end_logits: jax.Array, start_positions: jax.Array,
              end_positions: jax.Array) -> jax.Array:
    """HF question-answering loss: positions are clamped to [0, T]; T itself is ignored;
    the loss is the mean of the start and end cross-entropies. logits [B, T]."""
    ignored = start_logits.shape[1]
    start = jnp.clip(start_positions.reshape(-1), 0, ignored)
    end = jnp.clip(end_positions.reshape(-1), 0, ignored)
    return (cross_entropy(start_logits, start, ignored) + cross_entropy(end_logits, end, ignored)) / 2
